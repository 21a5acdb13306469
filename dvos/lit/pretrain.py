"""`CRWPretrainModule`: the teacher's ResNet encoder trained without labels by contrastive random walk.

Per training batch of clips (frames B × T × 3 × H × W in [0, 1], from `VideoClipDataModule`):

1. every frame goes through the encoder (B·T frames in one batch) → B·T × C × H/8 × W/8;
2. an optional projection head (1 × 1 convs, as CRW's MLP head on the node embeddings) maps the
   cells to the embedding the walk uses; it serves the loss only;
3. `crw_loss` (`dvos.lit.losses`): palindrome random walks 0 → k → 0 over the cells, with edge
   dropout while training; logged as `pretrain/loss`, `pretrain/return_acc` and `pretrain/lr`.

Optimisation: AdamW (weight decay on conv/linear weights only, not on BatchNorm or biases), linear
warm-up then cosine or polynomial decay, stepped every optimizer step (`WarmupDecay`).

Checkpoints: the encoder is the attribute `encoder` (keys `encoder.*`, what
`dvos.models.teacher_checkpoint.load_resnet_encoder` picks from a Lightning checkpoint); the head is `head`
(keys `head.*`, ignored by it). Hyper-parameters are plain ints, floats and strings, and the
scheduler's state is a plain dict, so a checkpoint loads with `torch.load(weights_only=True)`.
`export_teacher_encoder` writes the encoder alone: `{"encoder.<key>": tensor, ...,
"encoder_config": {...}}`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from dvos.lit.losses import crw_loss
from dvos.models.backbones.resnet import ResNetEncoder
from dvos.utils.errors import DvosError
from dvos.utils.io import atomic_path

log = logging.getLogger(__name__)

Schedule = Literal["cosine", "poly", "constant"]
ENCODER_PREFIX = "encoder."
ENCODER_CONFIG_KEY = "encoder_config"


class WarmupDecay:
    """Learning-rate factor per optimizer step: linear warm-up, then cosine / polynomial decay.

    factor(s) = (s + 1) / warmup_steps while s < warmup_steps; then with
    p = (s − warmup_steps) / (max_steps − warmup_steps) clamped to [0, 1]:
    cosine: m + (1 − m)·(1 + cos πp)/2; poly: m + (1 − m)·(1 − p)^power; constant: 1.
    m = min_lr_ratio. max_steps None (unknown length): constant after the warm-up.

    A callable object with plain attributes, so LambdaLR stores it in checkpoints as a plain dict.
    """

    def __init__(
        self,
        *,
        warmup_steps: int,
        max_steps: int | None,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.0,
        poly_power: float = 0.9,
    ) -> None:
        if schedule not in ("cosine", "poly", "constant"):
            raise ValueError(f"schedule must be cosine, poly or constant, got {schedule!r}")
        self.warmup_steps = max(0, int(warmup_steps))
        self.max_steps = None if max_steps is None else int(max_steps)
        self.schedule = schedule
        self.min_lr_ratio = float(min_lr_ratio)
        self.poly_power = float(poly_power)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant" or self.max_steps is None:
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, progress))
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = (1.0 - progress) ** self.poly_power
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def projection_head(in_channels: int, dim: int, depth: int) -> nn.Module:
    """CRW's node-embedding head as 1 × 1 convs: `depth` hidden (conv-ReLU) layers of width
    `in_channels`, then a conv to `dim`; `dim` ≤ 0 gives the identity (no head)."""
    if dim <= 0:
        return nn.Identity()
    layers: list[nn.Module] = []
    for _ in range(max(0, depth)):
        layers += [nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(in_channels, dim, 1))
    return nn.Sequential(*layers)


def jitter_frames(
    frames: torch.Tensor, jitter: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Crop every frame of every clip at its own random offset: B × T × C × H × W → B × T × C ×
    (H − j) × (W − j), offsets uniform in [0, j] on each axis (drawn on the CPU from `generator`).

    Raises:
        ValueError: j leaves fewer than 8 pixels on a side.
    """
    height, width = frames.shape[-2:]
    if jitter <= 0:
        return frames
    if min(height, width) - jitter < 8:
        raise ValueError(
            f"pretrain.spatial_jitter={jitter} leaves less than 8 pixels of {height}×{width} frames; "
            "lower it or raise pretrain.crop_size"
        )
    batch, num_frames = frames.shape[:2]
    offsets = torch.randint(jitter + 1, (batch * num_frames, 2), generator=generator).tolist()
    flat = frames.flatten(0, 1)
    crops = [
        flat[index, :, top : top + height - jitter, left : left + width - jitter]
        for index, (top, left) in enumerate(offsets)
    ]
    return torch.stack(crops).view(batch, num_frames, frames.shape[2], height - jitter, width - jitter)


