"""Typed configuration: dataclass schemas, YAML groups under `conf/`, dot-list overrides.

A run's config is built in this order, each step overriding the one before (docs/configuration.md):

1. the dataclass defaults below (the schema: every valid key, its type and default);
2. `conf/config.yaml` without its `defaults:` list;
3. one file per group, `conf/<group>/<choice>.yaml`, merged into `cfg.<group>`; the choice comes
   from `conf/config.yaml`'s `defaults:`, then the experiment file's `defaults:`, then the command
   line (`data=davis2016`); a choice may also be a path to a YAML file;
4. the experiment file `conf/experiment/<name>.yaml` (if `experiment=<name>`), merged at the root,
   after the experiment it extends (`defaults: {experiment: <base>}`), if any;
5. dot-list overrides from the command line (`trainer.max_epochs=2`).

Because the schema is a dataclass, a misspelled key or a value of the wrong type fails at once with
one line naming the key (and the nearest valid ones), instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import inspect
import os
import platform
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import II, MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from dvos import __version__
from dvos.utils.errors import ConfigError
from dvos.utils.io import atomic_write

GROUPS = ("data", "model", "teacher", "trainer", "logger", "callbacks")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONF_DIR = REPO_ROOT / "conf"
# `${repo:assets/davis2016}`: a path inside the repository, wherever the command runs from.
OmegaConf.register_resolver("repo", lambda path="": str(REPO_ROOT / path), replace=True)


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
@dataclass
class PathsConfig:
    data_dir: str = "data"  # cache of generated data (the embedded synthetic set)
    runs_dir: str = "runs"  # one folder per run: runs/<date>-<time>-<name>/


@dataclass
class SynthConfig:
    """The embedded procedural dataset; built once into `out` when `generate` is true."""

    generate: bool = False
    out: str = "${paths.data_dir}/synthetic"
    num_train: int = 24
    num_val: int = 6
    seed: int = 0
    height: int = 240
    width: int = 432
    train_frames: int = 48
    val_frames: int = 32


@dataclass
class RealDataConfig:
    """The real data the repository carries (assets/davis2016): its annotated val sequences are
    decoded once into `out` when `prepare` is true; its train videos are read as they are."""

    prepare: bool = False
    source: str = "${repo:assets/davis2016}"
    out: str = "${paths.data_dir}/davis2016-sample"


@dataclass
class DataConfig:
    """Unlabelled training clips (`train_root`) and a VOS evaluation set (`root`)."""

    name: str = "synthetic"
    # Evaluation set (semi-supervised VOS: first-frame masks given).
    format: str = "davis"  # davis | youtubevos
    root: str = MISSING  # set by the data group file or data.root=PATH
    year: int = 2017  # DAVIS: 2016 merges all objects into one
    split: str = "val"
    resolution: str = "480p"
    sequences: list[str] | None = None  # restrict evaluation to these sequence names
    # Training clips: mp4/avi/webm/mkv files or frame folders under train_root (labels never read);
    # null for commands that only evaluate (`dvos train` and `dvos pretrain` refuse it).
    train_root: str | None = None
    clip_len: int = 3
    max_gap: int = 4
    reverse_prob: float = 0.5
    clips_per_video: int = 8
    crop_size: list[int] = field(default_factory=lambda: [224, 224])
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip_p: float = 0.5
    photometric_p: float = 0.8
    per_frame_photometric: bool = True
    batch_size: int = 4  # per device; global batch = batch_size × devices × num_nodes × accumulate
    num_workers: int = 2
    decord_threads: int = 1  # decoding threads per video reader (either backend)
    # video decoder: auto (decord when it imports and opens the file, else PyAV) | decord | pyav
    backend: Literal["auto", "decord", "pyav"] = "auto"
    pin_memory: bool | None = None  # DataLoader pin_memory; null: on when training on CUDA
    synth: SynthConfig = field(default_factory=SynthConfig)
    real: RealDataConfig = field(default_factory=RealDataConfig)
    # -- experimental: no shipped config sets it (docs/configuration.md, "Experimental options") --
    # largest gap from the reference (first) frame of a clip to the next; None: max_gap like the others
    reference_gap: int | None = None


@dataclass
class ModelConfig:
    """The student: MobileNet-V2 encoder + gated deformable propagation layer(s) + FPN decoder.

    The propagation layer's form (docs/METHOD.md, "Gated deformable propagation"): the defaults are
    dvos's own layer; `conf/model/deaot_t.yaml` sets DeAOT-T's (the paper's student)."""

    name: str = "deaot_t_deform"
    pretrained: str = "auto"  # auto | package | none | <path to mobilenet_v2-b0353104.pth>
    freeze_bn: bool = False  # the encoder's BatchNorm layers stay in eval mode, affine frozen (DeAOT)
    d_model: int = 256
    max_objects: int = 10
    num_layers: int = 1  # stacked propagation layers (DeAOT-T 1, DeAOT-S 2, DeAOT-B/L 3)
    num_heads: int = 8  # attention heads of the memory reads and the self-propagation (DeAOT 1)
    num_groups: int = 4  # offset groups: heads in a group share sampling points
    key_dim: int | None = None  # width of queries and keys (null: d_model; DeAOT with one head: d/2)
    # > 0: values are SiLU(linear) of width expand_ratio·d, visual and ID (DeAOT 2); 0: a linear
    # visual value of width d and the ID embedding itself
    expand_ratio: float = 0.0
    dw_kernel: int = (
        0  # depth-wise k × k conv after each gating, before the output projection (DeAOT 5; 0: none)
    )
    gate_id: bool = True  # the first layer gates its ID read by the visual stream (false: ungated, DeAOT)
    id_norm: bool = False  # LayerNorm over the ID embedding's channels (DeAOT)
    short_term_read: str = "deformable"  # deformable | local (a window with relative position bias, DeAOT)
    local_window: int = 15  # side of the local window, in memory cells (odd; DeAOT 15)
    deform_stride: int = 2  # reference points every `deform_stride` memory tokens
    offset_range: float = 4.0  # maximum offset, in memory-map cells (tanh × range)
    offset_kernel: int = 5  # depth-wise kernel of the offset network
    decoder_dim: int = 256
    ffn_ratio: float = 2.0  # feed-forward width in multiples of d (0: no feed-forward, DeAOT)
    permute_ids: bool = True  # random permutation of object ids in training (undone on the output)
    permute_slots: int | None = None  # that permutation moves slots 1..P only (null: all max_objects)
    attention_scale: float = 30.0  # > 0: cosine attention with a learned scale starting here; 0: q·k/√d
    propagation_init: bool = True  # a fresh student starts as a label propagator (docs/METHOD.md, "Student")
    # -- experimental: no shipped config sets it (docs/configuration.md, "Experimental options") --
    attention_topk: int = 0  # > 0: each query reads only its k most similar sampled points (0: all)


@dataclass
class DeformableTeacherConfig:
    """The teacher of the student's own kind (`teacher.name=deformable`; docs/METHOD.md, "Teacher"):
    a frozen network of the student's family, itself distilled without labels from the
    label-propagation teacher (the other `teacher.*` keys) by `dvos train` first (stage 1)."""

    # its weights (a `dvos train` checkpoint or a stage-1 file); null: `dvos train` distils it first
    # and caches it under ${paths.data_dir}/teachers/ by the hash of its settings
    checkpoint: str | None = None
    max_steps: int | None = (
        None  # stage 1's optimizer steps (null: trainer.max_steps / max_epochs, as stage 2)
    )
    model: ModelConfig = field(default_factory=ModelConfig)  # its network (same keys as `model`)


@dataclass
class TeacherConfig:
    """The frozen self-supervised teacher: label propagation (`name: label_propagation`), or a network
    of the student's kind distilled from it (`name: deformable`, `teacher.deformable`)."""

    name: str = "label_propagation"  # label_propagation | deformable
    encoder: str = "resnet"  # resnet (trained by `dvos pretrain`) | vit_small | vit_base
    patch_size: int = 16  # ViT patch size (8 or 16)
    checkpoint: str | None = None  # teacher encoder weights (a `dvos pretrain` checkpoint or a DINO .pth)
    topk: int = 5
    radius: int = 12  # local window (in feature cells) for affinities
    temperature: float = 0.07
    n_recent: int = 7  # context = reference frame + n most recent frames
    deformable: DeformableTeacherConfig = field(default_factory=DeformableTeacherConfig)


@dataclass
class DistillConfig:
    """The distillation (docs/METHOD.md, "Distillation losses"): pseudo-objects, loss weights and
    temperature, all logged with the run."""

    ref_masks: str = "pseudo"  # pseudo (cluster the teacher's features) | annotation (first-frame labels)
    num_segments: int = 4  # pseudo-objects per clip, background included
    position_weight: float = 0.3  # weight of the position in the pseudo-object clustering (0: appearance)
    feature_weight: float = 1.0  # weight of the teacher's (unit) features in that clustering
    colour_weight: float = 0.0  # weight of frame 0's smoothed colours in it (a weak teacher needs them)
    components: bool = False  # every connected piece of a segment is its own pseudo-object
    tau: float = 1.0  # softmax temperature of the relation losses
    lambda_att: float = 1.0  # 1 − CKA between teacher and student attention maps
    lambda_inter: float = 1.0  # inter-object relations (per pixel, across objects)
    lambda_intra: float = 1.0  # intra-object relations (per object, across pixels)
    lambda_ce: float = 0.0  # CE to the teacher's hard pseudo-masks (not the paper's; the CPU recipe's)
    lambda_ref: float = 0.0  # CE of the student's reading of frame 0 back from its memory (0: off)
    refine_iterations: int = 0  # bilateral passes moving reference objects and CE targets onto edges
    teacher_scale: int = 1  # the teacher sees the training clips magnified this many times (finer targets)
    # per training clip, the probability that an elliptical piece of another clip's frame 0 moves
    # across its frames (copy-paste occluder: occlusions and encounters; 0: off)
    occluder_prob: float = 0.0
    # -- experimental: no shipped config sets these (docs/configuration.md, "Experimental options") --
    # with components: a piece must hold a min_width × min_width block of the teacher's feature cells
    # (thinner pieces, e.g. one stripe of a texture, are background; 1: any piece)
    min_width: int = 1
    # with components: a piece's mean colour must differ from its surroundings' (within 2 cells) by
    # this much (RGB in [0, 1]; 0: off): pieces that only the position term cut out of a uniform
    # texture are background
    min_contrast: float = 0.0
    # the CE (and the reference reading's) over each sample's hardest share of pixels (AOT: 0.15)
    ce_hard_ratio: float = 1.0
    lambda_jaccard: float = 0.0  # soft Jaccard to the same hard masks (and in the reference reading's loss)
    att_branches: str = "both"  # which student attention is distilled: long | short | both
    # per sample and frame, the probability that one object's mask enters the short-term memory
    # under another id (another object's or the background's): the student learns to correct its own
    # previous prediction from the reference frame (0: off)
    memory_swap_prob: float = 0.0


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and polynomial decay (per step), optional EMA of the student."""

    lr: float = 2e-4
    encoder_lr_ratio: float = 0.1  # the pretrained encoder learns slower
    weight_decay: float = 0.07
    warmup_steps: int = 20
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0
    ema: bool = True
    ema_decay: float = 0.995
    max_non_finite: int = 5  # stop after this many non-finite losses in a row


MIN_MODEL_SIZE = 16  # pixels: the smallest frame side a model is fed (one stride-16 feature cell)


@dataclass
class EvalConfig:
    """Inference during validation and `dvos evaluate`."""

    max_size: int | None = None  # cap on the long side of frames fed to the model (None: full size)
    min_size: int | None = None  # smaller short sides are upsampled to this for the models (None: never)
    # The same two for the validation during training only (default: the values above); a cheaper
    # size keeps frequent validation affordable when the final evaluation runs magnified.
    val_max_size: int | None = II("eval.max_size")
    val_min_size: int | None = II("eval.min_size")
    # How the student reads its memory at inference (validation, evaluate, segment, the final table).
    # soft_memory: the previous frame enters the short-term memory as its softmax probabilities, as in
    # training (false: the argmax one-hot). attention_topk: each deformable read keeps its k most
    # similar sampled points (0: all; null: model.attention_topk, as trained). long_term_weight: w in
    # [0, 2], the ID stream sums the long-term (reference frame) read × w and the short-term (previous
    # frame) read × (2 − w) (null: 1, as trained). docs/METHOD.md, "Inference".
    soft_memory: bool = True
    attention_topk: int | None = None
    long_term_weight: float | None = None
    # Edge refinement of the student's output (dvos/models/refine.py): refine_iterations passes of a
    # joint bilateral filter guided by the frame, at the frame's size, before the argmax and the
    # short-term memory (0: off). val_refine_iterations: the same for the validation during training.
    # The CPU recipe turns it on (docs/DESIGN.md, "The CPU recipe").
    refine_iterations: int = 0
    val_refine_iterations: int = II("eval.refine_iterations")
    refine_radius: int = 12  # pixels of the frame
    refine_dilation: int = 3  # read every n-th pixel of the window: (2·radius/n + 1)² = 81 neighbours
    refine_sigma_space: float = 8.0  # pixels
    refine_sigma_colour: float = 0.1  # RGB in [0, 1]
    # With the refinement on, the student's short-term memory embeds the refined mask's argmax one-hot
    # (false): the filter mixes background into objects' probabilities, and fed back softly frame
    # after frame a faint object fades out (docs/METHOD.md, "Inference"). true: the filtered
    # probabilities (with soft_memory). Without refinement soft_memory alone decides.
    refine_soft_memory: bool = False
    # Which student the final table of `dvos train` scores: last (the weights at the end of
    # training, last.ckpt) or best (the best validation J&F). best picks a step on the validation
    # set, so use it only when that set is held out of the one the table reports.
    final_checkpoint: str = "last"
    # The student's long-term frames at most: the reference frame plus one per frame where objects
    # first appear (YouTube-VOS), the oldest added one dropped beyond it (docs/METHOD.md, "Memory").
    max_long_term: int = 4
    # More evaluation sets for the final table of `dvos train`: data group names (conf/data/), each
    # scored like data.* and written as `summary-<name>.json` and a second table.
    extra_sets: list[str] = field(default_factory=list)


@dataclass
class PretrainConfig:
    """Teacher pretraining by contrastive random walk (`dvos pretrain`; `dvos train` runs it when the
    teacher is a ResNet without checkpoint and `pretrain.enabled`)."""

    enabled: bool = True
    output: str = "auto"  # auto: ${paths.data_dir}/teachers/crw-<hash of these settings and the data>.ckpt
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2])
    stem_width: int = 64
    head_dim: int = 128  # CRW's projection head (used only for the loss, not kept in the teacher)
    temperature: float = 0.07
    edge_dropout: float = 0.1
    spatial_jitter: int = 32  # pixels: each frame cropped at its own offset, against the position shortcut
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    max_steps: int = 300
    clip_len: int = 4
    crop_size: list[int] = field(default_factory=lambda: [128, 128])
    batch_size: int = 8


@dataclass
class TrainerConfig:
    """Arguments passed to `lightning.Trainer` (see Lightning's documentation for each). Any other
    argument of its signature may be added (`trainer.max_time=00:12:00:00`, `trainer.profiler=simple`);
    each is checked against that signature when the config loads (docs/DESIGN.md, "Configuration")."""

    accelerator: str = "auto"
    devices: Any = 1  # int, list of ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...
    # auto: bf16-mixed on a GPU that supports it, 16-mixed on other GPUs, 32-true on a CPU (where
    # bf16 is emulated and slow); resolved when the Trainer is built
    precision: str = "auto"
    max_epochs: int = 10
    max_steps: int = -1
    val_check_interval: Any = 1.0
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    fast_dev_run: Any = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    deterministic: bool = False
    benchmark: bool | None = None
    num_sanity_val_steps: int = 0


@dataclass
class LoggerConfig:
    """Weights & Biases. mode=auto: online with an API key, offline without (never prompts)."""

    name: str = "wandb"
    enabled: bool = True
    project: str = "dvos"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto | online | offline | disabled


@dataclass
class CallbacksConfig:
    """Each callback switchable on/off."""

    checkpoint: bool = True  # best on val/J&F + last.ckpt in <run>/checkpoints
    checkpoint_every_n_steps: int = 100  # also write last.ckpt every N optimizer steps (0: only at the end)
    lr_monitor: bool = True
    progress_bar: bool = True  # rich progress bar (on a terminal)
    # where stdout is not a terminal (a log file): a line every N optimizer steps instead (0: none)
    progress_every_n_steps: int = 50
    skipped_videos: bool = True  # report corrupt videos skipped during the epoch
    attention_pictures: bool = True  # student/teacher attention and offsets to W&B and <run>/pictures
    attention_every_n_steps: int = 100
    vos_results: bool = True  # per-sequence table and mask overlays after each validation
    num_overlays: int = 4


@dataclass
class Config:
    name: str = "dvos"  # run name, part of the run folder's name
    seed: int = 0
    run_dir: str | None = None  # default: ${paths.runs_dir}/<date>-<time>-<name>
    ckpt_path: str | None = None  # resume: a path or "last"
    experiment: str | None = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)


# --------------------------------------------------------------------------------------------------
# Building a config
# --------------------------------------------------------------------------------------------------
def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema, nested ones included."""
    keys = []
    for f in fields(schema):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _valid_keys(type(default), prefix=f"{full}.")
    return keys


def _suggest(key: str) -> str:
    candidates = _valid_keys(Config)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        close = [
            c
            for c in candidates
            if c.rsplit(".", 1)[-1]
            in difflib.get_close_matches(
                leaf, [c.rsplit(".", 1)[-1] for c in candidates if c.startswith(parent)], n=3, cutoff=0.6
            )
            and c.startswith(parent)
        ][:3]
    return f"; did you mean: {', '.join(close)}?" if close else ""


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line naming the key and where it came from."""
    key = getattr(err, "full_key", None) or ""
    message = str(err).split("\n", 1)[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"unknown config key '{key}' in {source}{_suggest(key)}")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"config key '{key}' has no value: set it on the command line, e.g. {key}=/path")
    if isinstance(err, ValidationError):
        return ConfigError(f"bad value for config key '{key}' in {source}: {message}")
    return ConfigError(f"{source}: {message}" + (f" (key '{key}')" if key else ""))


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(
            f"{path}: cannot parse YAML ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a {type(loaded).__name__}")
    return loaded


def _group_file(conf_dir: Path, group: str, choice: str) -> Path:
    """`conf/<group>/<choice>.yaml`, or `choice` itself when it is a path to a YAML file."""
    if choice.endswith((".yaml", ".yml")) and Path(choice).is_file():
        return Path(choice)
    path = conf_dir / group / f"{choice}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        raise ConfigError(
            f"no {group} config named '{choice}' ({path}); available: {', '.join(available) or 'none'}"
        )
    return path


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, source) from err


def split_overrides(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split command-line words into group choices (`data=davis2016`) and dot-list overrides."""
    choices, dotlist = {}, []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"cannot read override '{arg}': expected key=value (e.g. trainer.max_epochs=2)")
        key, value = arg.split("=", 1)
        if key in GROUPS or key == "experiment":
            choices[key] = value
        else:
            dotlist.append(arg)
    return choices, dotlist


def _experiment_chain(conf_dir: Path, name: str) -> list[tuple[Path, DictConfig]]:
    """The experiment file `name` and the ones it extends, base first.

    An experiment extends another with `experiment: <base>` in its `defaults:`; the base's keys and
    group choices come first, the extending file's override them.
    """
    chain: list[tuple[Path, DictConfig]] = []
    seen: list[str] = []
    while name:
        if name in seen:
            raise ConfigError(f"experiment files extend each other in a loop: {' -> '.join([*seen, name])}")
        seen.append(name)
        path = _group_file(conf_dir, "experiment", name)
        experiment = _load_yaml(path)
        defaults = experiment.get("defaults")
        if defaults is not None and not isinstance(defaults, DictConfig):
            raise ConfigError(f"{path}: 'defaults' must be a mapping of group: choice")
        base = defaults.pop("experiment", None) if defaults is not None else None
        chain.insert(0, (path, experiment))
        name = str(base) if base else ""
    return chain


def schema() -> DictConfig:
    """The dataclass defaults as a structured config; `trainer` also takes keys beyond its fields
    (any `lightning.Trainer` argument: `check_config` checks them against the Trainer's signature)."""
    cfg: DictConfig = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg.trainer, False)
    return cfg


