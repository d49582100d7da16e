"""Shared fixtures: small synthetic sites written on the fly, and the location of the shared real data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fadal_testing import write_site

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Keep Flower/Ray from writing to the home folder or phoning home during tests.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# Ray (Flower's simulation backend): short socket paths, nothing left in /tmp/ray.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="fadal_ray_"))


def pytest_configure(config):
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny_site(tmp_path) -> Path:
    return write_site(tmp_path / "site")