class CRWPretrainModule(pl.LightningModule):
    """Contrastive-random-walk pretraining of a `ResNetEncoder` (the label-propagation teacher's).

    Args:
        widths, depths, stem_width, output_stride: the encoder (`ResNetEncoder`).
        head_dim: output channels of the projection head (≤ 0: no head, the walk uses the
            encoder's features); head_depth: its hidden layers (0: one linear 1 × 1 conv, CRW's default).
        temperature: τ of the walk's transitions.
        edge_dropout: share of affinities dropped while training.
        spatial_jitter: while training, every frame of a clip is cropped to (H − j) × (W − j) at
            its own random offset in [0, j]² pixels (`jitter_frames`). CRW's spatial jitter: a
            dense encoder with zero padding can otherwise return the walk by absolute position
            (distance to the border) instead of appearance
            (docs/METHOD.md, "Pre-training the teacher (contrastive random walk)"). 0: off.
        lr, weight_decay: AdamW.
        warmup_steps: linear warm-up length (optimizer steps).
        max_steps: schedule length; None takes the trainer's `estimated_stepping_batches`.
        schedule: "cosine", "poly" or "constant" after the warm-up; min_lr_ratio, poly_power: its shape.
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (64, 128, 256),
        depths: Sequence[int] = (2, 2, 2),
        stem_width: int = 64,
        output_stride: int = 8,
        head_dim: int = 128,
        head_depth: int = 0,
        temperature: float = 0.07,
        edge_dropout: float = 0.1,
        spatial_jitter: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 20,
        max_steps: int | None = 300,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.0,
        poly_power: float = 0.9,
    ) -> None:
        super().__init__()
        # Plain Python types only (an OmegaConf ListConfig would need full unpickling to load).
        hparams = {
            "widths": [int(w) for w in widths],
            "depths": [int(d) for d in depths],
            "stem_width": int(stem_width),
            "output_stride": int(output_stride),
            "head_dim": int(head_dim),
            "head_depth": int(head_depth),
            "temperature": float(temperature),
            "edge_dropout": float(edge_dropout),
            "spatial_jitter": int(spatial_jitter),
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "warmup_steps": int(warmup_steps),
            "max_steps": None if max_steps is None else int(max_steps),
            "schedule": str(schedule),
            "min_lr_ratio": float(min_lr_ratio),
            "poly_power": float(poly_power),
        }
        if not 0.0 <= hparams["edge_dropout"] < 1.0:
            raise ValueError(f"edge_dropout must be in [0, 1), got {edge_dropout}")
        if hparams["spatial_jitter"] < 0:
            raise ValueError(f"spatial_jitter must be ≥ 0 pixels, got {spatial_jitter}")
        if hparams["temperature"] <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        # In the checkpoint (load_from_checkpoint), not in W&B: the run logs the whole config once.
        self.save_hyperparameters(hparams, logger=False)
        self.encoder = ResNetEncoder(
            widths=hparams["widths"],
            depths=hparams["depths"],
            stem_width=hparams["stem_width"],
            output_stride=hparams["output_stride"],
        )
        self.head = projection_head(self.encoder.out_channels, hparams["head_dim"], hparams["head_depth"])

    @property
    def encoder_config(self) -> dict[str, Any]:
        """The encoder's constructor arguments as plain lists and ints."""
        config = self.encoder.config
        return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}

    def embed_clip(self, frames: torch.Tensor) -> torch.Tensor:
        """frames B × T × 3 × H × W in [0, 1] → node embeddings B × T × D × h × w (h = ⌈H/8⌉).

        All B·T frames go through the encoder as one batch (one set of BatchNorm statistics).
        """
        batch, num_frames = frames.shape[:2]
        features = self.head(self.encoder(frames.flatten(0, 1)))
        return features.view(batch, num_frames, *features.shape[1:])

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames B × T × 3 × H × W → (CRW loss, return accuracy); edge dropout and spatial jitter
        only in training."""
        if self.training and self.hparams.spatial_jitter > 0:
            frames = jitter_frames(frames, int(self.hparams.spatial_jitter))
        return crw_loss(
            self.embed_clip(frames),
            temperature=self.hparams.temperature,
            edge_dropout=self.hparams.edge_dropout if self.training else 0.0,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        frames = batch["frames"]
        loss, accuracy = self(frames)
        batch_size = frames.shape[0]
        self.log("pretrain/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("pretrain/return_acc", accuracy, prog_bar=True, batch_size=batch_size)
        self.log("pretrain/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim > 1 else no_decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        max_steps = self.hparams.max_steps
        if max_steps is None and self._trainer is not None:
            estimated = self.trainer.estimated_stepping_batches
            max_steps = int(estimated) if math.isfinite(estimated) else None
        factor = WarmupDecay(
            warmup_steps=self.hparams.warmup_steps,
            max_steps=max_steps,
            schedule=self.hparams.schedule,
            min_lr_ratio=self.hparams.min_lr_ratio,
            poly_power=self.hparams.poly_power,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def export_teacher_encoder(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the encoder of a `CRWPretrainModule` checkpoint as a plain teacher file.

    The file holds `{"encoder.<key>": tensor, ...}` (the encoder's state dict, BatchNorm buffers
    included) and `"encoder_config"` (widths, depths, stem_width, output_stride; also
    `"global_step"` and `"source"`); it loads with `torch.load(weights_only=True)` and with
    `dvos.models.teacher_checkpoint.load_resnet_encoder` (which reads the architecture from the tensor shapes
    and assumes output stride 8). Written atomically.

    Raises:
        DvosError: one line naming the file, when it cannot be read or holds no `encoder.*` tensors.
    """
    ckpt_path, out_path = Path(ckpt_path).expanduser(), Path(out_path).expanduser()
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DvosError(f"cannot read pretraining checkpoint {ckpt_path}: {first}") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    encoder_state = {
        key: value.clone()
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and key.startswith(ENCODER_PREFIX)
    }
    if not encoder_state:
        raise DvosError(f"pretraining checkpoint {ckpt_path} holds no {ENCODER_PREFIX}* tensors")
    local_state = {key[len(ENCODER_PREFIX) :]: value for key, value in encoder_state.items()}
    hparams = checkpoint.get("hyper_parameters") or {}
    config = ResNetEncoder.config_from_state_dict(local_state)
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    config["output_stride"] = int(hparams.get("output_stride", 8))
    if config["output_stride"] != 8:
        log.warning(
            "encoder of %s has output stride %d; load_resnet_encoder assumes 8",
            ckpt_path,
            config["output_stride"],
        )
    payload: dict[str, Any] = dict(encoder_state)
    payload[ENCODER_CONFIG_KEY] = {
        **config,
        "global_step": int(checkpoint.get("global_step", 0)),
        "source": str(ckpt_path),
    }
    with atomic_path(out_path) as tmp:
        torch.save(payload, tmp)
    log.info(
        "teacher encoder %s (step %s) written to %s",
        config,
        payload[ENCODER_CONFIG_KEY]["global_step"],
        out_path,
    )
    return out_path
