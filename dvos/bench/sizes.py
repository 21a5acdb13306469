"""Parameters and FLOPs per frame of the model group files (`conf/model/*.yaml`): the `sizes`
section of `dvos bench`, next to DeAOT's published sizes
(docs/METHOD.md, "Gated deformable propagation").

Each student is built from its group file with random weights (the counts do not depend on them)
and segments one frame of a synthetic video at the benchmark size (480 × 854 by default) after its
reference frame; `torch.utils.flop_counter.FlopCounterMode` counts that frame step (matrix
products, convolutions, attention products; element-wise ops, softmax and `grid_sample` are not
counted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dvos.bench.measure import count_flops

# Parameters of DeAOT's published models (yoxu515/aot-benchmark, MODEL_ZOO.md), millions.
DEAOT_PUBLISHED_M = {"deaot_t": 7.2, "deaot_s": 10.2, "deaot_b": 13.2, "deaot_l": 13.2}


def model_files(conf_dir: Path) -> dict[str, Path]:
    """The model group files of a config folder, by name (`conf/model/<name>.yaml`)."""
    return {path.stem: path for path in sorted((Path(conf_dir) / "model").glob("*.yaml"))}


def measure_model(
    model_cfg: dict[str, Any], size: tuple[int, int], device: torch.device, *, seed: int = 0
) -> dict[str, Any]:
    """Parameters (total and per top-level part) and FLOPs of one frame step of the student that
    `model_cfg` (a `model` config mapping) builds."""
    from dvos.bench.cells import SyntheticVideo
    from dvos.inference.engine import StudentSegmenter
    from dvos.models.build import build_student

    torch.manual_seed(seed)
    student, _ = build_student({**model_cfg, "pretrained": "none"})
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in student.named_children()}
    video = SyntheticVideo(size, seed=seed)
    frame0, mask0, object_ids = video.first()
    segmenter = StudentSegmenter(student, device=device)
    segmenter.start(frame0, mask0, object_ids)
    frame1 = video.frame(1)
    total, _, _ = count_flops(lambda: segmenter.step(frame1))
    return {
        "parameters": sum(parts.values()),
        "parameters_by_part": {name: count for name, count in parts.items() if count},
        "gflops_per_frame": total / 1e9,
        "num_layers": int(student.num_layers),
    }


def model_sizes(
    conf_dir: Path, size: tuple[int, int] = (480, 854), device: torch.device | None = None, *, seed: int = 0
) -> dict[str, Any]:
    """`measure_model` of every model group file in `conf_dir/model/`."""
    from omegaconf import OmegaConf

    device = torch.device("cpu") if device is None else device
    models = {}
    for name, path in model_files(conf_dir).items():
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        models[name] = measure_model(dict(config), size, device, seed=seed)
        if name in DEAOT_PUBLISHED_M:
            models[name]["deaot_published_m"] = DEAOT_PUBLISHED_M[name]
    return {
        "size": list(size),
        "counter": "torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention)",
        "models": models,
    }


def size_lines(sizes: dict[str, Any] | None) -> list[str]:
    """The report's lines for the `sizes` section (nothing without it)."""
    if not sizes or not sizes.get("models"):
        return []
    height, width = sizes["size"]
    lines = ["", f"Model group files: parameters and FLOPs per {height}×{width} frame ({sizes['counter']})"]
    for name, row in sizes["models"].items():
        published = row.get("deaot_published_m")
        versus = f" (DeAOT's published: {published:.1f} M)" if published is not None else ""
        lines.append(
            f"  model={name}: {row['parameters'] / 1e6:.2f} M parameters{versus}, "
            f"{row['gflops_per_frame']:.2f} GFLOP per frame, {row['num_layers']} layer(s)"
        )
    return lines
