"""Wall time of the whole DVC pipeline, stage by stage, and of the no-op second `dvc repro`.

    .venv/bin/python benchmarks/bench_pipeline.py                     # embedded default (oceancoco)
    .venv/bin/python benchmarks/bench_pipeline.py -S data.profile=tiny -S train.steps=20

Runs in a temporary copy of the working tree (git-tracked and new files; no data, no caches),
so the checkout's own outputs are untouched. Each stage is one `dvc repro --single-item` in the
order DVC gives, exactly as the `train` flow runs them; tracking is off unless --track.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows import stages  # noqa: E402
from flows.workspace import write_overrides  # noqa: E402


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=bench@invalid",
                                                  "commit", "-qm", "bench snapshot"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set", action="append", default=[], help="params override key=value")
    parser.add_argument("--track", action="store_true", help="log to MLflow (embedded sqlite store)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cpcsam-bench-"))
    copy_tree(work)
    env = {} if args.track else {"CPCSAM_TRACKING": "off"}
    rows: list[tuple[str, str, float]] = []
    try:
        write_overrides(work / "params.yaml", args.set)  # the copy's own params: the checkout is never written
        order = stages.stage_order(work)
        start = time.perf_counter()
        for stage in order:
            result = stages.repro_stage(work, stage, env=env)
            rows.append((stage, "ran" if result["ran"] else "skipped", float(result["seconds"])))
        total = time.perf_counter() - start
        t0 = time.perf_counter()
        out = stages.run_dvc(work, ["repro"], env=env)
        noop = time.perf_counter() - t0
        ran_again = [line for line in out.splitlines() if line.startswith("Running stage")]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"Pipeline wall time — {platform.machine()}, {os.cpu_count()} CPUs, overrides: "
          f"{' '.join(args.set) or '(none: params.yaml as committed)'}\n")
    print("| stage | | seconds |\n| --- | --- | ---: |")
    for stage, verb, seconds in rows:
        print(f"| {stage} | {verb} | {seconds:.1f} |")
    print(f"| **first `dvc repro`, all stages** | | **{total:.1f}** ({total / 60:.1f} min) |")
    print(f"| second `dvc repro` | {'no-op' if not ran_again else 're-ran: ' + ', '.join(ran_again)} | {noop:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
