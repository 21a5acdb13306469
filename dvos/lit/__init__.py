"""LightningModules: teacher pretraining and deformable-attention distillation."""
