"""DAVIS semi-supervised evaluation: read a ground-truth tree and a prediction folder, score J&F.

The rules of the official davis2017-evaluation toolkit (docs/DESIGN.md, "J&F") live in one place,
`score_sequence`, used both by the folder evaluation (`evaluate_sequence`, `evaluate_davis`, the
`dvos eval-masks` command) and by in-memory evaluation (`evaluate_arrays`: training validation and
`JFMetric`):

- void (255) ground-truth pixels count as background; objects are 1..K, K = the largest id of the
  first ground-truth frame; DAVIS-2016 mode merges every id into object 1;
- frames 1..T−2 are scored (the first and last prediction frames are never read);
- a predicted id above K (or 255) is an error; objects never predicted score as empty masks.

Layout: `GT/Annotations/480p/<seq>/*.png`, `GT/ImageSets/<year>/<split>.txt`,
`PRED/<seq>/<frame>.png`. Outputs: `global_results-<split>.csv`,
`per-sequence_results-<split>.csv`, `results.json`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import pickle
import queue
import signal
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from dvos.metrics.jf import DEFAULT_BOUND_TH, region_and_boundary, statistics
from dvos.utils.errors import DataError, DvosError
from dvos.utils.io import atomic_write, ensure_writable_dir, write_json
from dvos.utils.masks import VOID_ID, read_mask

YEARS = (2016, 2017)
STATISTICS = ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
GLOBAL_COLUMNS = ("J&F-Mean", *STATISTICS)
SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
RESULTS_JSON = "results.json"
# Worker processes start with "spawn": a forked copy of a process that already runs torch or
# OpenMP threads can deadlock, and the workers only need numpy, OpenCV and Pillow (quick to load).
POOL_START_METHOD = "spawn"


# --------------------------------------------------------------------------------------------
# The rules, on arrays
# --------------------------------------------------------------------------------------------


def _check_year(year: int) -> int:
    if int(year) not in YEARS:
        raise DataError(f"year must be one of {', '.join(map(str, YEARS))}, got {year}")
    return int(year)


def _num_objects(gt_first: np.ndarray, year: int) -> int:
    """K: the largest id of the first ground-truth frame, void (255) not counted; 0 or 1 for 2016."""
    objects = gt_first != VOID_ID
    if year == 2016:
        return int(np.any(objects & (gt_first != 0)))
    return int(np.max(gt_first, where=objects, initial=0))


def _object_mask(ids: np.ndarray, object_id: int, year: int) -> np.ndarray:
    """Boolean mask of one object in `... × H × W` ids. Void (255) never equals an object id, so it
    falls into the background, as in the toolkit; 2016 merges every other non-zero id."""
    if year == 2016:
        return (ids != 0) & (ids != VOID_ID)
    return ids == object_id


def _check_prediction_ids(pred: np.ndarray, num_objects: int, year: int, sources: Sequence[str]) -> None:
    """Raise a DataError naming the first scored prediction frame with 255 or an id above K.

    Args:
        pred: `N × H × W` uint8 prediction ids of the scored frames (as read, before merging).
        sources: what to call each frame in the message (file paths or "prediction frame i").
    """
    if pred.shape[0] == 0:
        return
    frame_max = pred.reshape(pred.shape[0], -1).max(axis=1)
    # 2016: every non-void id is merged into object 1, which must exist in the ground truth.
    limit = (254 if num_objects else 0) if year == 2016 else num_objects
    bad = np.flatnonzero(frame_max > limit)
    if bad.size == 0:
        return
    frame = int(bad[0])
    values = np.unique(pred[frame])
    if VOID_ID in values:
        raise DataError(
            f"{sources[frame]}: prediction holds the void id 255; predictions hold object ids 0..K only"
        )
    offending = int(values[values > limit].min())
    known = f"{num_objects} object(s) (ids 1..{num_objects})" if num_objects else "no object"
    raise DataError(
        f"{sources[frame]}: prediction holds object id {offending} but the first ground-truth frame has {known}"
    )


def score_sequence(
    gt_first: np.ndarray,
    gt_scored: np.ndarray,
    pred_scored: np.ndarray,
    *,
    sequence: str,
    frame_ids: Sequence[str],
    year: int = 2017,
    bound_th: float = DEFAULT_BOUND_TH,
    pred_sources: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score one sequence from its first ground-truth frame and its scored frames (1..T−2).

    This is the one implementation of the toolkit's rules; both the folder and the in-memory
    paths call it. The arrays are not modified.

    Args:
        gt_first: `H × W` uint8 ids of ground-truth frame 0 (255 = void); gives K.
        gt_scored: `N × H × W` uint8 ground-truth ids of frames 1..T−2 (255 = void).
        pred_scored: `N × H × W` uint8 predicted ids of the same frames.
        sequence: name used in the object keys `<sequence>_<k>`.
        frame_ids: the N scored frame names ("00001", ...).
        year: 2017 (objects kept apart) or 2016 (all objects merged into one).
        bound_th: F boundary tolerance (fraction of the image diagonal).
        pred_sources: per scored frame, how to name it in an error (default "prediction frame i").

    Returns:
        `{"<sequence>_<k>": {"J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay",
        "frames", "J", "F"}}` for k = 1..K, floats as Python floats.
    """
    year = _check_year(year)
    n_scored = gt_scored.shape[0]
    if gt_first.ndim != 2 or gt_scored.ndim != 3 or gt_scored.shape[1:] != gt_first.shape:
        raise ValueError(
            f"ground truth shapes do not match: first {gt_first.shape}, scored {gt_scored.shape}"
        )
    if pred_scored.shape != gt_scored.shape:
        raise ValueError(f"prediction shape {pred_scored.shape} differs from ground truth {gt_scored.shape}")
    if len(frame_ids) != n_scored:
        raise ValueError(f"{len(frame_ids)} frame ids for {n_scored} scored frames")
    if pred_sources is None:
        pred_sources = [f"{sequence}: prediction frame {frame_id}" for frame_id in frame_ids]

    num_objects = _num_objects(gt_first, year)
    _check_prediction_ids(pred_scored, num_objects, year, pred_sources)

    objects: dict[str, dict[str, Any]] = {}
    for object_id in range(1, num_objects + 1):
        # A predicted id that never occurs gives an all-False mask: the toolkit's zero padding.
        region, boundary = region_and_boundary(
            _object_mask(gt_scored, object_id, year),
            _object_mask(pred_scored, object_id, year),
            bound_th=bound_th,
        )
        j_mean, j_recall, j_decay = statistics(region)
        f_mean, f_recall, f_decay = statistics(boundary)
        objects[f"{sequence}_{object_id}"] = {
            "J-Mean": j_mean,
            "J-Recall": j_recall,
            "J-Decay": j_decay,
            "F-Mean": f_mean,
            "F-Recall": f_recall,
            "F-Decay": f_decay,
            "frames": list(frame_ids),
            "J": region.tolist(),
            "F": boundary.tolist(),
        }
    return objects


