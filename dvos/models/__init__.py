"""Networks: backbones, the deformable-attention student and the label-propagation teacher."""
