"""Shared test fixtures: the real data in ../shared/data (skipped when absent) and a quiet environment."""

import os
from pathlib import Path

import pytest

# Set before anything imports wandb or albumentations: never prompt, never phone home.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DAVIS_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "davis2016"


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run faster on one, and on a busy 2-core machine
    two threads wait for each other (10× slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (real DAVIS sequences, an mp4, reference scores); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (it sits beside the clone in the dev setup)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def davis_fixture() -> Path:
    """tests/fixtures/davis2016: real DAVIS-2016 data every clone carries (blackswan frames, mp4 and
    annotations; car-shadow annotations; OSVOS predictions and the official toolkit's scores)."""
    return DAVIS_FIXTURE