def _quote_durations(dotlist: list[str]) -> list[str]:
    """`trainer.max_time=1:00:00:00` stays the text DD:HH:MM:SS: YAML would read numbers joined by
    colons as one base-60 number (60 hours here, not a day)."""
    quoted = []
    for item in dotlist:
        key, value = item.split("=", 1)
        duration = key == "trainer.max_time" and re.fullmatch(r"[0-9]+(:[0-9]+)+", value)
        quoted.append(f"{key}='{value}'" if duration else item)
    return quoted


def load_config(
    overrides: list[str] | None = None, *, conf_dir: str | os.PathLike | None = None
) -> DictConfig:
    """Build the run config from `conf/` and command-line `overrides` (see the module docstring).

    Returns a structured DictConfig: assigning an unknown key or a wrongly typed value raises.
    """
    conf_dir = Path(conf_dir) if conf_dir else DEFAULT_CONF_DIR
    choices_cli, dotlist = split_overrides(list(overrides or []))

    cfg = schema()
    root = _load_yaml(conf_dir / "config.yaml")
    defaults = dict(root.pop("defaults", None) or {})
    cfg = _merge(cfg, root, str(conf_dir / "config.yaml"))

    experiment_name = choices_cli.get("experiment", defaults.get("experiment"))
    experiments = _experiment_chain(conf_dir, str(experiment_name)) if experiment_name else []
    for _, experiment in experiments:
        defaults.update(dict(experiment.pop("defaults", None) or {}))
    defaults.update({k: v for k, v in choices_cli.items() if k != "experiment"})

    for group in GROUPS:
        choice = defaults.get(group)
        if choice is None:
            continue
        path = _group_file(conf_dir, group, str(choice))
        cfg = _merge(cfg, {group: _load_yaml(path)}, str(path))
    for experiment_path, experiment in experiments:
        cfg = _merge(cfg, experiment, str(experiment_path))
    if experiments:
        cfg.experiment = str(experiment_name)
    if dotlist:
        try:
            cli = OmegaConf.from_dotlist(_quote_durations(dotlist))
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse command-line overrides {dotlist}: {err}") from err
        cfg = _merge(cfg, cli, "the command line")
    check_resolvable(cfg)
    check_config(cfg)
    for name in cfg.eval.extra_sets:  # a misspelled set fails now, not after the training
        with_data(cfg, str(name), conf_dir=conf_dir)
    return cfg


