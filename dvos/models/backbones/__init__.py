"""Image backbones: MobileNet-V2 (the student's encoder), DINO's ViT and a stride-8 ResNet (teacher encoders).

Both keep the parameter names of the published weights (torchvision's `mobilenet_v2`, DINO's
`vit_small` / `vit_base`), so those files load without key surgery and nothing is downloaded.
"""

from dvos.models.backbones.mobilenet_v2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MobileNetV2,
    MobileNetV2Encoder,
    MobileNetV2Features,
    imagenet_normalize,
)
from dvos.models.backbones.resnet import ResNetEncoder
from dvos.models.backbones.vit import VisionTransformer, load_dino_checkpoint, vit_base, vit_small
from dvos.models.backbones.weights import find_packaged_mobilenet_v2_weights, load_imagenet_mobilenet_v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MobileNetV2",
    "MobileNetV2Encoder",
    "MobileNetV2Features",
    "ResNetEncoder",
    "VisionTransformer",
    "find_packaged_mobilenet_v2_weights",
    "imagenet_normalize",
    "load_dino_checkpoint",
    "load_imagenet_mobilenet_v2",
    "vit_base",
    "vit_small",
]
