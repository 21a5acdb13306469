"""Teacher pretraining by contrastive random walk: the learning-rate schedule, a real Lightning fit on
synthetic mp4s, weights-only checkpoints, and the exported encoder loading as the teacher's."""

import math

import lightning.pytorch as pl
import pytest
import torch

from dvos.data.datamodules import VideoClipDataModule
from dvos.data.synth import generate_synthetic
from dvos.lit.pretrain import CRWPretrainModule, WarmupDecay, export_teacher_encoder, jitter_frames
from dvos.models.backbones.resnet import ResNetEncoder
from dvos.models.teacher_checkpoint import load_resnet_encoder
from dvos.utils.errors import DvosError

TINY_ENCODER = {"widths": (16, 32), "depths": (1, 1), "stem_width": 8}


def test_warmup_then_cosine_and_poly_by_hand():
    cosine = WarmupDecay(warmup_steps=4, max_steps=12, schedule="cosine")
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == pytest.approx(1.0)
    assert cosine(8) == pytest.approx(0.5)  # p = 4/8: (1 + cos π/2)/2
    assert cosine(6) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert cosine(12) == pytest.approx(0.0, abs=1e-12) and cosine(50) == pytest.approx(0.0, abs=1e-12)
    poly = WarmupDecay(warmup_steps=0, max_steps=10, schedule="poly", poly_power=2.0, min_lr_ratio=0.1)
    assert poly(0) == pytest.approx(1.0)
    assert poly(5) == pytest.approx(0.1 + 0.9 * 0.25)
    assert poly(10) == pytest.approx(0.1)
    assert WarmupDecay(warmup_steps=2, max_steps=None)(100) == 1.0
    with pytest.raises(ValueError):
        WarmupDecay(warmup_steps=1, max_steps=3, schedule="step")


def test_module_keys_and_embeddings():
    module = CRWPretrainModule(**TINY_ENCODER, head_dim=24, head_depth=1)
    keys = list(module.state_dict())
    assert all(key.startswith(("encoder.", "head.")) for key in keys)
    assert any(key.startswith("head.") for key in keys)
    embeddings = module.embed_clip(torch.rand(2, 3, 3, 40, 56))
    assert embeddings.shape == (2, 3, 24, 5, 7)
    loss, accuracy = module(torch.rand(2, 3, 3, 40, 56))
    assert torch.isfinite(loss) and 0.0 <= accuracy.item() <= 1.0
    no_head = CRWPretrainModule(**TINY_ENCODER, head_dim=0)
    assert not any(key.startswith("head.") for key in no_head.state_dict())
    assert no_head.embed_clip(torch.rand(1, 2, 3, 32, 32)).shape == (1, 2, 32, 4, 4)


def test_spatial_jitter_crops_each_frame_at_its_own_offset():
    # Every pixel value encodes its (frame, row, column): a crop's first pixel gives its offset.
    batch, frames, height, width, jitter = 2, 3, 20, 24, 6
    index = torch.arange(batch * frames * height * width, dtype=torch.float32)
    clip = index.view(batch, frames, 1, height, width).expand(-1, -1, 3, -1, -1).contiguous()
    out = jitter_frames(clip, jitter, generator=torch.Generator().manual_seed(0))
    assert out.shape == (batch, frames, 3, height - jitter, width - jitter)
    offsets = set()
    for b in range(batch):
        for t in range(frames):
            first = int(out[b, t, 0, 0, 0]) - (b * frames + t) * height * width
            top, left = divmod(first, width)
            assert 0 <= top <= jitter and 0 <= left <= jitter
            expected = clip[b, t, :, top : top + height - jitter, left : left + width - jitter]
            assert torch.equal(out[b, t], expected)
            offsets.add((top, left))
    assert len(offsets) > 1  # frames are not cropped alike
    assert jitter_frames(clip, 0) is clip
    with pytest.raises(ValueError, match="spatial_jitter=14"):
        jitter_frames(clip, 14)


def test_jitter_applies_in_training_only():
    module = CRWPretrainModule(**TINY_ENCODER, head_dim=0, spatial_jitter=16)
    clip = torch.rand(1, 2, 3, 48, 48)
    seen = []
    module.embed_clip = lambda frames: seen.append(frames.shape[-2:]) or torch.rand(1, 2, 4, 4, 4)
    module.train()
    module(clip)
    module.eval()
    module(clip)
    assert seen == [(32, 32), (48, 48)]
    with pytest.raises(ValueError, match="spatial_jitter"):
        CRWPretrainModule(**TINY_ENCODER, spatial_jitter=-1)