def with_data(cfg: DictConfig, choice: str, *, conf_dir: str | os.PathLike | None = None) -> DictConfig:
    """A copy of `cfg` whose `data` section is the data group file `choice` over the schema's defaults
    (an extra evaluation set of `eval.extra_sets`)."""
    try:
        path = _group_file(Path(conf_dir) if conf_dir else DEFAULT_CONF_DIR, "data", choice)
    except ConfigError as err:
        raise ConfigError(f"eval.extra_sets: {err}") from err
    other = cfg.copy()
    other.data = _merge(OmegaConf.structured(DataConfig), _load_yaml(path), str(path))
    check_resolvable(other)
    return other


def check_resolvable(cfg: DictConfig) -> None:
    """Resolve every interpolation once so a broken `${...}` fails now, naming its key."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise _explain(err, "the resolved config") from err


# --------------------------------------------------------------------------------------------------
# Checks when the config loads: choices, ranges, Trainer arguments (docs/DESIGN.md, "Configuration")
# --------------------------------------------------------------------------------------------------
# Lightning's precision names (lightning.fabric.connector._PRECISION_INPUT) and dvos's `auto`.
PRECISIONS = (
    *("auto", "bf16-mixed", "16-mixed", "32-true", "64-true", "bf16-true", "16-true"),
    *("transformer-engine", "transformer-engine-float16", "bf16", "16", "32", "64"),
)
# Keys that take one of a few values.
CHOICES: dict[str, tuple[Any, ...]] = {
    "data.format": ("davis", "youtubevos"),
    "model.name": ("deaot_t_deform", "deaot_t", "deaot_b", "deaot_l"),
    "teacher.name": ("label_propagation", "deformable"),
    "teacher.encoder": ("resnet", "vit_small", "vit_base"),
    "teacher.patch_size": (8, 16),
    "distill.ref_masks": ("pseudo", "annotation"),
    "distill.att_branches": ("long", "short", "both"),
    "eval.final_checkpoint": ("best", "last"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "trainer.precision": PRECISIONS,
    "trainer.profiler": (None, "simple", "advanced", "pytorch", "xla"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
}
DAVIS_CHOICES: dict[str, tuple[Any, ...]] = {
    "data.year": (2016, 2017),
    "data.resolution": ("480p", "Full-Resolution"),
}
# lightning.Trainer arguments that dvos sets from other keys: where to set them instead.
TRAINER_OWNED = {
    "default_root_dir": "run_dir",
    "logger": "logger.*",
    "callbacks": "callbacks.*",
    "plugins": "callbacks.checkpoint",
    "enable_checkpointing": "callbacks.checkpoint",
    "enable_progress_bar": "callbacks.progress_bar",
}


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts: bounds (open or closed), null or not; `text` says it in words
    where the bounds alone would not."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    null: bool = False
    text: str = ""

    def holds(self, value: Any) -> bool:
        if value is None:
            return self.null
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def words(self) -> str:
        if self.text:
            return self.text
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            words = f"in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            words = f"{'>' if self.open_low else '≥'} {self.low:g}"
        else:
            words = f"{'<' if self.open_high else '≤'} {self.high:g}"
        return words + (" (or null)" if self.null else "")


def _at_least(low: float, **kwargs: Any) -> Range:
    return Range(low=low, **kwargs)


_POSITIVE = Range(low=0, open_low=True)
_SHARE = Range(low=0, high=1)  # a probability or a ratio
_STEPS = Range(low=-1, text="≥ -1 (-1: no limit)")
_PIXELS = Range(low=MIN_MODEL_SIZE, null=True, text=f"at least {MIN_MODEL_SIZE} pixels (or null)")

RANGES: dict[str, Range] = {
    "seed": Range(low=0, high=2**32 - 1, text="in [0, 2³² − 1]"),
    **{f"data.{key}": _at_least(1) for key in ("max_gap", "clips_per_video", "batch_size")},
    "data.clip_len": _at_least(2),
    "data.reference_gap": _at_least(1, null=True),
    **{f"data.{key}": _SHARE for key in ("reverse_prob", "hflip_p", "photometric_p")},
    "data.num_workers": _at_least(0),
    "data.decord_threads": _at_least(0, text="≥ 0 (0: decord's default)"),
    **{f"data.synth.{key}": _at_least(1) for key in ("num_train", "num_val", "train_frames", "val_frames")},
    **{f"data.synth.{key}": _at_least(MIN_MODEL_SIZE) for key in ("height", "width")},
    **{f"model.{key}": _at_least(1) for key in ("d_model", "max_objects", "num_heads", "num_groups")},
    **{f"model.{key}": _at_least(1) for key in ("deform_stride", "offset_kernel", "decoder_dim")},
    "model.offset_range": _POSITIVE,
    "model.ffn_ratio": _at_least(0, text="≥ 0 (0: no feed-forward)"),
    "model.permute_slots": _at_least(1, null=True, text="≥ 1 (null: all model.max_objects slots)"),
    "model.attention_scale": _at_least(0, text="≥ 0 (0: q·k/√d)"),
    "model.attention_topk": _at_least(0, text="≥ 0 (0: all points)"),
    "teacher.topk": _at_least(1),
    "teacher.radius": _at_least(0),
    "teacher.temperature": _POSITIVE,
    "teacher.n_recent": _at_least(0),
    "distill.num_segments": _at_least(2),
    "distill.min_width": _at_least(1, text="≥ 1 (1: any piece)"),
    "distill.tau": _POSITIVE,
    "distill.ce_hard_ratio": Range(low=0, high=1, open_low=True),
    "distill.teacher_scale": _at_least(1),
    **{f"distill.{key}": _SHARE for key in ("memory_swap_prob", "occluder_prob")},
    **{
        f"distill.{key}": _at_least(0)
        for key in (
            *("position_weight", "feature_weight", "colour_weight", "min_contrast", "refine_iterations"),
            *("lambda_att", "lambda_inter", "lambda_intra", "lambda_ce", "lambda_jaccard", "lambda_ref"),
        )
    },
    "optim.lr": _POSITIVE,
    **{f"optim.{key}": _at_least(0) for key in ("encoder_lr_ratio", "weight_decay", "warmup_steps")},
    "optim.poly_power": _at_least(0),
    "optim.min_lr_ratio": _SHARE,
    "optim.ema_decay": Range(low=0, high=1, open_high=True),
    "optim.max_non_finite": _at_least(1),
    **{f"eval.{key}": _PIXELS for key in ("max_size", "min_size", "val_max_size", "val_min_size")},
    "eval.attention_topk": _at_least(0, null=True, text="≥ 0 (0: all points) or null"),
    "eval.long_term_weight": Range(low=0, high=2, null=True, text="in [0, 2] (1: as trained) or null"),
    **{f"pretrain.{key}": _at_least(1) for key in ("stem_width", "head_dim", "max_steps", "batch_size")},
    "pretrain.clip_len": _at_least(2),
    "pretrain.temperature": _POSITIVE,
    "pretrain.edge_dropout": Range(low=0, high=1, open_high=True),
    "pretrain.lr": _POSITIVE,
    **{f"pretrain.{key}": _at_least(0) for key in ("weight_decay", "warmup_steps")},
    "trainer.num_nodes": _at_least(1),
    "trainer.max_epochs": _STEPS,
    "trainer.max_steps": _STEPS,
    "trainer.min_epochs": _at_least(0, null=True),
    "trainer.min_steps": _at_least(0, null=True),
    "trainer.check_val_every_n_epoch": _at_least(1, null=True),
    "trainer.log_every_n_steps": _at_least(1),
    "trainer.gradient_clip_val": _at_least(0, null=True),
    "trainer.accumulate_grad_batches": _at_least(1),
    "trainer.num_sanity_val_steps": Range(low=-1, text="≥ -1 (-1: all)"),
    "trainer.reload_dataloaders_every_n_epochs": _at_least(0),
    "callbacks.checkpoint_every_n_steps": _at_least(0, text="≥ 0 (0: only at the end)"),
    "callbacks.attention_every_n_steps": _at_least(1),
    "callbacks.num_overlays": _at_least(0),
}

_MISSING = object()


def _lookup(values: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return _MISSING
        values = values[part]
    return values


def _show(value: Any) -> str:
    """A config value as the user wrote it: 3 rather than 3.0 for a float key."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _listing(choices: tuple[Any, ...]) -> str:
    return ", ".join("null" if choice is None else str(choice) for choice in choices)