def _as_id_stack(ids: Any, name: str) -> np.ndarray:
    """A `T × H × W` uint8 view or copy of an id array (numpy, torch tensor or nested lists)."""
    if hasattr(ids, "detach"):  # torch.Tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise DataError(f"{name} must be T × H × W object ids, got shape {ids.shape}")
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{name} must hold integer object ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise DataError(f"{name} ids must be in 0..255, got {ids.min()}..{ids.max()}")
    return ids.astype(np.uint8, copy=False)


def evaluate_arrays(
    gt: Any,
    pred: Any,
    *,
    sequence: str = "sequence",
    year: int = 2017,
    frame_ids: Sequence[str] | None = None,
    bound_th: float = DEFAULT_BOUND_TH,
) -> dict[str, dict[str, Any]]:
    """Score one sequence held in memory with the toolkit's rules (see `score_sequence`).

    Args:
        gt: `T × H × W` ground-truth ids of every frame (0 background, 1..K objects, 255 void).
        pred: `T × H × W` predicted ids of every frame; frames 0 and T−1 are ignored.
        sequence: name used in the object keys.
        year: 2017 or 2016 (objects merged).
        frame_ids: the T frame names (default "00000", "00001", ...).
        bound_th: F boundary tolerance.

    Returns:
        per-object results as `score_sequence` returns them.
    """
    gt_ids = _as_id_stack(gt, "gt")
    pred_ids = _as_id_stack(pred, "pred")
    if pred_ids.shape != gt_ids.shape:
        raise DataError(
            f"{sequence}: prediction shape {pred_ids.shape} differs from ground truth {gt_ids.shape}"
        )
    n_frames = gt_ids.shape[0]
    if n_frames < 3:
        raise DataError(
            f"{sequence}: {n_frames} frame(s); at least 3 are needed (the first and last frames are not scored)"
        )
    if frame_ids is None:
        frame_ids = [f"{index:05d}" for index in range(n_frames)]
    elif len(frame_ids) != n_frames:
        raise DataError(f"{sequence}: {len(frame_ids)} frame ids for {n_frames} frames")
    return score_sequence(
        gt_ids[0],
        gt_ids[1:-1],
        pred_ids[1:-1],
        sequence=sequence,
        frame_ids=list(frame_ids)[1:-1],
        year=year,
        bound_th=bound_th,
    )


