"""Shared test fixtures: the project root, the read-only shared data, offline env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared sits beside the checkout (the workplace layout); SHARED_DIR overrides it.
SHARED = Path(os.environ.get("CPCSAM_SHARED_DIR", ROOT.parent / "shared"))
TRASHCAN = SHARED / "data" / "trashcan"

# Telemetry off for every process the tests start.
for key, value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def trashcan_dir() -> Path:
    """The real TrashCan folder; tests that need it skip with the reason when it is absent."""
    if not (TRASHCAN / "annotations.json").is_file():
        pytest.skip(f"real data not available: {TRASHCAN} (the read-only ../shared/data folder) is absent")
    return TRASHCAN
