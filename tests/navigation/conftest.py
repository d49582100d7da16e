"""Fixtures for the navigation tests: a synthetic label/CT pair with awkward geometry, and the real example."""

from __future__ import annotations

import pytest
from navigation_phantom import TOTALSEG, Synthetic, make_synthetic


@pytest.fixture(scope="session")
def synthetic() -> Synthetic:
    return make_synthetic()


@pytest.fixture(scope="session")
def totalseg():
    if not TOTALSEG.exists():
        pytest.skip(f"shared example data not found at {TOTALSEG}")
    return TOTALSEG
