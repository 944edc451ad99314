"""Wall time of the whole DVC pipeline, stage by stage, and of the no-op second `dvc repro`.

    .venv/bin/python benchmarks/bench_pipeline.py                     # embedded default (oceancoco)
    .venv/bin/python benchmarks/bench_pipeline.py -S data.profile=tiny -S train.steps=20

Runs in a temporary copy of the working tree (git-tracked and new files; no data, no caches),
so the checkout's own outputs are untouched. Each stage is one `dvc repro --single-item`,
scheduled over DVC's graph exactly as `cpcsam run` and the `train` flow do: one fresh copy per
`--jobs` value (default: one at a time, then as many as `flow.stage_jobs` allows), side by side in
one run; tracking is off unless --track. Prints a markdown table, the ratio, and whether the two
runs' dvc.lock files are identical.
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


def run_once(overrides: list[str], jobs_arg: str, track: bool = False, keep: bool = False) -> dict:
    """One first `dvc repro` of a fresh copy, stages as `cpcsam run` and the train flow run them;
    then a second `dvc repro`, which should find nothing to do."""
    from cpcsam.config import load_config

    work = Path(tempfile.mkdtemp(prefix="cpcsam-bench-"))
    copy_tree(work)
    env = {} if track else {"CPCSAM_TRACKING": "off"}
    try:
        write_overrides(work / "params.yaml", overrides)  # the copy's own params: the checkout is never written
        jobs = stages.parallel_jobs(load_config(work / "params.yaml")) if jobs_arg == "auto" else int(jobs_arg)
        order, edges = stages.stage_graph(work)
        start = time.perf_counter()
        results = stages.run_graph(order, edges, lambda stage: stages.repro_stage(work, stage, env=env), jobs)
        total = time.perf_counter() - start
        t0 = time.perf_counter()
        out = stages.run_dvc(work, ["repro"], env=env)
        noop = time.perf_counter() - t0
        ran_again = [line for line in out.splitlines() if line.startswith("Running stage")]
        lock = (work / "dvc.lock").read_text()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return {"jobs": jobs, "results": results, "total": total, "noop": noop, "ran_again": ran_again, "lock": lock}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set", action="append", default=[], help="params override key=value")
    parser.add_argument("--jobs", default="1,auto",
                        help="stages at once, one fresh run per value, in this order (auto: flow.stage_jobs)")
    parser.add_argument("--track", action="store_true", help="log to MLflow (embedded sqlite store)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args()

    runs = [run_once(args.set, value.strip(), args.track, args.keep) for value in args.jobs.split(",")]
    print(f"Pipeline wall time — {platform.machine()}, {os.cpu_count()} CPUs, overrides: "
          f"{' '.join(args.set) or '(none: params.yaml as committed)'}\n")
    print("| stage | " + " | ".join(f"{r['jobs']} at once: s" for r in runs) + " |")
    print("| --- |" + " ---: |" * len(runs))
    for i, first in enumerate(runs[0]["results"]):
        cells = [f"{r['results'][i]['seconds']:.1f}" + ("" if r["results"][i]["ran"] else " (skipped)") for r in runs]
        print(f"| {first['stage']} | " + " | ".join(cells) + " |")
    print("| **first `dvc repro`, all stages** | " + " | ".join(f"**{r['total']:.1f}** ({r['total'] / 60:.1f} min)"
                                                            for r in runs) + " |")
    print("| second `dvc repro` | " + " | ".join("no-op" if not r["ran_again"] else "re-ran: " + ", ".join(r["ran_again"])
                                               for r in runs) + " |")
    if len(runs) > 1:
        print(f"\n{runs[-1]['jobs']} at once / {runs[0]['jobs']} at once: {runs[-1]['total'] / runs[0]['total']:.2f}x "
              f"the wall time; dvc.lock {'identical' if len({r['lock'] for r in runs}) == 1 else 'DIFFERS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