def check_config(cfg: DictConfig) -> None:
    """Every value in its range, every choice among its values, every `trainer.*` an argument of
    `lightning.Trainer`: the first problem as a one-line `ConfigError` naming the key."""
    values = to_dict(cfg)
    choices = dict(CHOICES)
    if _lookup(values, "data.format") == "davis":
        choices.update(DAVIS_CHOICES)
    for key, allowed in choices.items():
        value = _lookup(values, key)
        if value is not _MISSING and value not in allowed:
            raise ConfigError(f"{key} must be one of {_listing(allowed)}, got {value!r}")
    for key, rule in RANGES.items():
        value = _lookup(values, key)
        if value is not _MISSING and not rule.holds(value):
            raise ConfigError(f"{key} must be {rule.words()}, got {_show(value)}")
    for check in (_check_sizes, _check_model, _check_pretrain, _check_trainer_values, _check_trainer_keys):
        problem = check(values)
        if problem:
            raise ConfigError(problem)


def _is_size(value: Any, low: float = MIN_MODEL_SIZE) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(Range(low=low).holds(side) for side in value)


def _check_sizes(values: dict) -> str | None:
    """data.crop_size, data.scale, pretrain.crop_size and the jitter inside it."""
    crop, scale = values["data"]["crop_size"], values["data"]["scale"]
    if not _is_size(crop):
        return f"data.crop_size must be [height, width] of at least {MIN_MODEL_SIZE} pixels each, got {crop}"
    if not (_is_size(scale, 0) and 0.0 < scale[0] <= scale[1] <= 1.0):
        return f"data.scale must be [low, high] with 0 < low <= high <= 1 of a frame's area, got {scale}"
    pretrain = values["pretrain"]
    if not _is_size(pretrain["crop_size"]):
        return (
            f"pretrain.crop_size must be [height, width] of at least {MIN_MODEL_SIZE} pixels each, "
            f"got {pretrain['crop_size']}"
        )
    smallest = min(pretrain["crop_size"])
    if not 0 <= pretrain["spatial_jitter"] <= smallest - 8:
        return (
            f"pretrain.spatial_jitter must be in [0, {smallest - 8}] pixels (crops of {smallest} px keep "
            f"at least 8), got {pretrain['spatial_jitter']}"
        )
    return None


