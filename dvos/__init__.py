"""dvos: self-supervised video object segmentation by distilling deformable attention."""

__version__ = "0.1.0"
