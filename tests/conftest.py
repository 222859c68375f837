"""Shared fixtures. Heavy ones (Ray, a trained tiny model) are session-scoped: built once."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


# --- Ray and the prepared tiny corpus (workflows/prepare.py), shared by data/training/serving tests ---


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs, no dashboard); a Ray already running is reused."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@dataclass
class PreparedCorpus:
    corpus_dir: Path  # synthetic corpus in the original formats (corpus_dir / "corpus.json")
    prepared_dir: Path  # `bubogpt data prepare` output (layout in workflows/data/prepared.py)
    manifest: dict


@pytest.fixture(scope="session")
def prepared_small_corpus(ray_session, tmp_path_factory) -> PreparedCorpus:
    """The "tiny" synthetic corpus (seed 0), prepared once per session with the tiny preset."""
    from bubogpt.data.synth import synthesize
    from workflows.prepare import run_prepare

    root = tmp_path_factory.mktemp("prepared_small_corpus")
    synthesize(root / "corpus", seed=0, size="tiny")
    manifest = run_prepare(root / "corpus", root / "prepared", preset="tiny", progress=False)
    return PreparedCorpus(root / "corpus", root / "prepared", manifest)


# --- the serving application (serve/app.py), started once and shared by tests/test_serve*.py ---


@pytest.fixture(scope="session")
def serve_app(ray_session, tmp_path_factory):
    """The Ray Serve application on a loopback port with a tiny model (tests/serve_harness.py)."""
    from serve_harness import start_app

    app, stop = start_app(tmp_path_factory.mktemp("serve_app"))
    yield app
    stop()