def _check_model(values: dict) -> str | None:
    """The student's sizes that depend on each other, and the pseudo-objects it can hold."""
    model = values["model"]
    if model["d_model"] % model["num_heads"]:
        return (
            f"model.d_model ({model['d_model']}) must be divisible by model.num_heads ({model['num_heads']})"
        )
    if model["num_heads"] % model["num_groups"]:
        return (
            f"model.num_heads ({model['num_heads']}) must be divisible by model.num_groups "
            f"({model['num_groups']})"
        )
    if model["offset_kernel"] % 2 == 0:
        return f"model.offset_kernel must be odd, got {model['offset_kernel']}"
    labels = model["max_objects"] + 1
    if model["propagation_init"] and model["d_model"] < labels:
        return (
            f"model.d_model must be ≥ model.max_objects + 1 = {labels} with model.propagation_init, "
            f"got {model['d_model']}"
        )
    segments = values["distill"]["num_segments"]
    if segments > labels:
        return f"distill.num_segments must be in [2, model.max_objects + 1 = {labels}], got {segments}"
    return None


def _check_pretrain(values: dict) -> str | None:
    """The teacher ResNet's stages: one width and one depth each, all ≥ 1."""
    widths, depths = values["pretrain"]["widths"], values["pretrain"]["depths"]
    if not widths or len(widths) != len(depths) or min(widths + depths) < 1:
        return f"pretrain.widths and pretrain.depths must be lists of the same length of values ≥ 1, got {widths} and {depths}"
    return None


