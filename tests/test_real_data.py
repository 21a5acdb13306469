"""The real default data the repository carries (assets/davis2016): 30 unlabelled DAVIS-2016 train
videos and the four annotated sequences of the DAVIS-2016 sample, decoded once into a DAVIS tree."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dvos.config import load_config
from dvos.data.readers import list_videos, open_video
from dvos.data.real import RECORD_NAME, ensure_davis_sample
from dvos.data.vos import vos_sequences
from dvos.utils.errors import DataError

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "davis2016"
SAMPLE = {"blackswan": 50, "car-shadow": 40, "dog": 60, "libby": 49}


def test_the_repository_carries_train_videos_apart_from_the_sample():
    videos = list_videos(ASSETS / "train")
    assert len(videos) == 30
    names = {video.stem for video in videos}
    assert not names & set(SAMPLE)  # DAVIS-2016 train and val share no video
    with open_video(ASSETS / "train" / "bear.mp4") as reader:
        assert reader.size == (240, 428) and len(reader) == 82
    assert (ASSETS / "README.md").is_file()


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """One sequence of the assets (the shortest), to keep the decoding test short."""
    source = tmp_path_factory.mktemp("assets")
    (source / "val" / "Annotations").mkdir(parents=True)
    shutil.copyfile(ASSETS / "val" / "car-shadow.mp4", source / "val" / "car-shadow.mp4")
    shutil.copytree(
        ASSETS / "val" / "Annotations" / "car-shadow", source / "val" / "Annotations" / "car-shadow"
    )
    return source


def test_the_sample_is_decoded_once_into_a_davis_tree(small_source, tmp_path):
    out = ensure_davis_sample(small_source, tmp_path / "sample")
    (sequence,) = vos_sequences(out, year=2016, split="val")
    assert sequence.name == "car-shadow" and len(sequence.frame_names) == SAMPLE["car-shadow"]
    with open_video(small_source / "val" / "car-shadow.mp4") as reader:
        decoded = reader.get_batch([0, 39])
    for frame, index in zip(decoded, (0, 39)):
        jpeg = np.asarray(Image.open(out / "JPEGImages" / "480p" / "car-shadow" / f"{index:05d}.jpg"))
        assert np.abs(jpeg.astype(int) - frame.astype(int)).mean() < 2.0  # JPEG quality 95 of that frame
    annotation = out / "Annotations" / "480p" / "car-shadow" / "00007.png"
    assert (
        annotation.read_bytes()
        == (small_source / "val" / "Annotations" / "car-shadow" / "00007.png").read_bytes()
    )
    stamp = (out / RECORD_NAME).stat().st_mtime_ns
    assert ensure_davis_sample(small_source, out) == out and (out / RECORD_NAME).stat().st_mtime_ns == stamp


def test_bad_sources_are_named(small_source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_source, broken)
    (broken / "val" / "Annotations" / "car-shadow" / "00039.png").unlink()
    with pytest.raises(DataError, match=r"car-shadow.mp4: 40 frames but 39 annotations"):
        ensure_davis_sample(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-built
    shutil.rmtree(broken / "val" / "Annotations" / "car-shadow")
    with pytest.raises(DataError, match="no annotation PNGs for car-shadow.mp4"):
        ensure_davis_sample(broken, tmp_path / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not a DAVIS sample built by dvos"):
        ensure_davis_sample(small_source, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_the_cpu_recipe_trains_on_the_real_videos_and_scores_the_sample():
    cfg = load_config(["experiment=cpu"])
    assert Path(cfg.data.train_root) == ASSETS / "train" and cfg.data.real.prepare
    assert cfg.data.year == 2016 and cfg.eval.extra_sets == ["synthetic_small"]
