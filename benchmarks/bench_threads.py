"""Training and evaluation speed alone and beside a busy process, per torch thread setting (the contention cliff).

    python benchmarks/bench_threads.py [--steps 60] [--threads 0,1,2]
    python benchmarks/bench_threads.py --stage evaluate [--threads 0,1] [--repeats 2]

`--stage train` (default) trains the `cpcsam` variant on the embedded data for `--steps` steps
(after warm-up) in a fresh process, once on an idle machine and once while another process keeps
one core busy, for each `train.threads` value (0 = torch's default, all cores). Prints steps/s and
the loaded/alone ratio side by side, measured in one run. Needs `dvc repro embed` (or `make run`)
first: it reads data/ingest, data/prompts and artifacts/pretrain.

`--stage evaluate` times the whole evaluate stage (`python -m components.evaluate`, every model and
protocol of params.yaml, tracking off, outputs to a temporary folder) the same two ways for each
`evaluate.threads` value, `--repeats` times each, alternating alone and loaded so that a drift of
the machine's speed hits both. Needs `make run` first (it reads the trained models).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time, torch
from cpcsam.config import load_config
from cpcsam.data import load_manifest
from cpcsam.prompts.perturb import load_prompts
from cpcsam.training.run import configure_training_process, prepare_training
from cpcsam.training.variants import variant_sections
threads, steps = int(sys.argv[1]), int(sys.argv[2])
params = load_config("params.yaml", [f"train.threads={threads}"])
train, model = variant_sections("cpcsam", params.seeded("train"), params.model)
configure_training_process(model, train)  # as components/train.py
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


def _run(args: list[str], what: str, **env: str) -> str:
    """Run `python <args>` in the project with the stage's own thread setting (the caller's thread
    variables removed, they would override it); its stdout, or exit naming it with its stderr."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_threads: the {what} in {ROOT} failed (exit {done.returncode}; "
                         f"has `make run` produced its inputs?):\n{done.stderr[-3000:]}")
    return done.stdout


def measure(threads: int, steps: int) -> tuple[float, int]:
    out = _run(["-c", WORKER, str(threads), str(steps)], "training worker").split()
    return float(out[-2]), int(out[-1])


def measure_evaluate(threads: int) -> float:
    """Seconds of one whole evaluate stage (start-up and model loading included), as DVC runs it."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        _run(["-m", "components.evaluate", "--out", out, "-S", f"evaluate.threads={threads}"],
             "evaluate stage", CPCSAM_TRACKING="off")
        return time.perf_counter() - start


class BusyProcess:
    """Another program keeping one core busy (pure Python: no thread pool of its own)."""

    def __enter__(self) -> "BusyProcess":
        self.stop = multiprocessing.Event()
        self.process = multiprocessing.Process(target=_busy, args=(self.stop,))
        self.process.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.process.join()


def train_speeds(thread_values: list[int], steps: int) -> list[dict]:
    """Steps/s alone and beside a busy process, per `train.threads` value."""
    rows = []
    for threads in thread_values:
        alone, used = measure(threads, steps)
        with BusyProcess():
            loaded, _ = measure(threads, steps)
        rows.append({"threads": threads, "torch_threads": used, "alone": alone, "loaded": loaded,
                     "ratio": loaded / alone})
    return rows


def print_train(rows: list[dict], steps: int) -> None:
    print(f"{os.cpu_count()} cores; train@cpcsam, {steps} steps after 5 warm-up steps")
    print("| train.threads | torch threads | steps/s alone | steps/s beside a busy process | loaded / alone |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['threads']} | {r['torch_threads']} | {r['alone']:.2f} | {r['loaded']:.2f} | {r['ratio']:.2f} |")


def evaluate_times(thread_values: list[int], repeats: int) -> list[dict]:
    """Seconds of the whole evaluate stage alone and beside a busy process, alternating, per
    `evaluate.threads` value; `ratio` is the speed loaded / alone of the medians."""
    rows = []
    for threads in thread_values:
        alone, loaded = [], []
        for _ in range(repeats):
            alone.append(measure_evaluate(threads))
            with BusyProcess():
                loaded.append(measure_evaluate(threads))
        rows.append({"threads": threads, "alone": alone, "loaded": loaded,
                     "ratio": statistics.median(alone) / statistics.median(loaded)})
    return rows


def print_evaluate(rows: list[dict], repeats: int) -> None:
    print(f"{os.cpu_count()} cores; the evaluate stage of params.yaml, whole process, {repeats} run(s) each")
    print("| evaluate.threads | s alone | s beside a busy process | loaded / alone (speed, medians) |")
    print("| ---: | --- | --- | ---: |")
    for r in rows:
        print(f"| {r['threads']} | {_seconds(r['alone'])} | {_seconds(r['loaded'])} | {r['ratio']:.2f} |")


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("train", "evaluate"), default="train")
    parser.add_argument("--steps", type=int, default=60, help="train: steps timed per run")
    parser.add_argument("--threads", default=None, help="thread settings to compare (train: 0,1,2; evaluate: 0,1)")
    parser.add_argument("--repeats", type=int, default=2, help="evaluate: runs per setting and condition")
    args = parser.parse_args(argv)
    default = "0,1,2" if args.stage == "train" else "0,1"
    thread_values = [int(t) for t in (args.threads or default).split(",")]
    if args.stage == "train":
        print_train(train_speeds(thread_values, args.steps), args.steps)
    else:
        print_evaluate(evaluate_times(thread_values, args.repeats), args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
