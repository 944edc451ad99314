"""The scaffold every pipeline step's entry point shares: parse, typed params, tracked run, exit code.

    def work(params: Params, args: argparse.Namespace, run) -> str:   # returns the closing line
        ...
    sys.exit(stage_main("train", __doc__, add_arguments, work))

- `--params FILE` and repeatable `-S KEY=VALUE`; the whole params tree is validated before any
  work (`cpcsam.config.load_config`), so a typo fails the stage in a second, naming the key.
- The MLflow run (`operations.tracking.stage_run`) is open around the work, not after it, so its
  duration is the stage's.
- Exit codes: 0 done; 2 bad input or configuration (`CpcSamError`), which a retry cannot mend;
  3 a deterministic check refused the result (`CheckFailed`: ONNX parity), likewise not retryable;
  anything else is a crash (traceback, exit 1), which an orchestrator may retry.
- Secrets never reach the terminal: log records (ours and the libraries') and the one-line error
  go through `cpcsam.redact` (URI passwords, AWS keys, secret environment values become `***`).
- Several processes (`processes(params)` > 1, e.g. `train.distributed.nproc_per_node`): the
  stage re-launches itself under torchrun (`launch_under_torchrun`) once its params are valid,
  and its exit code is the workers' (2 or 3 if a worker refused its input, else 1 for a crash or
  a killed worker, which a re-run resumes from the last checkpoint). Every rank runs `work`; the
  ranks other than 0 open no MLflow run (`CPCSAM_TRACKING=off`) and print no closing line.
- The CPU's kernel paths are pinned before any torch work (`pin_cpu_kernels`), so that outs do
  not depend on which x86-64 CPU ran the stage.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from cpcsam.errors import CpcSamError
from cpcsam.redact import install_log_redaction, redact

EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3
NOT_RETRYABLE = (EXIT_BAD_INPUT, EXIT_CHECK_FAILED)
# Set by `launch_under_torchrun` for its workers: a folder where each rank writes its exit code.
RANK_STATUS_ENV = "CPCSAM_RANK_STATUS_DIR"


class CheckFailed(CpcSamError):
    """A deterministic check refused the stage's result (the same inputs fail the same way)."""


