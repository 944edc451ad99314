"""Helpers of the orchestration tests: repo copies, git/dvc calls, Prefect API reads, the infra stack module, a toy project."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]


def load_stack_module():
    """infra/stack.py as a module (infra/ is scripts and templates, not a package)."""
    from script_modules import load_script

    return load_script("cpcsam_infra_stack", "infra/stack.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=cpcsam-tests", "-c", "user.email=tests@cpcsam.invalid", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    )
    return out.stdout


def copy_repo(dest: Path) -> Path:
    """The working tree as git sees it (tracked + new, not ignored: no .venv, data, caches), committed."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "snapshot of the working tree for the orchestration tests")
    return dest


def prefect_read(read: Callable[[Any], Awaitable[T]], api_url: str | None = None) -> T:
    """`await read(client)` with a Prefect client, from synchronous test code: of `api_url`, else of
    the API this process is configured for. (A `prefect` CLI call costs some 3 CPU-seconds.)"""
    import asyncio
    import contextlib

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def run() -> T:
        async with get_client() as client:
            return await read(client)

    with temporary_settings(updates={PREFECT_API_URL: api_url}) if api_url else contextlib.nullcontext():
        return asyncio.run(run())


def dvc(cwd: Path, *args: str) -> str:
    import os

    exe = str(Path(sys.executable).with_name("dvc"))
    # stage commands say `python -m components.<step>`: this interpreter's environment first on PATH
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# ---- a two-stage toy DVC project: the flows' mechanics in isolation (fast, no model)

PARAMS = """\
# toy params (a valid params tree): the comments must survive overrides
seed: 0
data:
  profile: toy   # the flow writes data.profile here
  profiles:
    toy: {source: synthetic}
train:
  steps: 1       # read by make_a
tracking:
  experiment: toy
  retry_wait_s: 0.01
  flow: {stage_retries: 1, stage_retry_delay_s: 0, stage_timeout_s: 120}
"""

# `report` is listed first but depends on `make_a`: the order must come from DVC's graph.
DVC_YAML = """\
stages:
  report:
    cmd: python step.py report
    deps: [out/a.txt, step.py]
    outs: [out/report.txt]
  make_a:
    cmd: python step.py make_a
    deps: [step.py]
    params: [train.steps]
    outs: [out/a.txt]
"""

STEP = """\
import os, pathlib, sys
import yaml
from operations.tracking import stage_run

stage = sys.argv[1]
# flags live in the checkout (TOY_FLAGS), not in the worktree a flow run works in
flag = pathlib.Path(os.environ.get("TOY_FLAGS", ".")) / f"fail_once_{stage}"
if flag.exists():  # a transient failure: the first attempt dies, the retry succeeds
    flag.unlink()
    sys.exit(f"{stage}: flaky failure")
params = yaml.safe_load(open("params.yaml"))
out = pathlib.Path("out")
out.mkdir(exist_ok=True)
with stage_run(stage, params) as run:
    if stage == "make_a":
        (out / "a.txt").write_text(str(params["train"]["steps"]))
        run.log_metrics({"value": float(params["train"]["steps"])})
    else:
        text = "report of " + (out / "a.txt").read_text()
        (out / "report.txt").write_text(text)
        run.log_metrics({"length": float(len(text))})
"""


def make_toy_project(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(PARAMS)
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / "step.py").write_text(STEP)
    (path / ".gitignore").write_text("/mlflow.db\n/mlruns/\n")
    git(path, "init", "-q")
    dvc(path, "init", "-q")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "toy")
    return path


SMALL_CLASSES = {"classes": [{"name": "crab", "id": 1, "role": "target"}, {"name": "rov", "id": 2, "role": "base"},
                             {"name": "trash_bag", "id": 3, "role": "base"}],
                 "base": ["rov", "trash_bag"], "target": ["crab"]}


def register_small_champion(root: Path, profile: str = "oceancoco", tracking_uri: str | None = None) -> dict:
    """A small calibrated CPC-SAM exported to ONNX and registered as `cpcsam-<profile>` (gate passed,
    so champion) with a class table, in a sqlite registry under `root` (or at `tracking_uri`).

    Returns {'db', 'params', 'export', 'run_id', 'version'}. The tracking env is left to the caller.
    """
    import json

    sys.path.insert(0, str(ROOT / "tests" / "export"))
    from export_helpers import calibrated_small_model

    from cpcsam.export.onnx import export_decoder, export_image_encoder, prepare_for_export
    from operations import registry as register
    from operations import tracking

    export = root / "export"
    merged = prepare_for_export(calibrated_small_model())
    export_image_encoder(merged, export / "image_encoder.onnx")
    export_decoder(merged, export / "decoder_capl.onnx")
    (export / "parity.json").write_text('{"passed": true}')
    classes = root / "classes.json"
    classes.write_text(json.dumps(SMALL_CLASSES))
    gate = root / "gate.json"
    gate.write_text(json.dumps({"passed": True, "reasons": [], "candidate": {"target_dice": 0.5}}))
    db = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    params = {"data": {"profile": profile},
              "tracking": {"uri": db, "experiment": "pyfunc", "artifact_location": str(root / "mlruns")}}
    with tracking.pipeline_run(params, run_name="pipeline") as run:
        result = register.register_candidate(run.run_id, params, gate, export, classes=classes)
    assert result.version == result.champion_version, "the registered small model should be champion"
    return {"db": db, "params": params, "export": export, "run_id": run.run_id, "version": str(result.version)}