def _check_trainer_values(values: dict) -> str | None:
    """The `trainer.*` keys that take several kinds of value."""
    trainer = values["trainer"]
    if not _devices_ok(trainer.get("devices")):
        return (
            "trainer.devices must be a count ≥ 1, -1 (all), auto, or a list of device ids, "
            f"got {trainer.get('devices')!r}"
        )
    interval = trainer.get("val_check_interval")
    number = isinstance(interval, (int, float)) and not isinstance(interval, bool)
    if number and not (interval >= 1 if isinstance(interval, int) else 0 < interval <= 1):
        return (
            "trainer.val_check_interval must be a share of an epoch in (0, 1], a number of steps ≥ 1, "
            f"or null, got {interval}"
        )
    dev_run = trainer.get("fast_dev_run")
    if not isinstance(dev_run, bool) and not (isinstance(dev_run, int) and dev_run >= 0):
        return f"trainer.fast_dev_run must be true, false or a number of batches ≥ 0, got {dev_run!r}"
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        limit = trainer.get(key)
        if limit is None:
            continue
        if isinstance(limit, bool) or not (
            (isinstance(limit, int) and limit >= 0) or (isinstance(limit, float) and 0 <= limit <= 1)
        ):
            return f"trainer.{key} must be a share in [0.0, 1.0], a number of batches ≥ 0, or null, got {limit!r}"
    return _max_time_problem(trainer.get("max_time"))


