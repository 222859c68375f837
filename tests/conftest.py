"""Shared fixtures. Heavy ones (Ray, a trained tiny model) are session-scoped: built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = GOLDEN / "reference_tiny"
    if not path.is_dir():
        pytest.fail(f"golden fixtures missing at {path}")
    return path
