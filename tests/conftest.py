"""Shared fixtures: one Prefect test harness per session, the sample series generated once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "yokai" / "numba"))

pytest_plugins = ["tests.conftest_s3"]


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) shared by the flow tests of this session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def sample_series(tmp_path_factory) -> Path:
    """The built-in sample series at its demo size (3 x 40 s), generated once per session."""
    from yokai_pipeline import synthetic

    out = tmp_path_factory.mktemp("sample_series")
    synthetic.generate_series(out, seed=0)
    return out
