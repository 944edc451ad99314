"""Training checkpoints: atomic writes, discovery of the latest one, loading with clear errors.

A checkpoint is one `torch.save`d dict per step, `step_000040.pt` in the checkpoint folder. It
is first written to a temporary file in the same folder, flushed to disk and then renamed over
the final name (`os.replace` is atomic on POSIX), so a process killed at any moment leaves
either the previous checkpoints or the new complete one, never a torn file. Leftover temporary
files of a killed writer are ignored and removed.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from cpcsam.errors import CheckpointError
from cpcsam.files import torch_load_weights

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{6,})\.pt$")


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
