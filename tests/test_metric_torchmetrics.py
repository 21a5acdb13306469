"""`JFMetric`: hand-computed means over objects, and states that merge across ranks by concatenation."""

import warnings

import numpy as np
import pytest
import torch
from torchmetrics.utilities import dim_zero_cat

from dvos.metrics import JFMetric

HEIGHT, WIDTH = 48, 64  # boundary tolerance 1 px


def sequence_a() -> tuple[torch.Tensor, torch.Tensor]:
    """Two objects, 4 frames (2 scored): object 1 exact (J = F = 1), object 2 never predicted (0)."""
    gt = torch.zeros(4, HEIGHT, WIDTH, dtype=torch.uint8)
    gt[:, 2:8, 2:12] = 1
    gt[:, 30:40, 5:25] = 2
    pred = torch.zeros_like(gt)
    pred[:, 2:8, 2:12] = 1
    return gt, pred


def sequence_b() -> tuple[np.ndarray, np.ndarray]:
    """One object, 5 frames (3 scored): the prediction doubles the square downwards in every frame
    (J = 0.5, F = 0.66 by hand: boundary precision 33/60, recall 33/40)."""
    gt = np.zeros((5, HEIGHT, WIDTH), dtype=np.uint8)
    gt[:, 10:20, 40:50] = 1
    pred = np.zeros_like(gt)
    pred[:, 10:30, 40:50] = 1
    return gt, pred


# Means over the three objects: J = (1 + 0 + 0.5) / 3, F = (1 + 0 + 0.66) / 3;
# J-Recall = (1 + 0 + 0) / 3 (0.5 is not > 0.5), F-Recall = (1 + 0 + 1) / 3; no decay.
EXPECTED = {
    "J": 0.5,
    "F": 1.66 / 3,
    "J&F": (0.5 + 1.66 / 3) / 2,
    "J-Recall": 1 / 3,
    "J-Decay": 0.0,
    "F-Recall": 2 / 3,
    "F-Decay": 0.0,
}


def assert_expected(values: dict[str, torch.Tensor]) -> None:
    assert set(values) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert values[name].item() == pytest.approx(value, abs=1e-12), name


def test_compute_by_hand():
    metric = JFMetric()
    metric.update(*sequence_a())
    metric.update(*sequence_b())
    values = metric.compute()
    assert_expected(values)
    assert values["J"].dtype == torch.float64


def test_halves_merge_to_the_whole():
    whole = JFMetric()
    whole.update(*sequence_a())
    whole.update(*sequence_b())
    first, second = JFMetric(), JFMetric()
    first.update(*sequence_a())
    second.update(*sequence_b())
    first.merge_state(second)
    merged = first.compute()
    for name, value in whole.compute().items():
        assert merged[name].item() == pytest.approx(value.item(), abs=1e-15), name
    assert_expected(merged)


def test_ddp_sync_concatenates_states():
    # torchmetrics' own sync code, with a stand-in for the all-gather: every rank receives the
    # states of all three ranks, the third of which saw no sequence (an empty placeholder).
    ranks = [JFMetric(), JFMetric(), JFMetric()]
    ranks[0].update(*sequence_a())
    ranks[1].update(*sequence_b())
    assert all(reduction is dim_zero_cat for reduction in ranks[0]._reductions.values())
    gathered = {
        state: [
            dim_zero_cat(getattr(rank, state))
            if getattr(rank, state)
            else torch.zeros(0, dtype=torch.float64)
            for rank in ranks
        ]
        for state in ranks[0]._reductions
    }
    for rank in ranks:
        answers = iter(gathered.values())  # the sync walks the states in `_reductions` order
        rank._sync_dist(lambda tensor, group=None, answers=answers: list(next(answers)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the third rank never called update
            assert_expected(rank.compute())


def test_reset_and_empty_compute():
    metric = JFMetric()
    metric.update(*sequence_a())
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        values = metric.compute()
    assert all(torch.isnan(value) for value in values.values())


def test_2016_mode_merges_objects():
    metric = JFMetric(year=2016)
    gt, pred = sequence_a()
    metric.update(gt, pred)
    # One merged object: GT 60 + 200 px, prediction the 60 px of object 1 → J = 60 / 260.
    assert metric.compute()["J"].item() == pytest.approx(60 / 260, abs=1e-15)