def _devices_ok(devices: Any) -> bool:
    """Lightning's forms of `devices`: a count, -1, "auto", ids as a list or as "0,1"."""
    if devices == "auto":
        return True
    if isinstance(devices, str):
        parts = [part.strip() for part in devices.split(",") if part.strip()]
        if not parts or not all(part.lstrip("-").isdigit() for part in parts):
            return False
        devices = [int(part) for part in parts] if "," in devices else int(parts[0])
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    return (
        isinstance(devices, list)
        and bool(devices)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    )


def _max_time_problem(max_time: Any) -> str | None:
    """trainer.max_time: DD:HH:MM:SS, a number of seconds (YAML reads 1:00:00 as 3600), or a mapping
    of timedelta arguments (days, hours, minutes, seconds)."""
    if max_time is None:
        return None
    if isinstance(max_time, int) and not isinstance(max_time, bool) and max_time > 0:
        return None
    if isinstance(max_time, str):
        parts = max_time.strip().split(":")
        if len(parts) == 4 and all(part.isdigit() for part in parts) and any(int(part) for part in parts):
            return None
    if isinstance(max_time, dict) and max_time:
        allowed = {"days", "hours", "minutes", "seconds", "weeks", "milliseconds", "microseconds"}
        if set(max_time) <= allowed and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in max_time.values()
        ):
            return None
    return f"trainer.max_time must be DD:HH:MM:SS (e.g. 00:12:00:00), seconds or {{hours: N, ...}}, got {max_time!r}"


