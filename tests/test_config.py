"""Configuration: group choices, merge order, dot-list overrides and one-line errors for bad keys."""

import pytest
from omegaconf import OmegaConf

from dvos.config import load_config, save_config
from dvos.utils.errors import ConfigError


def test_defaults_pick_the_embedded_data():
    cfg = load_config([])
    assert cfg.data.name == "synthetic"
    assert cfg.data.synth.generate is True
    assert cfg.data.root == "data/synthetic/val"
    assert cfg.data.train_root == "data/synthetic/train"
    assert cfg.trainer.precision == "auto"  # resolved when the Trainer is built: 32-true on a CPU


def test_group_choice_and_dotlist_override():
    cfg = load_config(["data=davis2016", "data.root=/datasets/DAVIS", "trainer.max_epochs=2"])
    assert cfg.data.year == 2016
    assert cfg.data.root == "/datasets/DAVIS"
    assert cfg.data.train_root is None  # never DAVIS's own frames: `dvos train` asks for videos
    assert cfg.trainer.max_epochs == 2
    youtube = load_config(["data=youtubevos", "data.root=/datasets/YTVOS"])
    assert youtube.data.train_root == "/datasets/YTVOS/train/JPEGImages"  # interpolation follows the override


def test_merge_order_experiment_then_command_line(tmp_path):
    conf = tmp_path / "conf"
    for group in ("data", "model", "teacher", "trainer", "logger", "callbacks", "experiment"):
        (conf / group).mkdir(parents=True)
    (conf / "config.yaml").write_text("defaults:\n  data: a\n  trainer: t\nseed: 1\n")
    (conf / "data" / "a.yaml").write_text("name: a\nroot: /a\ntrain_root: /a/train\nbatch_size: 3\n")
    (conf / "data" / "b.yaml").write_text("name: b\nroot: /b\ntrain_root: /b/train\n")
    (conf / "trainer" / "t.yaml").write_text("max_epochs: 5\n")
    (conf / "experiment" / "e.yaml").write_text("defaults:\n  data: b\nseed: 2\ntrainer:\n  max_epochs: 7\n")

    cfg = load_config([], conf_dir=conf)
    assert (cfg.data.name, cfg.data.batch_size, cfg.seed, cfg.trainer.max_epochs) == ("a", 3, 1, 5)

    cfg = load_config(["experiment=e"], conf_dir=conf)
    assert (cfg.data.name, cfg.seed, cfg.trainer.max_epochs, cfg.experiment) == ("b", 2, 7, "e")
    assert cfg.data.batch_size == 4  # b.yaml does not set it: the schema default, not a.yaml's

    cfg = load_config(["experiment=e", "data=a", "trainer.max_epochs=9"], conf_dir=conf)
    assert (cfg.data.name, cfg.trainer.max_epochs) == ("a", 9)

    # an experiment extends another: the base's keys and group choices first, then its own
    (conf / "experiment" / "f.yaml").write_text("defaults:\n  experiment: e\ntrainer:\n  max_steps: 3\n")
    cfg = load_config(["experiment=f"], conf_dir=conf)
    assert (cfg.data.name, cfg.seed, cfg.trainer.max_epochs, cfg.trainer.max_steps) == ("b", 2, 7, 3)
    assert cfg.experiment == "f"
    (conf / "experiment" / "g.yaml").write_text("defaults:\n  experiment: h\n")
    (conf / "experiment" / "h.yaml").write_text("defaults:\n  experiment: g\n")
    with pytest.raises(ConfigError, match="in a loop: g -> h -> g"):
        load_config(["experiment=g"], conf_dir=conf)


def test_misspelled_key_names_key_and_nearest_valid_one():
    with pytest.raises(ConfigError) as info:
        load_config(["trainer.max_epoch=2"])
    message = str(info.value)
    assert "trainer.max_epoch" in message and "trainer.max_epochs" in message
    assert "\n" not in message


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        load_config(["trainer.max_epochs=two"])


def test_unknown_group_choice_lists_available():
    with pytest.raises(ConfigError, match="available: .*davis2016"):
        load_config(["data=davis2099"])


def test_missing_required_value_names_the_key():
    with pytest.raises(ConfigError, match="data.root"):
        load_config(["data=davis2017"])


def test_bad_key_in_a_group_file_names_the_file(tmp_path):
    bad = tmp_path / "mydata.yaml"
    bad.write_text("name: mine\nroot: /r\ntrain_root: /t\nbatchsize: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config([f"data={bad}"])
    assert str(bad) in str(info.value) and "data.batch_size" in str(info.value)


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["max_epochs"])


def test_saved_config_is_resolved_and_reloads(tmp_path):
    cfg = load_config(["experiment=smoke"])
    path = save_config(cfg, tmp_path / "config.yaml")
    text = path.read_text()
    assert "${" not in text
    reloaded = OmegaConf.load(path)
    assert reloaded.data.root == "data/synthetic-smoke/val"
    assert reloaded.logger.enabled is False


