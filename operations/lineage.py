"""Lineage of a run: the git commit (and whether tracked code changed since) and DVC's hashes.

Tagged on every MLflow run (`operations.tracking`), so a run says which code and which data
version produced it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from cpcsam.config import TrackingConfig

FLOW_RUN_ENV = "CPCSAM_PREFECT_FLOW_RUN_ID"
# Set by Prefect in the process of a flow run; stages started by the flow inherit it.
PREFECT_FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"

def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dvc_lock_hashes(root: Path, data_stages: list[str]) -> dict[str, str]:
    """md5 of `dvc.lock` and a combined hash of the data stages' outs recorded in it."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    text = lock.read_bytes()
    tags = {"cpcsam.dvc.lock_md5": hashlib.md5(text).hexdigest()}
    try:
        stages = (yaml.safe_load(text) or {}).get("stages", {})
    except yaml.YAMLError:
        return tags
    parts = []
    for stage in data_stages:
        for out in (stages.get(stage) or {}).get("outs", []) or []:
            parts.append(f"{out.get('path')}:{out.get('md5') or out.get('etag') or out.get('hash')}")
    if parts:
        tags["cpcsam.dvc.data_md5"] = hashlib.md5("\n".join(sorted(parts)).encode()).hexdigest()
        tags["cpcsam.dvc.data_outs"] = ";".join(sorted(parts))[:5000]
    return tags


_NOT_CODE = (":(exclude)dvc.lock", ":(exclude)params.yaml")


def lineage_tags(root: str | Path = ".", data_stages: list[str] | None = None) -> dict[str, str]:
    """Tags that trace a run back to code (git), data (dvc.lock) and orchestration (Prefect)."""
    root = Path(root)
    tags: dict[str, str] = {}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["cpcsam.git.commit"] = commit
        # Dirty = tracked *code/config* changed since the commit. params.yaml and dvc.lock are
        # left out: a run rewrites dvc.lock, and its params are logged and hashed separately.
        status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *_NOT_CODE)
        changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
        tags["cpcsam.git.dirty"] = "true" if changed else "false"
        if changed:
            tags["cpcsam.git.dirty_files"] = " ".join(changed)[:2000]
    tags.update(dvc_lock_hashes(root, data_stages if data_stages is not None else TrackingConfig().data_stages))
    flow_run = os.environ.get(FLOW_RUN_ENV) or os.environ.get(PREFECT_FLOW_RUN_ENV)
    if flow_run:
        tags["cpcsam.prefect.flow_run_id"] = flow_run
    return tags
