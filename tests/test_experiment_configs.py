"""Experiment files (`conf/experiment/`): every one loads given its data roots, the paper-scale ones
carry the DeAOT-derived schedule and refuse to start without their roots; YouTube-VOS evaluation
writes the benchmark's submission archive."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers_data import box_masks, make_davis_tree, moving_frames, write_frame_folder
from PIL import Image

from dvos.cli.main import main
from dvos.config import load_config
from dvos.data.builders import require_train_root
from dvos.data.vos import youtubevos_sequences
from dvos.inference.submission import listed_frames, write_youtubevos_submission
from dvos.utils.errors import ConfigError, DvosError
from dvos.utils.masks import write_mask

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "conf" / "experiment").glob("*.yaml"))
ROOTS = ["data.root=/data/root", "data.train_root=/data/videos"]
PAPER = {
    "distill_davis2016": ("davis", 2016),
    "distill_davis2017": ("davis", 2017),
    "distill_youtubevos2018": ("youtubevos", None),
    "distill_youtubevos2019": ("youtubevos", None),
}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_file_loads_given_data_roots(path):
    cfg = load_config([f"experiment={path.stem}", *ROOTS])
    assert cfg.experiment == path.stem
    assert cfg.name  # names the run folder


def test_the_expected_experiments_exist():
    names = {path.stem for path in EXPERIMENTS}
    expected = {"cpu", "paper", "teacher_crw_youtubevos", "teacher_crw_kinetics", "smoke", "sweep_cpu"}
    expected.add("cpu_two_stage")
    assert set(PAPER) | expected <= names


def test_the_root_config_is_the_papers_method_and_cpu_adds_the_recipe():
    """The schema and conf/config.yaml describe the paper's method (CKA + relations, pseudo-objects
    from the teacher's features, no inference post-processing); `experiment=cpu` adds the recipe."""
    root, cpu = load_config([]), load_config(["experiment=cpu"])
    assert (root.distill.lambda_ce, root.distill.lambda_ref, root.distill.occluder_prob) == (0, 0, 0)
    assert (root.distill.feature_weight, root.distill.colour_weight, root.distill.components) == (1, 0, False)
    assert (
        root.eval.min_size is None and root.eval.refine_iterations == 0 and root.eval.long_term_weight is None
    )
    assert (cpu.distill.lambda_ce, cpu.distill.colour_weight, cpu.distill.teacher_scale) == (1, 1, 2)
    assert cpu.eval.min_size == 600 and cpu.eval.refine_iterations == 12 and cpu.eval.long_term_weight == 1.3
    # smoke and sweep_cpu are the CPU recipe at a tiny size
    for name in ("smoke", "sweep_cpu"):
        small = load_config([f"experiment={name}"])
        assert small.distill.occluder_prob == cpu.distill.occluder_prob and small.eval.refine_iterations == 12