# --------------------------------------------------------------------------------------------
# Folders: which files, checked before anything is computed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceFiles:
    """The files one sequence's evaluation reads.

    `gt_files` are frames 0..T−2 (the last ground-truth frame only marks the end);
    `pred_files` the predictions of frames 1..T−2, named `frame_ids`.
    """

    name: str
    gt_files: tuple[Path, ...]
    pred_files: tuple[Path, ...]
    frame_ids: tuple[str, ...]


def annotation_dir(gt_root: str | os.PathLike, sequence: str) -> Path:
    return Path(gt_root) / "Annotations" / "480p" / sequence


def _png_names(folder: Path) -> list[str]:
    """Sorted `*.png` names in `folder`, skipping hidden files like `glob` does."""
    with os.scandir(folder) as entries:
        return sorted(
            entry.name
            for entry in entries
            if entry.name.endswith(".png") and not entry.name.startswith(".") and entry.is_file()
        )


def resolve_sequences(
    gt_root: str | os.PathLike,
    *,
    year: int = 2017,
    split: str = "val",
    sequences: Sequence[str] | None = None,
) -> list[str]:
    """The sequences to evaluate: `sequences` if given, else `ImageSets/<year>/<split>.txt`.

    Raises:
        DataError: missing ground-truth root or split file, empty list, or a sequence without an
            annotation folder (all such names in one line).
    """
    year = _check_year(year)
    gt_root = Path(gt_root)
    if not (gt_root / "Annotations" / "480p").is_dir():
        raise DataError(f"{gt_root}: not a DAVIS ground-truth root (no Annotations/480p folder)")
    if sequences is None:
        split_file = gt_root / "ImageSets" / str(year) / f"{split}.txt"
        try:
            text = split_file.read_text()
        except OSError as err:
            raise DataError(f"{split_file}: cannot read the sequence list ({err.strerror or err})") from err
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise DataError(f"{split_file}: the sequence list is empty")
    else:
        names = [name.strip() for name in sequences if name.strip()]
        if not names:
            raise DataError("no sequence given")
    names = list(dict.fromkeys(names))  # drop repeats, keep the order
    unknown = [name for name in names if not annotation_dir(gt_root, name).is_dir()]
    if unknown:
        raise DataError(
            f"unknown sequence(s) {', '.join(unknown)}: no folder {annotation_dir(gt_root, unknown[0])}"
        )
    return names