# The same stage, params and threads gave other training bytes on an AMD EPYC than the committed
# dvc.lock recorded from another machine: MKL picks its code path by CPU (MKL_CBWR changes the
# bytes on that EPYC, where ATen already ran AVX2), ATen dispatches its vectorised kernels by
# instruction set (ATEN_CPU_CAPABILITY=default changes them too), and oneDNN does the same. Each
# library reads its variable when it first runs a kernel, so these are set before any torch work.
PINNED_CPU_KERNELS = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """Set PINNED_CPU_KERNELS in this process's environment (and its children's) on an x86-64
    CPU with AVX2; a variable the user set is kept. Returns what was set.

    Only with AVX2: ATen trusts the variable and would run AVX2 code on a CPU without it. Elsewhere
    (other CPUs, no /proc/cpuinfo) nothing is pinned and outs are reproducible per machine only.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return {}
    if "avx2" not in flags:
        return {}
    pinned = {key: value for key, value in PINNED_CPU_KERNELS.items() if key not in os.environ}
    os.environ.update(pinned)
    return pinned


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser for `python -m components.<stage>` with `--params` and repeatable `-S KEY=VALUE`."""
    parser = argparse.ArgumentParser(prog=f"python -m components.{stage}", description=(doc or stage).splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()


def launched_rank() -> tuple[int, int]:
    """(rank, world size) that torchrun gave this process; (0, 1) outside a multi-process job."""
    if "RANK" not in os.environ:
        return 0, 1
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def stage_main(
    stage: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    work: Callable[[Any, argparse.Namespace, Any], str],
    argv: list[str] | None = None,
    run_name: Callable[[argparse.Namespace], str] | None = None,
    processes: Callable[[Any], int] | None = None,
    failure_hint: Callable[[argparse.Namespace], str] | None = None,
) -> int:
    """Run one pipeline step: parse, validate params, open its tracked run, do `work`, exit code.

    `processes(params)`: how many processes the stage runs on (None: one); above one the stage
    re-launches itself under torchrun. `failure_hint(args)`: a sentence added to the message of a
    failed multi-process run (where it can resume from).
    """
    pin_cpu_kernels()
    parser = stage_parser(stage, doc)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    rank, size = launched_rank()
    if size > 1:
        for handler in logging.getLogger().handlers:  # which process said it
            handler.setFormatter(logging.Formatter(f"%(levelname)s [rank {rank}] %(name)s: %(message)s"))
        if rank != 0:
            os.environ["CPCSAM_TRACKING"] = "off"  # rank 0 alone logs to MLflow
    code = 1  # an exception that escapes is a crash
    try:
        code = _stage(stage, args, work, argv, run_name, processes, failure_hint, rank, size)
        return code
    finally:
        if size > 1 and os.environ.get(RANK_STATUS_ENV):
            try:
                Path(os.environ[RANK_STATUS_ENV], f"rank_{rank}").write_text(str(code))
            except OSError:
                pass


def _stage(stage, args, work, argv, run_name, processes, failure_hint, rank: int, size: int) -> int:
    name = f"{stage}[rank {rank}]" if size > 1 else stage
    try:
        from cpcsam.config import load_config
        from operations.tracking import stage_run

        params = load_config(args.params, args.overrides)
        wanted = processes(params) if processes is not None else 1
        if wanted > 1 and size == 1:
            hint = (lambda: failure_hint(args)) if failure_hint is not None else None
            return launch_under_torchrun(stage, list(sys.argv[1:] if argv is None else argv), wanted, hint)
        with stage_run(stage, params, run_name=run_name(args) if run_name else None) as run:
            message = work(params, args, run)
    except CheckFailed as exc:
        print(f"{name}: {redact(exc)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except CpcSamError as exc:
        print(f"{name}: {redact(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Not bad input (exit 1: the orchestrator may retry once space is freed). Outs are written
        # through cpcsam.files.atomic_path, so no partial file is left for DVC to cache.
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(f"{name}: no space left on the device{where} ({exc.strerror}); nothing partial was kept: "
              "free some space and run the stage again", file=sys.stderr)
        return 1
    if rank == 0:
        print(redact(message))
    return 0


def torchrun_command(module: str, argv: list[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` local workers of `python -m <module> argv`.

    `--standalone`: a rendezvous on a free local port (several jobs on one machine do not
    collide); `--max-restarts=0`: a failed worker fails the job (torchrun stops the others), and
    the next run of the stage resumes from its checkpoints instead of torchrun restarting blind.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", module, *argv]


def launch_under_torchrun(stage: str, argv: list[str], nproc: int, hint: Callable[[], str] | None = None) -> int:
    """Run `python -m components.<stage> argv` as `nproc` torchrun workers; return the stage's exit code.

    SIGTERM (an orchestrator's timeout or cancel) is passed on to torchrun, which stops its
    workers; Ctrl-C reaches them directly. A worker that dies without an exit status (a signal,
    the OOM killer) is named in the one-line message, as is each non-zero exit.
    """
    status_dir = tempfile.mkdtemp(prefix=f"cpcsam-{stage}-ranks-")
    env = {**os.environ, RANK_STATUS_ENV: status_dir}
    logging.getLogger(__name__).info("%s: %d processes under torchrun", stage, nproc)
    proc = subprocess.Popen(torchrun_command(f"components.{stage}", argv, nproc), env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                returncode = proc.wait()
                break
            except KeyboardInterrupt:  # the workers got the Ctrl-C too: wait for them to stop
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    codes: dict[int, int] = {}
    for path in Path(status_dir).glob("rank_*"):
        try:
            codes[int(path.name.removeprefix("rank_"))] = int(path.read_text())
        except ValueError:
            pass
    shutil.rmtree(status_dir, ignore_errors=True)
    if returncode == 0 and all(codes.get(r) == 0 for r in range(nproc)):
        return 0
    for refused in (EXIT_BAD_INPUT, EXIT_CHECK_FAILED):  # the worker printed why
        if refused in codes.values():
            return refused
    ranks = [
        f"rank {r} exited with {codes[r]}" if r in codes else
        f"rank {r} ended without an exit status (killed by a signal, or stopped by torchrun after another rank failed)"
        for r in range(nproc) if codes.get(r) != 0
    ]
    message = f"{stage}: the {nproc}-process run failed (torchrun exit {returncode}): {'; '.join(ranks) or 'no rank reported an error'}"
    if hint is not None:
        message += f". {hint()}"
    print(redact(message), file=sys.stderr)
    return 1
