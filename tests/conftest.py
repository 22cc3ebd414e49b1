"""Shared pytest configuration: make ``tests/`` helpers importable; common fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))

DATA_DIR = REPO_ROOT / "data" / "iot23"
FIXTURES_DIR = TESTS_DIR / "fixtures"


@pytest.fixture(scope="session")
def iot23_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def compiled():
    """The compiled hot path (gateway.flows._compiled); skipped where it is not built,
    except in CI (CI=true), where `make setup` must have built it."""
    import os

    try:
        from gateway.flows import _compiled
    except ImportError as exc:
        if os.environ.get("CI"):
            raise AssertionError(f"CI must build the compiled hot path: {exc}") from exc
        pytest.skip("the compiled hot path is not built (pip install -e . builds it)")
    return _compiled
