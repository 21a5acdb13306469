"""The student, the teacher and the engine on a CUDA device: forward and backward, mixed precision
(fp16 and bf16 autocast), and the same predictions as on the CPU. Skipped without CUDA;
`experiments/gpu/check.sh` (make gpu-check) runs them with `pytest -m cuda`."""

import helpers_models
import numpy as np
import pytest
import torch

from dvos.inference.engine import StudentSegmenter, TeacherSegmenter, segment_sequence
from dvos.models.student import labels_to_onehot

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def clip(batch=2, frames=3, height=64, width=96):
    """B × T × 3 × H × W frames and frame 0's one-hot masks (two boxes), on the GPU."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, frames, 3, height, width, generator=generator)
    ids = torch.zeros(batch, height, width, dtype=torch.long)
    ids[:, 8:32, 8:40], ids[:, 36:60, 50:90] = 1, 2
    return images.cuda(), labels_to_onehot(ids, 6).float().cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_student_forward_and_backward_on_cuda(dtype):
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    student = helpers_models.tiny_student().cuda().train()
    frames, masks = clip()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not torch.float32):
        logits, _ = student.segment_clip(frames, masks, num_objects=2)
        loss = sum(torch.nn.functional.cross_entropy(out.float(), masks.argmax(1)) for out in logits)
    loss.backward()
    assert all(out.shape == (2, 6, 64, 96) and out.device.type == "cuda" for out in logits)
    assert torch.isfinite(loss)
    gradients = [p.grad for p in student.parameters() if p.requires_grad and p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matmuls on the GPU (cuDNN uses TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_engine_on_cuda_predicts_what_it_predicts_on_the_cpu(no_tf32):
    student = helpers_models.tiny_student().eval()
    frames = (np.random.default_rng(0).random((5, 64, 96, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[8:32, 8:40], mask[36:60, 50:90] = 1, 2
    frames[:, 8:32, 8:40] = (230, 40, 40)
    predictions = {}
    for device in ("cpu", "cuda"):
        outputs = []
        segmenter = StudentSegmenter(student, device=device)
        segment_sequence(segmenter, frames, mask, on_frame=lambda i, p, out=outputs: out.append(p))
        predictions[device] = np.stack(outputs)
    assert predictions["cuda"].shape == (5, 64, 96)
    assert np.mean(predictions["cuda"] == predictions["cpu"]) > 0.999  # kernels' summation order aside


def test_teacher_and_the_fp16_engine_on_cuda():
    """The teacher on CUDA, and the student's engine under fp16 autocast (what `dvos bench --device
    cuda` times): the given first mask back, predictions of the frame's size."""
    student, teacher = helpers_models.tiny_student_and_teacher(5)
    frames = (np.random.default_rng(1).random((4, 64, 96, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 1
    for segmenter in (TeacherSegmenter(teacher, device="cuda"), StudentSegmenter(student, device="cuda")):
        outputs = []
        with torch.autocast("cuda", dtype=torch.float16):
            segment_sequence(segmenter, frames, mask, on_frame=lambda i, p, out=outputs: out.append(p))
        assert len(outputs) == 4 and outputs[-1].shape == (64, 96) and np.array_equal(outputs[0], mask)