def sequence_files(gt_root: str | os.PathLike, pred_root: str | os.PathLike, sequence: str) -> SequenceFiles:
    """List and check the files of one sequence (existence only; contents are checked when read).

    Raises:
        DataError: empty or too short annotation folder, missing prediction folder or frame.
    """
    gt_dir = annotation_dir(gt_root, sequence)
    gt_names = _png_names(gt_dir)
    if not gt_names:
        raise DataError(f"{gt_dir}: no ground-truth PNG in the annotation folder")
    if len(gt_names) < 3:
        raise DataError(
            f"{gt_dir}: {len(gt_names)} ground-truth frame(s); at least 3 are needed "
            "(the first and last frames are not scored)"
        )
    pred_dir = Path(pred_root) / sequence
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder missing for sequence {sequence!r}")
    scored = gt_names[1:-1]
    pred_files = [pred_dir / name for name in scored]
    missing = [path for path in pred_files if not path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more frame(s) of {sequence!r})" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: prediction frame missing{more}")
    return SequenceFiles(
        name=sequence,
        gt_files=tuple(gt_dir / name for name in gt_names[:-1]),
        pred_files=tuple(pred_files),
        frame_ids=tuple(name[: -len(".png")] for name in scored),
    )


def _read_stack(paths: Sequence[Path], shape: tuple[int, int], reference: Path, what: str) -> np.ndarray:
    """Read id masks into an `N × H × W` uint8 stack; a different size is a DataError."""
    stack = np.empty((len(paths), *shape), dtype=np.uint8)
    for index, path in enumerate(paths):
        mask, _ = read_mask(path)
        if mask.shape != shape:
            raise DataError(
                f"{path}: {what} is {mask.shape[1]}×{mask.shape[0]} but the ground truth "
                f"{reference.name} is {shape[1]}×{shape[0]} (width×height)"
            )
        stack[index] = mask
    return stack


def evaluate_files(
    files: SequenceFiles, *, year: int = 2017, bound_th: float = DEFAULT_BOUND_TH
) -> dict[str, dict[str, Any]]:
    """Read and score one sequence listed by `sequence_files`."""
    gt_first, _ = read_mask(files.gt_files[0])
    shape = gt_first.shape
    reference = files.gt_files[0]
    gt_scored = _read_stack(files.gt_files[1:], shape, reference, "ground-truth frame")
    pred_scored = _read_stack(files.pred_files, shape, reference, "prediction")
    return score_sequence(
        gt_first,
        gt_scored,
        pred_scored,
        sequence=files.name,
        frame_ids=files.frame_ids,
        year=year,
        bound_th=bound_th,
        pred_sources=[str(path) for path in files.pred_files],
    )


def evaluate_sequence(
    gt_root: str | os.PathLike,
    pred_root: str | os.PathLike,
    sequence: str,
    *,
    year: int = 2017,
    bound_th: float = DEFAULT_BOUND_TH,
) -> dict[str, dict[str, Any]]:
    """Score `PRED/<sequence>/` against `GT/Annotations/480p/<sequence>/`.

    Returns:
        per-object results keyed `<sequence>_<k>` (see `score_sequence`).
    """
    resolve_sequences(gt_root, year=year, sequences=[sequence])
    return evaluate_files(sequence_files(gt_root, pred_root, sequence), year=year, bound_th=bound_th)


# --------------------------------------------------------------------------------------------
# A whole dataset
# --------------------------------------------------------------------------------------------