def test_paper_experiments_repeat_nothing_of_their_base():
    """The paper experiments extend `paper`: each file names its data and little else."""
    base = (REPO / "conf" / "experiment" / "paper.yaml").read_text()
    for name in PAPER:
        text = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()
        assert "experiment: paper" in text
        keys = [line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  ")]
        assert not {"lr", "crop_size", "max_steps", "ema_decay"} & set(keys), name
        assert "crop_size" in base


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_scale_distillation_has_the_deaot_schedule(name):
    fmt, year = PAPER[name]
    cfg = load_config([f"experiment={name}", *ROOTS])
    assert cfg.data.format == fmt and (year is None or cfg.data.year == year)
    assert cfg.data.crop_size == [465, 465] and cfg.data.clip_len == 5
    assert cfg.optim.lr == 2e-4 and cfg.optim.encoder_lr_ratio == 0.1 and cfg.optim.weight_decay == 0.07
    assert cfg.optim.poly_power == 0.9 and cfg.optim.min_lr_ratio == pytest.approx(0.1)
    assert cfg.trainer.max_steps == 100_000 and cfg.optim.warmup_steps == 5_000  # 5 % warm-up
    assert cfg.trainer.gradient_clip_val == 5.0 and cfg.optim.ema
    assert cfg.data.batch_size * 4 == 16  # DeAOT's global batch on 4 GPUs
    assert cfg.teacher.checkpoint.endswith("teachers/crw-resnet-youtubevos.pt")
    # the paper's method (the root config's), not the CPU recipe's additions
    cpu = load_config(["experiment=cpu"])
    assert cfg.model.attention_topk == 0
    assert cfg.model.permute_slots is None and cpu.model.permute_slots == 4  # AOT's: every slot
    assert cfg.eval.long_term_weight is None and cfg.eval.refine_iterations == 0
    # never a step chosen on the split the table reports
    assert cfg.eval.final_checkpoint == "last" and cpu.eval.final_checkpoint == "last"
    assert cfg.distill.lambda_ce == 0 and cfg.distill.teacher_scale == 1 and cfg.eval.min_size is None
    assert cfg.distill.occluder_prob == 0 and cpu.distill.occluder_prob > 0
    # the paper's student (DeAOT-T's module with deformable reads) with DeAOT's frozen BatchNorm
    assert cfg.model.name == "deaot_t" and cfg.model.freeze_bn and not cpu.model.freeze_bn
    teacher = load_config(["experiment=teacher_crw_youtubevos", "data.root=/data/YouTubeVOS"])
    assert teacher.pretrain.output == cfg.teacher.checkpoint  # the pretraining writes what distillation loads
    if fmt == "youtubevos":
        assert cfg.data.split == "valid" and cfg.trainer.limit_val_batches == 0
        assert cfg.data.train_root == "/data/videos"  # given here; by default from the root:
        assert load_config([f"experiment={name}", "data.root=/Y"]).data.train_root == "/Y/train/JPEGImages"
    else:
        assert cfg.trainer.check_val_every_n_epoch is None and cfg.trainer.val_check_interval == 5000


@pytest.mark.parametrize(
    "overrides, missing",
    [
        (["experiment=distill_davis2017", "data.root=/data/DAVIS"], "data.train_root"),
        (["experiment=distill_davis2016", "data.train_root=/v"], "data.root"),
        (["experiment=distill_youtubevos2019"], "data.root"),
        (["experiment=teacher_crw_youtubevos"], "data.root"),
        (["experiment=teacher_crw_kinetics"], "data.train_root"),
    ],
)
def test_paper_scale_experiments_need_their_data_roots(overrides, missing):
    """data.root is needed to load; data.train_root by the commands that train (before any folder)."""
    with pytest.raises(ConfigError, match=missing.replace(".", r"\.")):
        require_train_root(load_config(overrides))


def test_teacher_pretraining_experiments_read_the_right_frames():
    youtube = load_config(["experiment=teacher_crw_youtubevos", "data.root=/Y"])
    assert youtube.data.train_root == "/Y/train/JPEGImages" and youtube.pretrain.crop_size == [256, 256]
    kinetics = load_config(["experiment=teacher_crw_kinetics", "data.train_root=/K/train"])
    assert kinetics.data.train_root == "/K/train" and not kinetics.data.synth.generate


# --------------------------------------------------------------------------------------------------
# YouTube-VOS submission archive
# --------------------------------------------------------------------------------------------------
def youtubevos_valid(root: Path) -> Path:
    """A valid-style tree: `early` (object 1 from frame 0, object 2 from frame 3) and `late` (its only
    object first appears at frame 2: frames 0-1 are not listed in meta.json)."""
    split = root / "valid"
    meta = {"videos": {}}
    for name, starts in (("early", {1: 0, 2: 3}), ("late", {3: 2})):
        frames = moving_frames(6, 48, 64, seed=len(name))
        boxes = {obj: (4 + 10 * i, 14 + 10 * i, 4, 20) for i, obj in enumerate(starts)}
        masks = box_masks(6, 48, 64, boxes)
        for obj, start in starts.items():
            masks[:start][masks[:start] == obj] = 0
        write_frame_folder(split / "JPEGImages" / name, frames)
        for start in sorted(set(starts.values())):
            first = np.where(
                np.isin(masks[start], [o for o, s in starts.items() if s == start]), masks[start], 0
            )
            write_mask(split / "Annotations" / name / f"{start:05d}.png", first.astype(np.uint8))
        meta["videos"][name] = {
            "objects": {
                str(obj): {"category": "thing", "frames": [f"{t:05d}" for t in range(start, 6)]}
                for obj, start in starts.items()
            }
        }
    (split / "meta.json").write_text(json.dumps(meta))
    return root


def test_youtubevos_evaluation_writes_the_official_submission_zip(tmp_path, capsys):
    root = youtubevos_valid(tmp_path / "ytvos")
    out = tmp_path / "predictions"
    code = main(["evaluate", "--baseline", "copy", "--out", str(out), "data=youtubevos", f"data.root={root}",
                 f"paths.runs_dir={tmp_path / 'runs'}"])  # fmt: skip
    assert code == 0
    assert "submission.zip (10 frames of 2 videos)" in capsys.readouterr().out
    with zipfile.ZipFile(out / "submission.zip") as archive:
        names = sorted(archive.namelist())
        expected = sorted(
            [f"Annotations/early/{t:05d}.png" for t in range(6)]
            + [f"Annotations/late/{t:05d}.png" for t in range(2, 6)]
        )
        assert names == expected
        for name in names:
            with archive.open(name) as handle:
                image = Image.open(handle)
                image.load()
            assert image.mode == "P" and image.size == (64, 48)
            assert (np.asarray(image) == np.asarray(Image.open(out / name.split("/", 1)[1]))).all()
        with archive.open("Annotations/early/00004.png") as handle:
            assert set(np.unique(np.asarray(Image.open(handle)))) == {0, 1, 2}  # both objects tracked
    assert not list(out.glob(".*tmp*"))


def test_a_failed_youtubevos_rerun_leaves_no_older_submission_zip(tmp_path, capsys, monkeypatch):
    root = youtubevos_valid(tmp_path / "ytvos")
    out = tmp_path / "predictions"
    words = ["evaluate", "--baseline", "copy", "--out", str(out), "data=youtubevos", f"data.root={root}",
             f"paths.runs_dir={tmp_path / 'runs'}"]  # fmt: skip
    assert main(words) == 0 and (out / "submission.zip").is_file()

    import dvos.cli.evaluate_cmd as evaluate_cmd

    def fail(*args, **kwargs):
        raise DvosError("frame 00003.jpg of early cannot be decoded")

    monkeypatch.setattr(evaluate_cmd, "evaluate_segmenter", fail)
    assert main(words) == 2
    assert "cannot be decoded" in capsys.readouterr().err
    assert not (out / "submission.zip").exists()


def test_submission_fills_frames_without_prediction_and_reads_meta(tmp_path):
    root = youtubevos_valid(tmp_path / "ytvos")
    sequences = youtubevos_sequences(root, split="valid")
    meta = json.loads((root / "valid" / "meta.json").read_text())["videos"]
    assert listed_frames(meta, "late") == ["00002", "00003", "00004", "00005"]
    predictions = tmp_path / "pred"
    for sequence in sequences:  # predictions for every frame but the last one of `early`
        for name in sequence.frame_names[: -1 if sequence.name == "early" else None]:
            write_mask(predictions / sequence.name / f"{name}.png", np.zeros(sequence.size, np.uint8))
    stats = write_youtubevos_submission(
        predictions, sequences, root / "valid" / "meta.json", tmp_path / "s.zip"
    )
    assert stats == {"videos": 2, "frames": 10, "blank": 1}
    with (
        zipfile.ZipFile(tmp_path / "s.zip") as archive,
        archive.open("Annotations/early/00005.png") as handle,
    ):
        blank = Image.open(handle)
        assert blank.mode == "P" and blank.size == (64, 48) and not np.asarray(blank).any()


def test_davis_group_files_never_train_on_the_frames_they_score(tmp_path, capsys):
    """data=davis2016/2017 name no training videos (DAVIS's JPEGImages/480p holds the val sequences
    too): evaluation needs none, `dvos train` asks for them, and refuses a folder that holds an
    evaluated sequence."""
    for name in ("davis2016", "davis2017"):
        assert load_config([f"data={name}", "data.root=/d"]).data.train_root is None
    root = tmp_path / "DAVIS"
    frames, masks = moving_frames(6, 32, 48), box_masks(6, 32, 48, {1: (4, 20, 4, 20)})
    make_davis_tree(root, {"blackswan": (frames, masks)}, year=2016)
    runs = [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.data_dir={tmp_path / 'data'}", "logger=none"]
    assert main(["train", "data=davis2016", f"data.root={root}", *runs]) == 2
    assert "data.train_root is not set" in capsys.readouterr().err
    words = ["train", "data=davis2016", f"data.root={root}", f"data.train_root={root}/JPEGImages/480p", *runs]
    assert main(words) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("dvos: error: data.train_root=")
        and "1 sequence(s) of the evaluation set (blackswan)" in err
    )


def test_the_two_stage_experiment_distils_deaot_l_then_the_student():
    """`cpu_two_stage` is the CPU recipe with teacher=deformable: stage 1 trains DeAOT-L's network
    (conf/teacher/deformable.yaml holds conf/model/deaot_l.yaml's settings) as long as stage 2."""
    import yaml

    cfg, cpu = load_config(["experiment=cpu_two_stage"]), load_config(["experiment=cpu"])
    assert cfg.teacher.name == "deformable" and cfg.teacher.deformable.checkpoint is None
    assert cfg.teacher.deformable.max_steps == 192 and cpu.trainer.max_epochs * 48 == 192
    assert cfg.distill == cpu.distill and cfg.model == cpu.model
    model = yaml.safe_load((REPO / "conf" / "model" / "deaot_l.yaml").read_text())
    teacher = yaml.safe_load((REPO / "conf" / "teacher" / "deformable.yaml").read_text())
    assert teacher["deformable"]["model"] == model
    assert cfg.teacher.deformable.model.permute_slots == 4
    # the label-propagation part of the teacher file is conf/teacher/label_propagation.yaml's
    propagation = yaml.safe_load((REPO / "conf" / "teacher" / "label_propagation.yaml").read_text())
    assert {key: teacher[key] for key in propagation if key != "name"} == {
        key: value for key, value in propagation.items() if key != "name"
    }