# ------------------------------------------------------------------ checks when the config loads
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.devices=0", "trainer.devices must be a count ≥ 1, -1 (all), auto, or a list of device ids, got 0"),
        ("data.batch_size=0", "data.batch_size must be ≥ 1, got 0"),
        ("data.num_workers=-1", "data.num_workers must be ≥ 0, got -1"),
        ("optim.lr=-1", "optim.lr must be > 0, got -1"),
        ("optim.ema_decay=1", "optim.ema_decay must be in [0, 1), got 1"),
        ("data.hflip_p=1.5", "data.hflip_p must be in [0, 1], got 1.5"),
        ("model.d_model=30", "model.d_model (30) must be divisible by model.num_heads (8)"),
        ("model.offset_kernel=4", "model.offset_kernel must be odd, got 4"),
        ("teacher.temperature=0", "teacher.temperature must be > 0, got 0"),
        ("trainer.max_steps=-2", "trainer.max_steps must be ≥ -1 (-1: no limit), got -2"),
        ("trainer.val_check_interval=0",
         "trainer.val_check_interval must be a share of an epoch in (0, 1], a number of steps ≥ 1, or null, got 0"),
        ("trainer.max_time=12h", "trainer.max_time must be DD:HH:MM:SS (e.g. 00:12:00:00), seconds or "
         "{hours: N, ...}, got '12h'"),
    ],
)  # fmt: skip
def test_every_value_is_range_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logger.mode=onlin", "logger.mode must be one of auto, online, offline, disabled, got 'onlin'"),
        ("teacher.encoder=vit", "teacher.encoder must be one of resnet, vit_small, vit_base, got 'vit'"),
        ("distill.att_branches=all", "distill.att_branches must be one of long, short, both, got 'all'"),
        ("data.format=coco", "data.format must be one of davis, youtubevos, got 'coco'"),
        ("trainer.accelerator=gpus", "trainer.accelerator must be one of auto, cpu, gpu, cuda, mps, tpu, got 'gpus'"),
        ("trainer.profiler=simpel", "trainer.profiler must be one of null, simple, advanced, pytorch, xla, got 'simpel'"),
        ("trainer.precision=bogus", "trainer.precision must be one of auto, bf16-mixed, 16-mixed, 32-true, 64-true, "
         "bf16-true, 16-true, transformer-engine, transformer-engine-float16, bf16, 16, 32, 64, got 'bogus'"),
    ],
)  # fmt: skip
def test_every_choice_is_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert str(info.value) == message


def test_any_lightning_trainer_argument_is_taken_and_checked_against_its_signature(tmp_path):
    from datetime import timedelta

    from lightning.pytorch.profilers import SimpleProfiler

    from dvos.callbacks.stopping import ProcessTimer
    from dvos.cli.factory import build_trainer

    extra = ["trainer.max_time=00:00:01:30", "trainer.sync_batchnorm=true", "trainer.profiler=simple",
             "trainer.detect_anomaly=true"]  # fmt: skip
    cfg = load_config(["experiment=smoke", *extra])
    assert cfg.trainer.max_time == "00:00:01:30" and cfg.trainer.detect_anomaly is True
    trainer = build_trainer(cfg, tmp_path, job_type="distill")
    assert isinstance(trainer.profiler, SimpleProfiler) and trainer._detect_anomaly
    assert trainer._accelerator_connector._layer_sync is not None  # sync_batchnorm
    timers = [c for c in trainer.callbacks if isinstance(c, ProcessTimer)]
    assert len(timers) == 1 and timers[0]._duration == timedelta(minutes=1, seconds=30).total_seconds()
    assert trainer.precision == "32-true"  # precision=auto on a CPU: fp32, as before

    for override, message in (
        ("trainer.max_tme=1", "unknown config key 'trainer.max_tme': not an argument of lightning.Trainer; "
         "did you mean: trainer.max_time, trainer.max_steps?"),
        ("trainer.sync_batchnorm=maybe", "trainer.sync_batchnorm must be true or false, got 'maybe'"),
        ("trainer.logger=false", "trainer.logger is set by dvos: use logger.* instead"),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            load_config([override])
        assert str(info.value) == message


def test_precision_auto_is_bf16_mixed_on_gpus_that_support_it_else_16_mixed_and_fp32_on_cpu(monkeypatch):
    import torch

    from dvos.cli.factory import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "auto") == resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", "cpu") == "32-true"
    for supported, expected in ((True, "bf16-mixed"), (False, "16-mixed")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_precision("auto", "auto") == resolve_precision("auto", "gpu") == expected
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"  # an explicit choice stands


def test_extra_evaluation_sets_are_checked_when_the_config_loads():
    cfg = load_config(["eval.extra_sets=[synthetic_small]"])
    assert list(cfg.eval.extra_sets) == ["synthetic_small"]
    with pytest.raises(ConfigError, match="eval.extra_sets: no data config named 'synthetic_smal'"):
        load_config(["eval.extra_sets=[synthetic_smal]"])
