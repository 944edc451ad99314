"""Peak memory of ViT-B inference (the path `predict` and the served model take), per backend.

    .venv/bin/python benchmarks/bench_memory.py [--config vit_b] [--entities 4] [--image 768x1024] [--threads 1]

A ViT-B-size CPC-SAM (random weights: no SA-1B weights here; CaPL in `causal` mode, LoRA merged)
is saved and exported once; then each backend runs in a fresh process — load, one image with N
box prompts through `cpcsam.predict.segment_image`, three times — and reports its peak RSS
(`ru_maxrss`: the whole process, Python and libraries included) and its seconds per image. The
export's own peak is reported too: it is a one-off, not a serving cost. Training memory per mode
is `benchmarks/bench_train.py`'s table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_child(config: str, root: Path) -> dict:
    import torch

    from cpcsam.export.onnx import export_decoder, export_image_encoder, prepare_for_export
    from cpcsam.modeling import build_cpcsam, save_cpcsam

    torch.manual_seed(0)
    cfg = {"type": config, "capl": {"mode": "causal"}}
    model = build_cpcsam(cfg, with_lora=True)
    with torch.no_grad():  # CaPL and LoRA B start at zero: make them compute
        for name, p in model.named_parameters():
            if name.startswith("capl.") or "lora_B" in name:
                p.add_(0.02 * torch.randn_like(p))
    save_cpcsam(root / "model.pt", model.eval(), cfg)
    started = time.perf_counter()
    merged = prepare_for_export(model.eval())
    export_image_encoder(merged, root / "onnx" / "image_encoder.onnx")
    export_decoder(merged, root / "onnx" / "decoder_capl.onnx")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": _peak_mb()}


def run_child(backend: str, root: Path, entities: int, size: tuple[int, int], threads: int) -> dict:
    import numpy as np
    import torch

    from cpcsam.predict import EntityPrompt, configure_predict_process, make_backend, segment_image

    torch.set_num_threads(threads)
    configure_predict_process(backend)  # as `cpcsam predict` sets its process
    engine = make_backend(backend, root / "onnx", root / "model.pt", "cpu", threads)
    rng = np.random.default_rng(0)
    h, w = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    prompts = []
    for i in range(entities):
        x0, y0 = rng.uniform(0, 0.6 * w), rng.uniform(0, 0.6 * h)
        box = np.array([[x0, y0], [x0 + 0.3 * w, y0 + 0.3 * h]])
        prompts.append(EntityPrompt(class_name="object", coords=box, labels=np.array([2, 3])))
    times = []
    for _ in range(3):
        started = time.perf_counter()
        masks, _ = segment_image(engine, pixels, prompts)
        times.append(time.perf_counter() - started)
    assert masks.shape == (entities, h, w)
    return {"seconds_per_image": min(times), "peak_rss_mb": _peak_mb()}


def _in_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(config: str, entities: int, size: tuple[int, int], threads: int) -> list[tuple[str, float, float, str]]:
    """(process, peak RSS MB, seconds, unit) of the export and of each backend's inference, each
    in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        exported = _in_child(["export", config, tmp])
        rows = [("export (one-off)", exported["peak_rss_mb"], exported["seconds"], "s in all")]
        for backend in ("onnx", "torch"):
            res = _in_child(["run", backend, tmp, entities, list(size), threads])
            rows.append((f"inference, {backend}", res["peak_rss_mb"], res["seconds_per_image"], "s/image"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit_b")
    parser.add_argument("--entities", type=int, default=4)
    parser.add_argument("--image", default="768x1024", help="HxW of the input image")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = json.loads(args.child)
        if kind == "export":
            result = export_child(rest[0], Path(rest[1]))
        else:
            result = run_child(rest[0], Path(rest[1]), int(rest[2]), tuple(rest[3]), int(rest[4]))
        print(json.dumps(result))
        return 0
    size = tuple(int(v) for v in args.image.split("x"))
    rows = measure(args.config, args.entities, size, args.threads)
    print(f"Peak RSS, {args.config}, {args.entities} entities, image {size[0]}×{size[1]}, {args.threads} thread(s)\n")
    print("| process | peak RSS (MB) | time |\n| --- | ---: | ---: |")
    for name, rss, seconds, unit in rows:
        print(f"| {name} | {rss:.0f} | {seconds:.2f} {unit} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