def _check_trainer_keys(values: dict) -> str | None:
    """Keys beyond the schema's must be arguments of `lightning.Trainer`, of a type it takes."""
    extra = {key: value for key, value in values["trainer"].items() if key not in _SCHEMA_TRAINER_KEYS}
    if not extra:
        return None  # the schema's keys are typed by the schema: no need to import Lightning
    import lightning.pytorch as pl

    parameters = {
        name: parameter.annotation
        for name, parameter in inspect.signature(pl.Trainer.__init__).parameters.items()
        if name != "self"
    }
    for key, value in extra.items():
        if key in TRAINER_OWNED:
            return f"trainer.{key} is set by dvos: use {TRAINER_OWNED[key]} instead"
        if key not in parameters:
            close = difflib.get_close_matches(key, list(parameters), n=3, cutoff=0.6)
            hint = f"; did you mean: {', '.join(f'trainer.{name}' for name in close)}?" if close else ""
            return f"unknown config key 'trainer.{key}': not an argument of lightning.Trainer{hint}"
        if key != "max_time" and not _fits(value, parameters[key]):
            return f"trainer.{key} must be {_describe(parameters[key])}, got {value!r}"
    return None


_SCHEMA_TRAINER_KEYS = {f.name for f in fields(TrainerConfig)}


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a config value (None, bool, int, float, str, list, dict) is of a type annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(annotation, type) and isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    """A type annotation in words: `Optional[int]` → "int or null"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if annotation is type(None):
        return "null"
    if annotation is bool:
        return "true or false"
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def to_dict(cfg: DictConfig | ListConfig) -> dict:
    """The fully resolved config as plain Python containers (for logging and saving)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML, atomically."""
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def cpu_model() -> str:
    """The processor's model name (`/proc/cpuinfo` on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def source_commit() -> str:
    """The git commit of the dvos source tree ("<hash>+dirty" with uncommitted changes; "unknown"
    outside a git checkout, e.g. an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def environment_info() -> dict[str, str]:
    """Versions, source commit and machine every run logs next to its config."""
    import datetime as _dt

    import lightning
    import torch

    return {
        "dvos": __version__,
        "commit": source_commit(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
