"""Shared test helpers: where the repository and the shared benchmark data are."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


@pytest.fixture
def shared_dir():
    """`../shared` next to the checkout (benchmark images, reference values); skip if absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}: these tests check against third-party "
                    "reference values that ship with the development machines only")
    return SHARED


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)
