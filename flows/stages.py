"""DVC as the flows see it: the stage graph (asked of DVC), one stage's repro, several at once, push.

No Prefect here (plain functions the flows wrap in tasks). The stage graph stays in
`dvc.yaml`: nodes and edges come from `dvc dag --dot`, never from Python.
(Not named `dvc.py`: Prefect puts this folder first on `sys.path` when it loads a flow.)

Independent stages (the variants' trainings) run side by side: each is one `dvc repro
--single-item`, and DVC allows that, since it releases its repository lock while a stage's
command runs and guards the stage's own deps/outs with read/write locks; `--wait-for-lock`
makes the short moments when two of them record their results wait instead of failing.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from cpcsam.data import storage
from cpcsam.errors import ConfigError

if TYPE_CHECKING:
    from cpcsam.config import Params

logger = logging.getLogger(__name__)

_EDGE = re.compile(r'^\s*"?([^"\s]+)"?\s*->\s*"?([^"\s;]+)"?\s*;?\s*$')
_NODE = re.compile(r'^\s*"([^"]+)"\s*;?\s*$')


class StageFailed(RuntimeError):
    """A `dvc` command exited non-zero (Prefect retries the task per policy)."""


class StageRefused(StageFailed):
    """The stage's own step exited with a code that says a retry cannot help (`components.cli`:
    2 bad input or configuration, 3 a deterministic check such as ONNX parity)."""


_STEP_EXIT = re.compile(r"exited with (\d+)")


# Process groups of the dvc commands running now (each in its own session, so that a timeout
# kills the stage with its children): an interrupted run_graph stops them, since the terminal's
# Ctrl-C does not reach another session.
_RUNNING_GROUPS: set[int] = set()
_RUNNING_LOCK = threading.Lock()


def dvc_executable() -> str:
    """`dvc` of this interpreter's environment (the venv), else the one on PATH."""
    candidate = Path(sys.executable).with_name("dvc")
    return str(candidate) if candidate.exists() else "dvc"


