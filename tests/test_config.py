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
    assert cfg.trainer.precision == "32-true"


def test_group_choice_and_dotlist_override():
    cfg = load_config(["data=davis2016", "data.root=/datasets/DAVIS", "trainer.max_epochs=2"])
    assert cfg.data.year == 2016
    assert cfg.data.root == "/datasets/DAVIS"
    assert cfg.data.train_root == "/datasets/DAVIS/JPEGImages/480p"  # interpolation follows the override
    assert cfg.trainer.max_epochs == 2


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