@pytest.fixture(scope="module")
def synthetic_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(root, num_train=2, num_val=1, seed=0, size=(64, 96), train_frames=8, val_frames=6)
    return root / "train"


def test_fit_checkpoint_and_export_load_as_teacher_encoder(synthetic_videos, tmp_path):
    pl.seed_everything(0, workers=True)
    datamodule = VideoClipDataModule(
        synthetic_videos,
        batch_size=2,
        num_workers=0,
        clip_len=4,
        max_gap=2,
        crop_size=(48, 64),
        clips_per_video=2,
        seed=0,
    )
    module = CRWPretrainModule(**TINY_ENCODER, head_dim=16, warmup_steps=1, max_steps=3, lr=1e-3)
    initial = {key: value.clone() for key, value in module.encoder.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["pretrain/loss"]) and 0.0 <= float(metrics["pretrain/return_acc"]) <= 1.0
    # step 2 (the last) with warm-up 1 and cosine to step 3: p = (2 − 1)/(3 − 1), lr = 1e-3 · (1 + cos(π/2))/2
    assert float(metrics["pretrain/lr"]) == pytest.approx(1e-3 * 0.5, rel=1e-6)
    assert any(not torch.equal(initial[key], value) for key, value in module.encoder.state_dict().items())

    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 1
    checkpoint = torch.load(checkpoints[0], map_location="cpu", weights_only=True)  # plain types only
    assert checkpoint["hyper_parameters"]["widths"] == [16, 32]
    assert any(key.startswith("head.") for key in checkpoint["state_dict"])
    restored = CRWPretrainModule.load_from_checkpoint(checkpoints[0], weights_only=True)
    # the teacher loader reads the Lightning checkpoint itself (encoder.* keys) ...
    direct = load_resnet_encoder(checkpoints[0])
    # ... and the exported plain file
    exported = export_teacher_encoder(checkpoints[0], tmp_path / "teacher" / "crw.pt")
    payload = torch.load(exported, map_location="cpu", weights_only=True)
    assert payload["encoder_config"]["widths"] == [16, 32] and payload["encoder_config"]["global_step"] == 3
    assert not any(key.startswith("head.") for key in payload)
    loaded = load_resnet_encoder(exported)
    assert isinstance(loaded, ResNetEncoder) and loaded.config == ResNetEncoder(**TINY_ENCODER).config

    frames = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    reference = restored.encoder.eval()(frames)
    assert torch.equal(loaded.eval()(frames), reference)
    assert torch.equal(direct.eval()(frames), reference)
    assert torch.equal(module.encoder.eval()(frames), reference)  # the checkpoint holds the final weights


def test_export_rejects_files_without_an_encoder(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"student.weight": torch.zeros(2)}}, path)
    with pytest.raises(DvosError, match="no encoder"):
        export_teacher_encoder(path, tmp_path / "out.pt")
    with pytest.raises(DvosError, match="cannot read"):
        export_teacher_encoder(tmp_path / "missing.ckpt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_finish_wandb_closes_the_pretraining_run(tmp_path):
    """`dvos train` pretrains and distils in one process: the pretraining W&B run must be closed, or
    the distillation logger would reuse it and its metrics would land in the pretraining run."""
    import lightning.pytorch as pl
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from dvos.cli.factory import finish_wandb

    logger = WandbLogger(save_dir=str(tmp_path), mode="offline", project="dvos-test")
    trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
    run_id = logger.experiment.id
    assert wandb.run is not None and wandb.run.id == run_id
    finish_wandb(trainer)
    assert wandb.run is None
    finish_wandb(pl.Trainer(logger=False, accelerator="cpu"))  # no W&B logger: nothing to do


@pytest.mark.parametrize(
    "override, key",
    [
        ("pretrain.spatial_jitter=-1", "pretrain.spatial_jitter"),
        ("pretrain.spatial_jitter=125", "pretrain.spatial_jitter"),  # 128-px crops keep at least 8
        ("pretrain.edge_dropout=1.0", "pretrain.edge_dropout"),
        ("pretrain.temperature=0", "pretrain.temperature"),
    ],
)
def test_unusable_pretraining_settings_are_one_line_config_errors(override, key):
    from dvos.cli.pretrain_cmd import check_pretrain_config
    from dvos.config import load_config
    from dvos.utils.errors import ConfigError

    check_pretrain_config(load_config([]))  # the defaults pass
    with pytest.raises(ConfigError, match=key):
        check_pretrain_config(load_config([override]))