def summarize(objects: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Global numbers: each statistic's mean over all objects; J&F-Mean = (J-Mean + F-Mean) / 2."""
    if not objects:
        raise DataError("no object to evaluate: the first ground-truth frame of every sequence is empty")
    means = {name: float(np.mean([scores[name] for scores in objects.values()])) for name in STATISTICS}
    return {"J&F-Mean": (means["J-Mean"] + means["F-Mean"]) / 2.0, **means}


def default_workers(n_sequences: int) -> int:
    """min(usable CPUs, number of sequences), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_sequences))


def _claim(next_task: Any, n_tasks: int) -> int | None:
    """Take the next task index from the shared counter, None when all are taken."""
    with next_task.get_lock():
        index = next_task.value
        if index >= n_tasks:
            return None
        next_task.value = index + 1
    return index


def _stop_claims(next_task: Any, n_tasks: int) -> None:
    with next_task.get_lock():
        next_task.value = n_tasks


def _sendable(err: Exception, files: SequenceFiles) -> Exception:
    """The error to send to the parent: a DvosError as it is, anything else with the worker's traceback."""
    if isinstance(err, DvosError):
        try:
            pickle.loads(pickle.dumps(err))
            return err
        except Exception:
            return DvosError(str(err))
    return RuntimeError(f"worker process failed on sequence {files.name!r}:\n{traceback.format_exc()}")


def _worker_main(
    plans: Sequence[SequenceFiles], year: int, bound_th: float, next_task: Any, outcomes: Any
) -> None:
    """Body of a worker process: claim sequences until none is left, send (index, result, error)."""
    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the workers
    cv2.setNumThreads(1)  # one process per core already
    while (index := _claim(next_task, len(plans))) is not None:
        try:
            outcomes.put((index, evaluate_files(plans[index], year=year, bound_th=bound_th), None))
        except Exception as err:
            _stop_claims(next_task, len(plans))
            outcomes.put((index, None, _sendable(err, plans[index])))
            return


def _next_outcome(outcomes: Any, processes: Sequence[Any]) -> tuple[int, Any, Exception | None]:
    """Wait for the next (index, result, error) from the workers; fail if none can come any more."""
    while True:
        try:
            return outcomes.get(timeout=0.2)
        except queue.Empty:
            pass
        crashed = [process.exitcode for process in processes if process.exitcode not in (None, 0)]
        if crashed:
            raise RuntimeError(
                f"a worker process died (exit code {crashed[0]}) before reporting its sequence"
            )
        if all(process.exitcode == 0 for process in processes):
            # Whatever the finished workers sent is in the pipe by now: one last look.
            try:
                return outcomes.get(timeout=1.0)
            except queue.Empty:
                raise RuntimeError("the worker processes ended without reporting every sequence") from None


def _evaluate_shared(
    plans: Sequence[SequenceFiles], workers: int, *, year: int, bound_th: float
) -> list[dict[str, dict[str, Any]]]:
    """Evaluate `plans` with this process and `workers − 1` spawned processes sharing one task list.

    This process starts on the first task at once instead of waiting for the workers to start up
    (about 0.2 s each), so even a few short sequences gain from a second core. The largest
    sequences go first, which balances the loads; the first error stops everything.
    """
    order = sorted(range(len(plans)), key=lambda index: -len(plans[index].pred_files))
    tasks = [plans[index] for index in order]
    context = get_context(POOL_START_METHOD)
    next_task = context.Value("i", 0)
    outcomes = context.Queue()
    processes = [
        context.Process(target=_worker_main, args=(tasks, year, bound_th, next_task, outcomes), daemon=True)
        for _ in range(workers - 1)
    ]
    done: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        for process in processes:
            process.start()
        while (index := _claim(next_task, len(tasks))) is not None:
            try:
                done[index] = evaluate_files(tasks[index], year=year, bound_th=bound_th)
            except BaseException:
                _stop_claims(next_task, len(tasks))
                raise
        while len(done) < len(tasks):
            index, result, error = _next_outcome(outcomes, processes)
            if error is not None:
                raise error
            done[index] = result
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()
        outcomes.close()
    results: list[dict[str, dict[str, Any]]] = [{}] * len(plans)
    for position, index in enumerate(order):
        results[index] = done[position]
    return results


def evaluate_davis(
    gt_root: str | os.PathLike,
    pred_root: str | os.PathLike,
    *,
    year: int = 2017,
    split: str = "val",
    sequences: Sequence[str] | None = None,
    workers: int | None = None,
    bound_th: float = DEFAULT_BOUND_TH,
) -> dict[str, Any]:
    """Evaluate a prediction folder against a DAVIS ground-truth tree (semi-supervised task).

    Every sequence's folders and frame files are checked before anything is computed; sequences
    are then scored by `workers` processes (default min(#CPU, #sequences)): this one and
    `workers − 1` spawned ones; 1 = in this process only. Spawned workers re-import the caller's
    main module, so a script calling this with workers > 1 needs the usual
    `if __name__ == "__main__":` guard.

    Returns:
        `{"global": {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall",
        "F-Decay"}, "objects": {"<seq>_<k>": {...statistics, "frames", "J", "F"}}}`.

    Raises:
        DataError: anything wrong with the inputs, in one line naming the file.
    """
    year = _check_year(year)
    pred_root = Path(pred_root)
    if not pred_root.is_dir():
        raise DataError(f"{pred_root}: prediction folder not found")
    names = resolve_sequences(gt_root, year=year, split=split, sequences=sequences)
    plans = [sequence_files(gt_root, pred_root, name) for name in names]
    if workers is None:
        workers = default_workers(len(plans))
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    workers = min(workers, len(plans))

    if workers == 1:
        per_sequence = [evaluate_files(plan, year=year, bound_th=bound_th) for plan in plans]
    else:
        per_sequence = _evaluate_shared(plans, workers, year=year, bound_th=bound_th)

    objects = {key: scores for sequence_objects in per_sequence for key, scores in sequence_objects.items()}
    return {"global": summarize(objects), "objects": objects}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def result_paths(out_dir: str | os.PathLike, split: str) -> dict[str, Path]:
    """The three files an evaluation writes in `out_dir`."""
    out_dir = Path(out_dir)
    return {
        "global": out_dir / f"global_results-{split}.csv",
        "per_sequence": out_dir / f"per-sequence_results-{split}.csv",
        "json": out_dir / RESULTS_JSON,
    }


def clear_results(out_dir: str | os.PathLike, split: str) -> None:
    """Delete earlier outputs in `out_dir`, so a failed run never leaves old numbers looking current."""
    for path in result_paths(out_dir, split).values():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise DataError(f"{path}: cannot remove the previous result ({err.strerror or err})") from err


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    # repr of a Python float is the shortest string that reads back to the same float.
    writer.writerows(
        [[value if isinstance(value, str) else repr(float(value)) for value in row] for row in rows]
    )
    return buffer.getvalue()


def write_results(
    results: dict[str, Any],
    out_dir: str | os.PathLike,
    split: str,
    *,
    config: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write `global_results-<split>.csv`, `per-sequence_results-<split>.csv` and `results.json`.

    Earlier versions are removed first and each file is written atomically; values keep full
    precision. `config` (the resolved run settings and versions) is stored in results.json.

    Returns:
        the paths written (see `result_paths`).
    """
    ensure_writable_dir(out_dir)
    paths = result_paths(out_dir, split)
    clear_results(out_dir, split)
    global_row = [results["global"][name] for name in GLOBAL_COLUMNS]
    sequence_rows = [[key, scores["J-Mean"], scores["F-Mean"]] for key, scores in results["objects"].items()]
    with atomic_write(paths["global"]) as handle:
        handle.write(_csv_text(GLOBAL_COLUMNS, [global_row]))
    with atomic_write(paths["per_sequence"]) as handle:
        handle.write(_csv_text(SEQUENCE_COLUMNS, sequence_rows))
    document = {"global": results["global"], "objects": results["objects"]}
    if config is not None:
        document = {"config": config, **document}
    write_json(paths["json"], document)
    return paths


def _cell(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: the global row, then one row per object (3 decimals)."""
    width = max([len("Sequence"), *(len(key) for key in results["objects"])])
    lines = [
        "Global results",
        "  ".join(f"{name:>8}" for name in GLOBAL_COLUMNS),
        "  ".join(f"{_cell(results['global'][name]):>8}" for name in GLOBAL_COLUMNS),
        "",
        "Per object",
        f"{'Sequence':<{width}}  " + "  ".join(f"{name:>8}" for name in STATISTICS),
    ]
    for key, scores in results["objects"].items():
        lines.append(f"{key:<{width}}  " + "  ".join(f"{_cell(scores[name]):>8}" for name in STATISTICS))
    return "\n".join(lines)
