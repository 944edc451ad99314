"""Training speed alone and beside a busy process, per torch thread setting (the contention cliff).

    python benchmarks/bench_threads.py [--steps 60] [--threads 0,1,2]

Trains the `cpcsam` variant on the embedded data for `--steps` steps (after warm-up) in a fresh
process, once on an idle machine and once while another process keeps one core busy, for each
`train.threads` value (0 = torch's default, all cores). Prints steps/s and the loaded/alone ratio
side by side, measured in one run. Needs `dvc repro embed` (or `make run`) first: it reads
data/ingest, data/prompts and artifacts/pretrain.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time, torch
from cpcsam.config import load_config
from cpcsam.data import load_manifest
from cpcsam.prompts.perturb import load_prompts
from cpcsam.training.device import apply_threads
from cpcsam.training.run import prepare_training
from cpcsam.training.variants import variant_sections
threads, steps = int(sys.argv[1]), int(sys.argv[2])
params = load_config("params.yaml", [f"train.threads={threads}"])
train, model = variant_sections("cpcsam", params.seeded("train"), params.model)
apply_threads(train.threads)
trainer = prepare_training(train, model, params.perturb, load_manifest("data/ingest/manifest.parquet"),
                           load_prompts("data/prompts/prompts.parquet"), "artifacts/pretrain/sam.pth", None)
for _ in range(5):
    trainer.train_step()
start = time.perf_counter()
for _ in range(steps):
    trainer.train_step()
print(steps / (time.perf_counter() - start), torch.get_num_threads())
"""


def _busy(stop) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2**31


def measure(threads: int, steps: int) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(steps)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]), int(out[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", default="0,1,2")
    args = parser.parse_args(argv)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        alone, used = measure(threads, args.steps)
        stop = multiprocessing.Event()
        busy = multiprocessing.Process(target=_busy, args=(stop,))
        busy.start()
        time.sleep(0.5)
        try:
            loaded, _ = measure(threads, args.steps)
        finally:
            stop.set()
            busy.join()
        rows.append((threads, used, alone, loaded))
    print(f"{os.cpu_count()} cores; train@cpcsam, {args.steps} steps after 5 warm-up steps")
    print("| train.threads | torch threads | steps/s alone | steps/s beside a busy process | loaded / alone |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for threads, used, alone, loaded in rows:
        print(f"| {threads} | {used} | {alone:.2f} | {loaded:.2f} | {loaded / alone:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
