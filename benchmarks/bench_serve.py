"""Serving throughput and latency: `mlflow models serve` on a registered CPC-SAM, over real HTTP.

    .venv/bin/python benchmarks/bench_serve.py [--config small] [--requests 40] [--concurrency 1,2]
        [--entities 4] [--image photo.jpg] [--threads 1] [--workers 1] [--out table.md]
    .venv/bin/python benchmarks/bench_serve.py --url http://127.0.0.1:5001 --class-name crab   # a running `make serve`

Without `--url` it builds the path `make serve` takes, in a throw-away folder: a CPC-SAM of
`--config` (random weights, LoRA and CaPL moved off their identity init so they compute), exported
to ONNX, registered by `operations.registry.register_candidate` (gate passed) into a sqlite
registry, and served by `mlflow models serve -m models:/cpcsam-bench@champion --env-manager local`
on a free loopback port (`--workers` uvicorn workers, `--threads` onnxruntime threads per graph,
CPU). With `--url` it measures that server instead.

One request = one image (`--image`, default a TrashCan image when ../shared/data is there, else a
synthetic 480x640 JPEG) and `--entities` box prompts (the first with a positive point too), in the
`dataframe_split` format of `operations.pyfunc`. After `--warmup` requests, for each concurrency C
in `--concurrency`, `--requests` requests are sent from C client threads. Reported per C:
requests/s (requests / wall time), p50 and p95 latency (client side, ms); and, as the floor the
HTTP layer adds to, the p50 of the same request through `mlflow.pyfunc.load_model(...).predict` in
this process (self-built model only).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRASHCAN = Path(os.environ.get("CPCSAM_SHARED_DIR", ROOT.parent / "shared")) / "data" / "trashcan"
MODEL = "cpcsam-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_image(path: str | None, folder: Path) -> Path:
    if path:
        return Path(path)
    coco = TRASHCAN / "annotations.json"
    if coco.is_file():
        first = json.loads(coco.read_text())["images"][0]["file_name"]
        return TRASHCAN / "images" / first
    from PIL import Image

    rng = np.random.default_rng(0)
    out = folder / "synthetic.jpg"
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(out, quality=90)
    return out


def entities_for(width: int, height: int, n: int, class_name: str) -> list[dict]:
    """`n` boxes on a grid over the image; the first also gets a positive point at its centre."""
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = []
    for k in range(n):
        r, c = divmod(k, cols)
        x0, y0 = c * width / cols + 4, r * height / rows + 4
        x1, y1 = (c + 1) * width / cols - 4, (r + 1) * height / rows - 4
        out.append({"class": class_name, "box": [round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)]})
    x0, y0, x1, y1 = out[0]["box"]
    out[0]["points"] = [[(x0 + x1) / 2, (y0 + y1) / 2]]
    return out


def build_registered_model(config: str, work: Path) -> str:
    """Export + register a CPC-SAM of `config`; returns the sqlite tracking URI."""
    import torch

    from cpcsam.export.onnx import export_decoder, export_image_encoder, prepare_for_export
    from cpcsam.modeling import build_cpcsam
    from operations import registry, tracking

    torch.manual_seed(0)
    model = build_cpcsam({"type": config, "capl": {"mode": "causal"}}, with_lora=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("capl.") or "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    merged = prepare_for_export(model.eval())
    export = work / "export"
    export_image_encoder(merged, export / "image_encoder.onnx")
    export_decoder(merged, export / "decoder_capl.onnx")
    gate = work / "gate.json"
    gate.write_text(json.dumps({"passed": True, "reasons": []}))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    params = {"data": {"profile": "bench"},
              "tracking": {"uri": uri, "experiment": "bench", "artifact_location": str(work / "mlruns")}}
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tracking.pipeline_run(params, run_name="bench", root=work) as run:
        registry.register_candidate(run.run_id, params, gate, export)
    return uri


def start_server(tracking_uri: str, work: Path, threads: int, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "CPCSAM_SERVE_DEVICE": "cpu",
           "CPCSAM_SERVE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
                            env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/ping", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise SystemExit(f"server did not start; log:\n{(work / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the uvicorn workers go with it
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def post(url: str, body: bytes) -> float:
    start = time.perf_counter()
    req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        payload = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {payload[:300]!r}")
    return time.perf_counter() - start


def run_load(url: str, body: bytes, requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            took = post(url, body)
            with lock:
                latencies.append(took)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    return {"concurrency": concurrency, "requests": len(ms), "rps": len(ms) / wall,
            "p50_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(np.ceil(0.95 * len(ms))) - 1)]}


def in_process_p50(tracking_uri: str, frame, threads: int, repeats: int) -> float:
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion", model_config={"device": "cpu", "threads": threads})
    for _ in range(3):
        model.predict(frame)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(frame)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: build, register and serve a model here)")
    parser.add_argument("--config", default="small", help="SAM size of the self-built model (small, vit_b, ...)")
    parser.add_argument("--image")
    parser.add_argument("--entities", type=int, default=4)
    parser.add_argument("--class-name", default="object")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--concurrency", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per graph in the server")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (each loads the model)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    from PIL import Image

    from operations.pyfunc import request_frame, serving_json

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        image = pick_image(args.image, work)
        width, height = Image.open(image).size
        frame = request_frame([image.read_bytes()], [entities_for(width, height, args.entities, args.class_name)])
        body = json.dumps(serving_json(frame)).encode()
        proc, tracking_uri = None, None
        if args.url:
            url = args.url.rstrip("/")
        else:
            t0 = time.perf_counter()
            tracking_uri = build_registered_model(args.config, work)
            proc, url = start_server(tracking_uri, work, args.threads, args.workers)
            print(f"# model built, registered and served in {time.perf_counter() - t0:.1f} s at {url}", file=sys.stderr)
        try:
            for _ in range(args.warmup):
                post(url, body)
            results = [run_load(url, body, args.requests, int(c)) for c in args.concurrency.split(",")]
        finally:
            if proc is not None:
                stop(proc)
        floor = in_process_p50(tracking_uri, frame, args.threads, max(10, args.requests // 2)) if tracking_uri else None

    where = args.url or f"`{args.config}` model, {args.workers} worker(s), {args.threads} onnxruntime thread(s), CPU"
    lines = [f"Serving {where}; image {image.name} ({width}x{height}), {args.entities} entities/request, "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end",
             "", "| concurrency | requests | requests/s | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['rps']:.2f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
    if floor is not None:
        lines += ["", f"In-process `pyfunc.predict` (no HTTP), same request: p50 {floor:.1f} ms"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
