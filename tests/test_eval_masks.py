"""Folder evaluation and `dvos eval-masks`: the official toolkit's numbers on real data, a generated
multi-object tree scored by hand, one-line errors naming the file, no stale results."""

import csv
import json
import multiprocessing
import queue
import shutil
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dvos.cli.main import main  # the `dvos` console script: DvosError → one line, exit 2
from dvos.metrics.evaluation import (
    _worker_main,
    evaluate_arrays,
    evaluate_davis,
    evaluate_sequence,
    format_table,
    sequence_files,
)
from dvos.utils.errors import DataError
from dvos.utils.masks import write_mask

OSVOS_SEQUENCES = ["blackswan", "car-shadow", "dog"]
STATISTICS = ["J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]


# ---------------------------------------------------------------- official numbers (real data)


def test_official_scores_reproduced_through_the_cli(davis_fixture, tmp_path, capsys):
    """The repository's fixture: OSVOS on blackswan and car-shadow, every number of the official
    toolkit (per frame, per object, and the global means over objects) to 1e-9."""
    reference = json.loads((davis_fixture / "osvos" / "official_scores.json").read_text())
    sequences = reference["sequences"]
    out = tmp_path / "eval"
    status = main(
        [
            "eval-masks",
            "--gt",
            str(davis_fixture),
            "--pred",
            str(davis_fixture / "osvos"),
            "--out",
            str(out),
            "--year",
            "2016",
            "--sequences",
            ",".join(sequences),
            "--workers",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "J&F-Mean" in printed and "blackswan_1" in printed
    assert str(out / "global_results-val.csv") in printed

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["year"] == 2016 and results["config"]["sequences"] == sequences
    assert list(results["global"]) == ["J&F-Mean", *STATISTICS]
    # the toolkit's global numbers: means over objects; J&F-Mean the mean of J-Mean and F-Mean
    expected = {name: float(np.mean([entry[name] for entry in reference["objects"]])) for name in STATISTICS}
    expected["J&F-Mean"] = (expected["J-Mean"] + expected["F-Mean"]) / 2
    for name, value in expected.items():
        assert results["global"][name] == pytest.approx(value, abs=1e-9), name
    assert list(results["objects"]) == [entry["key"] for entry in reference["objects"]]
    for entry in reference["objects"]:
        mine = results["objects"][entry["key"]]
        for name in STATISTICS:
            assert mine[name] == pytest.approx(entry[name], abs=1e-9), (entry["key"], name)
        frames = reference["per_frame"][entry["sequence"]]
        assert mine["frames"] == frames["frame_ids"]
        np.testing.assert_allclose(mine["J"], frames["J"][str(entry["object_id"])], rtol=0, atol=1e-9)
        np.testing.assert_allclose(mine["F"], frames["F"][str(entry["object_id"])], rtol=0, atol=1e-9)

    with open(out / "global_results-val.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert len(rows) == 2
    for name, text in zip(rows[0], rows[1]):
        assert float(text) == pytest.approx(expected[name], abs=1e-9)
    with open(out / "per-sequence_results-val.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["Sequence", "J-Mean", "F-Mean"]
    assert [row[0] for row in rows[1:]] == ["blackswan_1", "car-shadow_1"]
    for row, entry in zip(rows[1:], reference["objects"]):
        assert float(row[1]) == pytest.approx(entry["J-Mean"], abs=1e-9)
        assert float(row[2]) == pytest.approx(entry["F-Mean"], abs=1e-9)


def test_official_scores_of_three_sequences(shared_data, tmp_path):
    """The larger reference in ../shared/data: three sequences, the toolkit's own global numbers."""
    reference = json.loads((shared_data / "osvos-reference" / "official_scores.json").read_text())
    results = evaluate_davis(
        shared_data / "davis2016-sample",
        shared_data / "osvos-reference",
        year=2016,
        sequences=OSVOS_SEQUENCES,
    )
    for name, value in reference["global"].items():
        assert results["global"][name] == pytest.approx(value, abs=1e-9), name


def test_one_process_and_two_processes_agree(davis_fixture):
    kwargs = dict(year=2016, sequences=["car-shadow", "blackswan"])
    gt, pred = davis_fixture, davis_fixture / "osvos"
    assert evaluate_davis(gt, pred, workers=1, **kwargs) == evaluate_davis(gt, pred, workers=2, **kwargs)


def test_split_sequence_without_predictions_is_named(shared_data, tmp_path, capsys):
    # ImageSets/2016/val.txt lists libby too, which has no OSVOS predictions.
    argv = ["eval-masks", "--gt", str(shared_data / "davis2016-sample")]
    argv += ["--pred", str(shared_data / "osvos-reference"), "--out", str(tmp_path), "--year", "2016"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    message = (captured.out + captured.err).strip()
    assert message.startswith("dvos: error:") and "libby" in message and "\n" not in message
    with pytest.raises(DataError, match="osvos-reference/libby: prediction folder missing"):
        evaluate_davis(shared_data / "davis2016-sample", shared_data / "osvos-reference", year=2016)


def test_unknown_sequence_is_named(shared_data):
    with pytest.raises(DataError, match="unknown sequence.*swan-lake"):
        evaluate_davis(
            shared_data / "davis2016-sample",
            shared_data / "osvos-reference",
            year=2016,
            sequences=["blackswan", "swan-lake"],
        )


# ---------------------------------------------------------------- generated multi-object tree

HEIGHT, WIDTH = 48, 64  # boundary tolerance ceil(0.008 · 80) = 1 px


def _gt_frame() -> np.ndarray:
    frame = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    frame[2:8, 2:12] = 1  # object 1: predicted exactly
    frame[30:40, 5:25] = 2  # object 2: never predicted
    frame[10:20, 40:50] = 3  # object 3, with a void band below it
    frame[20:30, 40:50] = 255
    return frame


def _pred_frame() -> np.ndarray:
    frame = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    frame[2:8, 2:12] = 1
    frame[10:30, 40:50] = 3  # object 3 plus the void band
    return frame


def make_tree(root: Path, n_frames: int = 5) -> tuple[Path, Path]:
    """DAVIS-layout tree with one 3-object sequence `multi`; predictions for frames 1..T−2 only,
    plus an invalid first frame (id 9), which must never be read."""
    gt_root, pred_root = root / "gt", root / "pred"
    (gt_root / "ImageSets" / "2017").mkdir(parents=True)
    (gt_root / "ImageSets" / "2017" / "val.txt").write_text("multi\n")
    for index in range(n_frames):
        write_mask(gt_root / "Annotations" / "480p" / "multi" / f"{index:05d}.png", _gt_frame())
    for index in range(1, n_frames - 1):
        write_mask(pred_root / "multi" / f"{index:05d}.png", _pred_frame())
    write_mask(pred_root / "multi" / "00000.png", np.full((HEIGHT, WIDTH), 9, dtype=np.uint8))
    return gt_root, pred_root


# By hand (every scored frame alike): object 1 exact → J = F = 1; object 2 missing → J = F = 0;
# object 3: the void band counts as background, so J = 100 / 200 = 0.5, and F = 0.66 with
# boundary precision 33/60, recall 33/40 (see test_metrics_jf.test_boundary_accuracy_by_hand).
EXPECTED_OBJECTS = {  # J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay
    "multi_1": (1.0, 1.0, 0.0, 1.0, 1.0, 0.0),
    "multi_2": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "multi_3": (0.5, 0.0, 0.0, 0.66, 1.0, 0.0),  # J = 0.5 is not > 0.5: recall 0
}
EXPECTED_GLOBAL = {
    "J&F-Mean": (0.5 + 1.66 / 3) / 2,
    "J-Mean": 0.5,
    "J-Recall": 1 / 3,
    "J-Decay": 0.0,
    "F-Mean": 1.66 / 3,
    "F-Recall": 2 / 3,
    "F-Decay": 0.0,
}


def test_multi_object_tree_by_hand(tmp_path):
    gt_root, pred_root = make_tree(tmp_path)
    results = evaluate_davis(gt_root, pred_root, workers=1)
    assert list(results["objects"]) == ["multi_1", "multi_2", "multi_3"]
    for key, expected in EXPECTED_OBJECTS.items():
        scores = results["objects"][key]
        assert scores["frames"] == ["00001", "00002", "00003"]
        for name, value in zip(STATISTICS, expected):
            assert scores[name] == pytest.approx(value, abs=1e-12), (key, name)
    np.testing.assert_allclose(results["objects"]["multi_3"]["J"], [0.5] * 3, rtol=0, atol=1e-15)
    np.testing.assert_allclose(results["objects"]["multi_3"]["F"], [0.66] * 3, rtol=0, atol=1e-12)
    for name, value in EXPECTED_GLOBAL.items():
        assert results["global"][name] == pytest.approx(value, abs=1e-12), name
    assert all(type(value) is float for value in results["global"].values())
    assert "multi_3" in format_table(results)
    # The same rules in memory (frames 0 and T−1 of the prediction are ignored: id 9 is fine there).
    gt = np.stack([_gt_frame()] * 5)
    pred = np.stack(
        [np.full((HEIGHT, WIDTH), 9, np.uint8)] + [_pred_frame()] * 3 + [np.zeros((HEIGHT, WIDTH), np.uint8)]
    )
    assert evaluate_arrays(gt, pred, sequence="multi") == results["objects"]
    assert evaluate_sequence(gt_root, pred_root, "multi") == results["objects"]


def test_void_pixels_count_as_background(tmp_path):
    # Object 1: 20 px; void: 10 px. Calling the void region object 1 adds 10 false positives.
    gt = np.zeros((3, 10, 10), dtype=np.uint8)
    gt[:, 0:4, 0:5] = 1
    gt[:, 6:8, 0:5] = 255
    pred_background = np.where(gt == 1, 1, 0).astype(np.uint8)
    pred_object = np.where(gt > 0, 1, 0).astype(np.uint8)
    for name, pred in {"background": pred_background, "object": pred_object}.items():
        for index in range(3):
            write_mask(tmp_path / "gt" / "Annotations" / "480p" / name / f"{index:05d}.png", gt[index])
            write_mask(tmp_path / "pred" / name / f"{index:05d}.png", pred[index])
    results = evaluate_davis(
        tmp_path / "gt", tmp_path / "pred", sequences=["background", "object"], workers=1
    )
    assert results["objects"]["background_1"]["J"] == [1.0]
    assert results["objects"]["object_1"]["J"] == [pytest.approx(20 / 30, abs=1e-15)]


def test_2016_mode_merges_objects(tmp_path):
    gt_root, pred_root = make_tree(tmp_path)
    (gt_root / "ImageSets" / "2016").mkdir()
    (gt_root / "ImageSets" / "2016" / "val.txt").write_text("multi\n")
    # Frame 0 of the prediction holds id 9 but is never read.
    results = evaluate_davis(gt_root, pred_root, year=2016, workers=1)
    assert list(results["objects"]) == ["multi_1"]
    # Merged GT: 60 + 200 + 100 = 360 px (void excluded); merged prediction: 60 + 200 px, of which
    # 60 + 100 on the GT and 100 on the void band → J = 160 / (360 + 100).
    assert results["objects"]["multi_1"]["J"] == [pytest.approx(160 / 460, abs=1e-15)] * 3


# ---------------------------------------------------------------- errors


def _error(tmp_path, edit, match):
    gt_root, pred_root = make_tree(tmp_path)
    edit(gt_root, pred_root)
    with pytest.raises(DataError, match=match) as info:
        evaluate_davis(gt_root, pred_root, workers=1)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_id_above_k_names_the_file(tmp_path):
    def edit(gt_root, pred_root):
        frame = _pred_frame()
        frame[0, 0] = 4
        write_mask(pred_root / "multi" / "00002.png", frame)

    message = _error(tmp_path, edit, r"multi/00002\.png: prediction holds object id 4")
    assert "3 object(s)" in message


def test_void_id_in_a_prediction_names_the_file(tmp_path):
    def edit(gt_root, pred_root):
        frame = _pred_frame()
        frame[5, 5] = 255
        write_mask(pred_root / "multi" / "00003.png", frame)

    _error(tmp_path, edit, r"multi/00003\.png: prediction holds the void id 255")


def test_rgb_prediction_names_the_file(tmp_path):
    def edit(gt_root, pred_root):
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8), mode="RGB").save(
            pred_root / "multi" / "00001.png"
        )

    _error(tmp_path, edit, r"multi/00001\.png: mask has mode 'RGB'")


def test_missing_frame_names_the_file(tmp_path):
    def edit(gt_root, pred_root):
        (pred_root / "multi" / "00003.png").unlink()

    _error(tmp_path, edit, r"multi/00003\.png: prediction frame missing")


def test_wrong_size_names_the_file(tmp_path):
    def edit(gt_root, pred_root):
        write_mask(pred_root / "multi" / "00002.png", np.zeros((HEIGHT - 8, WIDTH), np.uint8))

    _error(tmp_path, edit, r"multi/00002\.png: prediction is 64×40 but the ground truth 00000\.png is 64×48")


def test_empty_ground_truth_folder_is_named(tmp_path):
    def edit(gt_root, pred_root):
        shutil.rmtree(gt_root / "Annotations" / "480p" / "multi")
        (gt_root / "Annotations" / "480p" / "multi").mkdir()

    _error(tmp_path, edit, r"480p/multi: no ground-truth PNG")


def test_in_memory_errors(tmp_path):
    gt = np.stack([_gt_frame()] * 4)
    pred = np.stack([_pred_frame()] * 4)
    pred[2, 0, 0] = 7
    with pytest.raises(DataError, match="seq: prediction frame 00002: prediction holds object id 7"):
        evaluate_arrays(gt, pred, sequence="seq")
    with pytest.raises(DataError, match="at least 3"):
        evaluate_arrays(gt[:2], pred[:2])


def test_failed_run_leaves_no_stale_results(tmp_path, capsys):
    gt_root, pred_root = make_tree(tmp_path)
    out = tmp_path / "eval"
    argv = ["eval-masks", "--gt", str(gt_root), "--pred", str(pred_root), "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    names = ["global_results-val.csv", "per-sequence_results-val.csv", "results.json"]
    assert all((out / name).is_file() for name in names)
    (pred_root / "multi" / "00002.png").unlink()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "dvos: error:" in captured.out + captured.err and "00002.png" in captured.out + captured.err
    assert not any((out / name).exists() for name in names)
    assert not list(out.glob(".*tmp*"))


def test_worker_reports_errors_and_stops_the_others(tmp_path):
    # The body of a worker process, run here: it claims sequences from the shared counter and sends
    # the one-line DataError back instead of dying; the counter is then closed for everyone.
    gt_root, pred_root = make_tree(tmp_path)
    (pred_root / "multi" / "00002.png").unlink()
    (pred_root / "multi" / "00002.png").write_bytes(b"not a png")
    plans = [sequence_files(gt_root, pred_root, "multi")] * 2
    next_task, outcomes = multiprocessing.Value("i", 0), queue.Queue()
    threads, handler = cv2.getNumThreads(), signal.getsignal(signal.SIGINT)
    try:
        _worker_main(plans, 2017, 0.008, next_task, outcomes)
    finally:
        cv2.setNumThreads(threads)
        signal.signal(signal.SIGINT, handler)
    index, result, error = outcomes.get_nowait()
    assert (index, result) == (0, None)
    assert isinstance(error, DataError) and "00002.png: cannot read mask" in str(error)
    assert next_task.value == 2 and outcomes.empty()