def run_dvc(
    root: Path,
    args: list[str],
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    log_file: Path | None = None,
) -> str:
    """Run `dvc <args>` in `root`; return its output, raise `StageFailed` with its tail on failure.

    On timeout the whole process group is killed (dvc and the component it started), so a
    stuck stage does not keep running beside the retry.
    """
    cmd = [dvc_executable(), *args]
    full_env = {**os.environ, **(env or {})}
    # stage commands say `python -m components.<step>`: this interpreter's venv first on PATH
    venv_bin = str(Path(sys.executable).parent)
    if full_env.get("PATH", "").split(os.pathsep)[0] != venv_bin:
        full_env["PATH"] = venv_bin + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.Popen(
        cmd, cwd=root, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    with _RUNNING_LOCK:
        _RUNNING_GROUPS.add(proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        raise StageFailed(f"`{' '.join(cmd[1:])}` timed out after {timeout:.0f} s; output tail:\n{output[-3000:]}")
    finally:
        with _RUNNING_LOCK:
            _RUNNING_GROUPS.discard(proc.pid)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{output}\n")
    if proc.returncode != 0:
        from components.cli import NOT_RETRYABLE

        codes = [int(c) for c in _STEP_EXIT.findall(output)]  # dvc reports its child's exit code
        kind = StageRefused if codes and codes[-1] in NOT_RETRYABLE else StageFailed
        raise kind(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}"
                   f"{f', step exit {codes[-1]}' if codes else ''}); output tail:\n{output[-3000:]}")
    return output


def stage_graph(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The stages of `dvc.yaml` in an order DVC can run them one by one (upstream first), and the
    edges (upstream, downstream) between them.

    One `dvc dag --dot` (each DVC process costs about a second): it lists every stage as a node
    line, in `dvc.yaml`'s order (which breaks ties), then the edges.
    """
    stages: list[str] = []
    edges: list[tuple[str, str]] = []
    for line in run_dvc(root, ["dag", "--dot"]).splitlines():
        if match := _EDGE.match(line):
            edges.append((match.group(1), match.group(2)))
        elif match := _NODE.match(line):
            stages.append(match.group(1))
    if not stages:
        return [], []
    return topological(stages, edges), edges


def upstream_closure(target: str, order: list[str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """`target` and every stage it depends on, directly or not, in `order`."""
    if target not in order:
        raise ConfigError(f"dvc.yaml has no stage {target!r}; stages: {', '.join(order)}")
    upstream: dict[str, set[str]] = {}
    for up, down in edges:
        upstream.setdefault(down, set()).add(up)
    keep, todo = {target}, [target]
    while todo:
        for up in upstream.get(todo.pop(), ()):
            if up not in keep:
                keep.add(up)
                todo.append(up)
    return [s for s in order if s in keep]


def parallel_jobs(params: Params, cores: int | None = None) -> int:
    """How many stages run at once: `tracking.flow.stage_jobs`, or when it is 0, the cores this
    process may use over the cores one stage uses (the largest torch thread setting, 0 meaning
    all cores, times the processes of a distributed training).

    Single-threaded stages side by side keep their solo speed (no spinning OpenMP threads to
    stall each other, issue 13), so the default graph's six trainings take half the time on 2 cores.
    """
    if params.tracking.flow.stage_jobs:
        return params.tracking.flow.stage_jobs
    cores = cores or len(os.sched_getaffinity(0))
    threads = max(t or cores for t in (params.pretrain.threads, params.train.threads, params.evaluate.threads,
                                       params.export.threads))
    processes = max(params.train.distributed.nproc_per_node, params.pretrain.distributed.nproc_per_node)
    return max(1, cores // (threads * processes))


@contextlib.contextmanager
def _stop_on_interrupt():
    """On Ctrl-C (KeyboardInterrupt in the waiting thread) terminate the running dvc commands, so
    that the pool's exit does not wait for stages to finish on their own."""
    try:
        yield
    except KeyboardInterrupt:
        with _RUNNING_LOCK:
            groups = list(_RUNNING_GROUPS)
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
        raise


def run_graph(
    order: list[str],
    edges: Iterable[tuple[str, str]],
    run_one: Callable[[str], Any],
    jobs: int,
    on_start: Callable[[str, list[str]], None] | None = None,
) -> list[Any]:
    """Run `run_one(stage)` for every stage of `order`, each once all its upstream stages have
    returned, at most `jobs` at once; ready stages start in `order`. Returns the results in
    `order`.

    When one raises, no further stage starts, the running ones finish, and the first error is
    raised again. `run_one` runs in a worker thread with a copy of the caller's context
    variables, so a Prefect task called there belongs to the caller's flow run.
    `on_start(stage, running)` is called as each stage starts.
    """
    upstream: dict[str, set[str]] = {s: set() for s in order}
    for up, down in edges:
        if up in upstream and down in upstream:
            upstream[down].add(up)
    pending, done = list(order), set()
    results: dict[str, Any] = {}
    running: dict[Future, str] = {}
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="stage") as pool, _stop_on_interrupt():
        while True:
            for stage in [s for s in pending if upstream[s] <= done] if error is None else []:
                if len(running) >= max(1, jobs):
                    break
                pending.remove(stage)
                running[pool.submit(contextvars.copy_context().run, run_one, stage)] = stage
                if on_start is not None:
                    on_start(stage, list(running.values()))
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                try:
                    results[stage] = future.result()
                    done.add(stage)
                except BaseException as exc:  # noqa: BLE001 - re-raised once the running stages finish
                    error = error or exc
    if error is not None:
        raise error
    return [results[s] for s in order]


def topological(nodes: list[str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """Kahn's algorithm; ties keep the order of `nodes`. Edges are (upstream, downstream)."""
    index = {n: i for i, n in enumerate(nodes)}
    downstream: dict[str, list[str]] = {n: [] for n in nodes}
    indegree = {n: 0 for n in nodes}
    for up, down in edges:
        if up in index and down in index:
            downstream[up].append(down)
            indegree[down] += 1
    ready = sorted((n for n in nodes if indegree[n] == 0), key=index.get)
    order: list[str] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for nxt in downstream[node]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
                ready.sort(key=index.get)
    if len(order) != len(nodes):
        raise ConfigError(f"dvc.yaml: the stage graph has a cycle among {sorted(set(nodes) - set(order))}")
    return order


def repro_stage(
    root: Path, stage: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
    log_file: Path | None = None, pull: bool = False,
) -> dict[str, object]:
    """`dvc repro --single-item <stage>`: runs it only when its deps/params changed.

    `pull`: fetch missing outputs of unchanged stages from the remote instead of re-running
    them (`dvc repro --pull`; for fresh workspaces such as Kubernetes Jobs).

    Returns {"stage", "ran" (False when DVC found it up to date or restored it from its run
    cache), "restored_from_run_cache", "seconds"}.
    """
    start = time.monotonic()
    # --wait-for-lock: a stage beside it may hold DVC's repository lock while recording its results
    args = ["--wait-for-lock", "repro", "--single-item", *(["--pull"] if pull else []), stage]
    output = run_dvc(root, args, env=env, timeout=timeout, log_file=log_file)
    return {
        "stage": stage,
        "ran": f"Running stage '{stage}'" in output,
        "restored_from_run_cache": "is cached - skipping run" in output,
        "seconds": round(time.monotonic() - start, 2),
    }


def remote_endpoint(root: Path, remote: str | None = None) -> tuple[str | None, str | None, str | None]:
    """(remote name, S3 endpoint URL, bucket) of a DVC remote (the default when `remote` is None)."""
    name = remote
    if name is None:
        try:
            name = run_dvc(root, ["config", "core.remote"]).strip() or None
        except StageFailed:
            return None, None, None
    if not name:
        return None, None, None
    try:
        url = run_dvc(root, ["config", f"remote.{name}.url"]).strip()
    except StageFailed as exc:
        raise ConfigError(f".dvc/config: remote {name!r} has no url") from exc
    try:
        endpoint = run_dvc(root, ["config", f"remote.{name}.endpointurl"]).strip() or None
    except StageFailed:
        endpoint = storage.endpoint_url()
    bucket = url[len("s3://"):].split("/", 1)[0] if url.startswith("s3://") else None
    return name, endpoint, bucket


def push(root: Path, targets: list[str] | None = None, remote: str | None = None, run_cache: bool = False) -> str:
    """`dvc push` (all outs of dvc.yaml/dvc.lock, or the given targets) to the remote.

    `run_cache`: also the run cache, so another workspace can skip stages already run here.
    """
    args = ["push", *(["-r", remote] if remote else []), *(["--run-cache"] if run_cache else []), *(targets or [])]
    return run_dvc(root, args)
