"""Isolated workspaces: each flow run works in its own git worktree of the commit, never in the
user's checkout.

A flow run used to write its overrides into the checkout's tracked `params.yaml` and `chdir`
there, so two runs could not share a worker and a killed run left the file overridden. Now:
- `git worktree add --detach` of `HEAD` under `<root>/.workspaces/<name>`: the code and params of
  the commit, nothing uncommitted;
- the worktree's DVC cache is the checkout's (`cache.dir` in its `.dvc/config.local`), so stages
  already run anywhere are restored, not re-run, and results stay in the one cache;
- the overrides are written into the worktree's own `params.yaml` (comments kept), where DVC
  sees them as params and `dvc.lock` records them;
- its `artifacts/checkpoints` is a link to `<root>/.workspaces/.checkpoints/<label>-<key>`, where
  the key is a digest of the overrides: a run killed mid-training (worker SIGKILLed) leaves its
  checkpoints there and the next run with the same label and overrides resumes from them, while a
  run with other overrides gets its own folder (its checkpoints would neither resume nor survive
  the pruning of another configuration's). The trainer still checks each checkpoint's fingerprint;
- the worktree is removed when the run ends (kept when `keep=True`, e.g. to inspect a failure).
Concurrent runs get distinct names, so they never touch each other's files; DVC's lock is per
worktree.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from cpcsam.errors import ConfigError

logger = logging.getLogger(__name__)

WORKSPACES = ".workspaces"
CHECKPOINTS = ".checkpoints"  # under WORKSPACES: training checkpoints that outlive a killed run


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"{root}: `git {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def write_overrides(params_file: Path, overrides: Iterable[str]) -> None:
    """Apply `key.sub=value` overrides to a params file in place (values parsed as YAML; comments kept)."""
    import yaml
    from ruamel.yaml import YAML

    overrides = list(overrides)
    if not overrides:
        return
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_file.read_text())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping in {params_file}")
        node[parts[-1]] = yaml.safe_load(raw)
    buf = io.StringIO()
    rt.dump(doc, buf)
    params_file.write_text(buf.getvalue())


@contextlib.contextmanager
def isolated_workspace(root: Path, overrides: Iterable[str] = (), label: str = "run", keep: bool = False) -> Iterator[Path]:
    """A fresh worktree of `root`'s HEAD with `overrides` applied to its params.yaml; removed afterwards."""
    root = Path(root).resolve()
    overrides = list(overrides)
    name = f"{label}-{uuid.uuid4().hex[:8]}"
    path = root / WORKSPACES / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _git(root, "worktree", "add", "--detach", "--quiet", str(path), "HEAD")
    try:
        if (root / ".dvc").is_dir():
            cache = root / ".dvc" / "cache"
            cache.mkdir(parents=True, exist_ok=True)
            with open(path / ".dvc" / "config.local", "a") as handle:
                handle.write(f"[cache]\n    dir = {cache}\n")
        write_overrides(path / "params.yaml", overrides)
        key = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:12]
        shared = root / WORKSPACES / CHECKPOINTS / f"{label}-{key}"
        shared.mkdir(parents=True, exist_ok=True)
        (path / "artifacts").mkdir(exist_ok=True)
        (path / "artifacts" / "checkpoints").symlink_to(shared, target_is_directory=True)
        logger.info("workspace %s (commit %s)", path, _git(root, "rev-parse", "--short", "HEAD").strip())
        yield path
    finally:
        if keep:
            logger.info("workspace kept: %s", path)
        else:
            try:
                _git(root, "worktree", "remove", "--force", str(path))
            except ConfigError as exc:  # never hide the run's own error behind a cleanup failure
                logger.warning("could not remove workspace %s: %s", path, exc)
                shutil.rmtree(path, ignore_errors=True)
                subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)
