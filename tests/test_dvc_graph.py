"""The stage graph in dvc.yaml: every module a stage imports is one of its deps, no stage always runs.

A stage whose code imports a module that is not among its deps would not re-run when that
module changes: DVC would serve a stale out. The check follows the imports of each stage's
entry point statically (the project's own modules only; `operations/` logs and is no dep).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cpcsam", "components")


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_files(entry: Path) -> set[Path]:
    """The project files `entry` reaches through imports (package __init__ files included)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                found = _module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def missing_deps(stage: dict) -> list[str]:
    stage = stage.get("do", stage)  # foreach stages
    entry = ROOT / "components" / f"{stage['cmd'].split('components.')[1].split()[0]}.py"
    deps = [ROOT / d for d in stage["deps"] if isinstance(d, str)]
    # The top-level packages' __init__ files hold a docstring and a version string, no behaviour.
    top = {ROOT / p / "__init__.py" for p in PACKAGES}
    return sorted(
        str(f.relative_to(ROOT)) for f in imported_files(entry) - top
        if not any(f == d or d in f.parents for d in deps)
    )


@pytest.mark.parametrize("name", sorted(_stages()))
def test_every_imported_module_is_a_dep(name: str) -> None:
    missing = missing_deps(_stages()[name])
    assert not missing, f"stage {name}: imports {missing} but does not list them (or their folder) as deps"


def test_no_stage_always_runs() -> None:
    assert not [n for n, s in _stages().items() if s.get("always_changed")]


def test_the_check_catches_a_missing_dep() -> None:
    """Plant the bug: the evaluate stage without its cpcsam/evaluation dep."""
    stage = dict(_stages()["evaluate"])
    stage["deps"] = [d for d in stage["deps"] if d != "cpcsam/evaluation"]
    assert "cpcsam/evaluation/protocols.py" in missing_deps(stage)


def stale_lock_entries(status: dict) -> dict[str, dict[str, object]]:
    """From `dvc status --json` of a fresh clone: per stage, what differs from dvc.lock other than
    outs and upstream outs not made yet ("deleted"): a committed file or folder dep edited after
    the lock was written ("modified", "new"), a param (a dict), the command ("changed command")."""
    stale: dict[str, dict[str, object]] = {}
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):
                stale.setdefault(stage, {})[change] = True
                continue
            for path, what in change.get("changed deps", {}).items():
                if what != "deleted":
                    stale.setdefault(stage, {})[path] = what
    return stale


def test_the_committed_lock_matches_the_committed_deps(tmp_path: Path) -> None:
    """A fresh clone's `dvc status` finds no stage whose committed deps changed since dvc.lock was
    written: otherwise `dvc pull` brings outs that `dvc repro` then rebuilds, and the lock's hashes
    name code or data that the repository no longer holds. (Once, an edit of checkpoints/README.md
    left the pretrain stage, and so the whole pipeline, out of date.) HEAD is checked, not the
    working tree, so an uncommitted edit does not fail it; commit the lock with the code."""
    import json
    import shutil
    import subprocess

    from flows.stages import dvc_executable

    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout with git installed: the committed dvc.lock cannot be read")
    clone = tmp_path / "head"
    subprocess.run([git, "clone", "-q", str(ROOT), str(clone)], check=True, capture_output=True)
    proc = subprocess.run([dvc_executable(), "status", "--json"], cwd=clone, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stale = stale_lock_entries(json.loads(proc.stdout or "{}"))
    assert not stale, f"dvc.lock is out of date for {stale}: run the pipeline in a fresh clone and commit dvc.lock"


def test_the_lock_check_reads_what_dvc_reports() -> None:
    """Plant the bugs: an edited folder dep, a new param and a changed command are stale; outs not in
    the cache and upstream outs not made yet are not."""
    status = {
        "ingest": [{"changed outs": {"data/ingest": "not in cache"}}],
        "pretrain": [{"changed deps": {"checkpoints": "modified"}}, {"changed outs": {"a.pth": "not in cache"}}],
        "embed": [{"changed deps": {"artifacts/pretrain/sam.pth": "deleted",
                                    "params.yaml": {"model": "modified"}}}],
        "gate": ["changed command"],
    }
    assert stale_lock_entries(status) == {
        "pretrain": {"checkpoints": "modified"},
        "embed": {"params.yaml": {"model": "modified"}},
        "gate": {"changed command": True},
    }
