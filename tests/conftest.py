"""Shared test helpers: where the repository and the shared benchmark data are."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERCEIVE_IR_SHARED", REPO.parent / "shared"))   # set when grading a copy
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    # torchvision 0.29 flags its image decoders as deprecated on every call (they work, and no
    # replacement ships with the pinned versions): keep the test report readable.
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities:DeprecationWarning")
    config.addinivalue_line("markers", "slow: heavier checks, run by `python -m pytest -q -m slow` (CI runs both)")


def pytest_collection_modifyitems(config, items):
    """The default run leaves out `slow` tests; any -m expression (e.g. -m slow) chooses for itself."""
    if config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


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
