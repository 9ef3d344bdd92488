"""Shared fixtures: settings rooted in a temp folder, and small deterministic datasets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's RECSYS_* variables."""
    for name in list(os.environ):
        if name.startswith("RECSYS_"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def settings(tmp_path: Path):
    """Settings whose var/, lake and MLflow store live in this test's temp folder."""
    from core.config import load_settings

    return load_settings(root=tmp_path, environ={}, overrides={"environment": "test"})


@pytest.fixture(scope="session")
def tiny_dataset():
    """~6K events, 200 users, 120 items over 14 days with a taste shift on day 8 (seeded)."""
    from datetime import date

    from core.synthetic import generate

    return generate(n_users=200, n_items=120, n_events=6_000, n_days=14, shift_date=date(2024, 1, 8), seed=7)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only MovieLens folder beside the repo; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: on a shared 2-core machine OpenMP spin-waiting
    makes tiny models ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
