"""Training checkpoints: atomic writes, discovery of the latest one, loading with clear errors.

A checkpoint is one `torch.save`d dict per step, `step_000040.pt` in the checkpoint folder. It
is first written to a temporary file in the same folder, flushed to disk and then renamed over
the final name (`os.replace` is atomic on POSIX), so a process killed at any moment leaves
either the previous checkpoints or the new complete one, never a torn file. Leftover temporary
files of a killed writer are ignored and removed.

A checkpoint carries the fingerprint of the run that wrote it (`run_fingerprint`: configuration,
data, starting weights and `source_digest`, the library's code) and is resumed only by a run
with the same one (`latest_matching`). Checkpoint folders are not DVC outs, so they outlive the
run: when a changed param or a changed source file makes DVC run a training stage again, the
folder still holds the previous run's last checkpoint, and resuming it would write that run's
model under the new stage's hashes in dvc.lock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from cpcsam.errors import CheckpointError
from cpcsam.files import sha256_file, torch_load_weights

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def run_fingerprint(*parts: Any) -> str:
    """A short hash of everything that defines a run (configs, data identities, weights, code)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def file_digest(path: str | Path | None) -> str | None:
    """SHA-256 of a local file (the SAM weights a run starts from), None for no file."""
    if not path:
        return None
    if not Path(path).is_file():
        return str(path)  # e.g. an s3:// URI: its name identifies it
    return sha256_file(path)


def tree_digest(root: str | Path) -> str:
    """SHA-256 of the Python sources under `root`: each file's path relative to it and its bytes."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\x00")
        digest.update(path.read_bytes() + b"\x00")
    return digest.hexdigest()


@functools.cache
def source_digest() -> str:
    """`tree_digest` of the `cpcsam` package this process runs: part of every run fingerprint.

    The whole package rather than the modules a stage imports: a helper moved from one module to
    another must not leave a checkpoint resumable, and a changed docstring costs only a retrain
    that DVC would have started anyway (the package is among the training stages' deps).
    """
    return tree_digest(Path(__file__).resolve().parents[1])


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{int(step):06d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in the folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int | None = None) -> Path:
    """Write `state` as the checkpoint of `step` atomically; keep only the newest `keep` ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    for stale in folder.glob(".step_*.tmp"):  # left by a writer that was killed
        if stale.name != Path(tmp_name).name:
            stale.unlink(missing_ok=True)
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (tensors and plain Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    state = torch_load_weights(path, path, "training checkpoint")  # a pickle with code is refused
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint (no 'step' entry)")
    return state


def latest_matching(folder: str | Path, fingerprint: str) -> Path | None:
    """The latest checkpoint of `folder` if the run that wrote it had `fingerprint`, else None.

    Checkpoints of another run (params, data, starting weights or code changed) are removed with a
    warning: the new run starts over, as a new run of the stage should, and its checkpoints are
    never mixed with theirs.
    """
    path = latest_checkpoint(folder)
    if path is None or load_checkpoint(path).get("fingerprint") == fingerprint:
        return path
    logger.warning("checkpoints in %s belong to another configuration or code: starting over", folder)
    for _, old in list_checkpoints(folder):
        old.unlink()
    return None
