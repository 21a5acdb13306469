"""Lightning callbacks: attention pictures, VOS results, checkpoints."""

from dvos.callbacks.attention import AttentionPictures, PictureWarning, render_attention
from dvos.callbacks.vos_results import VOSResults

__all__ = ["AttentionPictures", "PictureWarning", "VOSResults", "render_attention"]
