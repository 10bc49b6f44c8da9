"""Shared test helpers: where the repository and the shared benchmark data are."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    # torchvision 0.29 flags its image decoders as deprecated on every call (FACTS.md still
    # recommends them; they work): keep the test report readable.
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities:DeprecationWarning")


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
