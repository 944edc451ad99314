"""GPU smoke test: does the pipeline's CUDA path work, and what does it cost? (< 5 min on one GPU)

    bash benchmarks/gpu_smoke.sh                      # ViT-B on cuda
    bash benchmarks/gpu_smoke.sh --steps 5 --out gpu_smoke.md
    .venv/bin/python benchmarks/gpu_smoke.py --device cpu --config small   # the same code path on the CPU

Without a usable CUDA device (and no `--device cpu`) it prints `gpu_smoke: no GPU: skipped (...)`
and exits 0, so CI on CPU machines can call it unconditionally. On a GPU, with random ViT-B
weights (1024² input; nothing is downloaded) and a few synthetic images:

1. training steps through the real trainer (`prepare_training` + `train_step`) on the GPU:
   bi-level with encoder LoRA (uncached, float16 autocast + GradScaler), the same with encoder
   gradient checkpointing, and LoRA-only with a frozen encoder reading the embedding cache
   (built on the GPU by the embed stage's code); seconds per step and peak GPU memory each;
2. ONNX: both graphs exported as the export stage does, run by onnxruntime on the CUDA provider,
   parity against PyTorch (the export stage's check and tolerances);
3. latency (p50 over repeats, after warm-up): image encoder in onnxruntime CUDA and in PyTorch
   (float32 and float16 autocast), decoder + CaPL in onnxruntime CUDA for 1 and 16 entities;
4. one markdown table on stdout (and `--out`).
Exit 0 when everything ran and parity passed; 3 when parity failed; 1 on an error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def gpu_available() -> tuple[bool, str]:
    """Whether torch sees a usable CUDA device, and why not when it does not."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - the project depends on torch
        return False, f"torch is not importable: {exc}"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    try:
        torch.zeros(1, device="cuda").add_(1)
    except Exception as exc:  # a driver that lists a device but cannot run on it
        return False, f"CUDA device present but unusable: {exc}"
    return True, torch.cuda.get_device_name(0)


class Probe:
    """Wall time and peak memory of a block (GPU: synchronised, `max_memory_allocated`)."""

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def p50_ms(self, fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)


def _sections(config: str, device: str, cache: bool, mode: str, encoder_lora: bool, amp: bool,
              checkpointing: bool) -> tuple[Any, Any]:
    from cpcsam.config import ModelConfig, TrainConfig, read_params_file

    params = read_params_file(ROOT / "params.yaml")
    model = dict(params["model"], type=config, checkpoint=None)
    model["lora"] = {**model.get("lora", {}),
                     "targets": ["image_encoder_qkv", "decoder_attention"] if encoder_lora else ["decoder_attention"]}
    train = dict(params["train"], mode=mode, device=device, batch_images=1, max_entities=4, upper_max_entities=1,
                 embedding_cache="on" if cache else "off", steps=1000, checkpoint_every=1000, amp=amp,
                 grad_checkpointing=checkpointing)
    return TrainConfig.from_params(train), ModelConfig.from_params(model)


def train_case(name: str, config: str, device, steps: int, root: Path, manifest, prompts, *, mode: str,
               encoder_lora: bool, cache: bool, amp: bool, checkpointing: bool = False) -> dict[str, Any]:
    """A few real training steps; seconds per step and peak memory (after one warm-up step)."""
    import torch

    from cpcsam.config import EmbedConfig, PerturbConfig
    from cpcsam.training.run import build_embedding_cache, prepare_training

    train, model = _sections(config, device.type, cache, mode, encoder_lora, amp, checkpointing)
    probe = Probe(device)
    emb = root / f"emb-{name}"
    if cache:
        build_embedding_cache(train, model, EmbedConfig(batch_size=1, device=device.type), manifest, None, emb,
                              progress=False)
    trainer = prepare_training(train, model, PerturbConfig(k=4), manifest, prompts, None, None, embeddings_dir=emb)
    trainer.train_step()  # warm-up: cuDNN autotuning, allocator growth
    probe.reset()
    started = time.perf_counter()
    for _ in range(steps):
        metrics = trainer.train_step()
    probe.sync()
    seconds = (time.perf_counter() - started) / steps
    finite = all(v == v and abs(v) != float("inf") for k, v in metrics.items() if k.startswith("loss"))
    result = {"case": name, "s/step": seconds, "peak MB": probe.peak_mb(), "finite losses": finite,
              "images/step": trainer.images_seen / trainer.step}
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def onnx_section(config: str, device, workdir: Path, repeats: int) -> dict[str, Any]:
    """Export both graphs, parity on the onnxruntime provider of `device`, latencies."""
    import numpy as np
    import torch

    from cpcsam.export.onnx import export_decoder, export_image_encoder, prepare_for_export
    from cpcsam.export.parity import ParityCase, check_parity
    from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
    from cpcsam.modeling import CPCSAM
    from cpcsam.modeling.build import build_sam_from_arch, resolve_arch

    torch.manual_seed(0)
    model = CPCSAM(build_sam_from_arch(resolve_arch({"type": config})), {"mode": "causal"})
    with torch.no_grad():  # off the identity init, so CaPL computes for real
        for p in model.capl.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = prepare_for_export(model)
    encoder_path = export_image_encoder(model, workdir / "image_encoder.onnx")
    decoder_path = export_decoder(model, workdir / "decoder_capl.onnx")
    ort_device = "cuda" if device.type == "cuda" else "cpu"
    encoder = OnnxImageEncoder(encoder_path, device=ort_device)
    decoder = OnnxDecoder(decoder_path, device=ort_device)
    rng = np.random.default_rng(0)
    size = model.image_size
    cases = []
    for i, (h, w, n) in enumerate([(int(size * 0.75), size, 4), (size, int(size * 0.6), 16)]):
        image = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        xy = rng.uniform(0.1, 0.9, size=(n, 2)) * [w, h] * size / max(h, w)
        coords = np.stack([xy - 0.05 * size, xy + 0.05 * size, xy], axis=1).astype(np.float32)
        labels = np.tile(np.array([2, 3, 1], np.float32), (n, 1))
        cases.append(ParityCase(f"case{i}", image, coords, labels))
    parity = check_parity(model, encoder, decoder, cases)

    probe = Probe(device)
    x = np.zeros((1, 3, size, size), np.float32)
    features = encoder(x)  # the embedding, and the entity module's keys
    result = {
        "providers": parity["providers"],
        "parity": "passed" if parity["passed"] else "FAILED: " + "; ".join(parity["failures"][:3]),
        "max abs logit diff vs PyTorch": parity["max_abs_logit_diff"],
        "encoder onnxruntime ms": probe.p50_ms(lambda: encoder(x), repeats),
    }
    for n in (1, 16):
        coords = np.tile(np.array([[[100, 100], [300, 300], [200, 200]]], np.float32), (n, 1, 1))
        labels = np.tile(np.array([[2, 3, 1]], np.float32), (n, 1))
        result[f"decoder onnxruntime ms ({n} entities)"] = probe.p50_ms(
            lambda: decoder(features["image_embeddings"], coords, labels, (size, size),
                            entity_keys=features.get("entity_keys")), repeats)
    torch_model = model.to(device)
    images = torch.zeros(1, 3, size, size, device=device)
    with torch.no_grad():
        result["encoder torch fp32 ms"] = probe.p50_ms(lambda: torch_model.encode_images(images), repeats)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                result["encoder torch fp16 ms"] = probe.p50_ms(lambda: torch_model.encode_images(images), repeats)
    result["passed"] = parity["passed"]
    return result


def markdown(header: dict[str, str], train_rows: list[dict[str, Any]], onnx: dict[str, Any] | None) -> str:
    def fmt(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"
        return str(value)

    lines = [f"GPU smoke: {', '.join(f'{k} {v}' for k, v in header.items())}", "",
             "| what | value |", "| --- | --- |"]
    for row in train_rows:
        peak = f"{fmt(row['peak MB'])} MB" if row["peak MB"] is not None else "n/a"
        lines.append(f"| train: {row['case']} | {fmt(row['s/step'])} s/step, peak GPU memory {peak}, "
                     f"{fmt(row['images/step'])} images/step, losses finite: {row['finite losses']} |")
    if onnx is not None:
        for key, value in onnx.items():
            if key != "passed":
                lines.append(f"| onnx: {key} | {fmt(value)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit_b", help="SAM type (vit_b; small for a quick run)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: run the same code on the CPU (a check of this script, not a benchmark)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per case")
    parser.add_argument("--repeats", type=int, default=10, help="latency repetitions")
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args(argv)

    if args.device == "cuda":
        ok, why = gpu_available()
        if not ok:
            print(f"gpu_smoke: no GPU: skipped ({why})")
            return 0
    import torch

    from bench_train import _dataset

    device = torch.device(args.device)
    header = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "config": args.config,
              "torch": torch.__version__}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_smoke-") as tmp:
        root = Path(tmp)
        manifest, prompts = _dataset(root, args.config, 4)
        common = dict(config=args.config, device=device, steps=args.steps, root=root, manifest=manifest,
                      prompts=prompts)
        rows = [
            train_case("bilevel, encoder LoRA, uncached, amp", mode="bilevel", encoder_lora=True, cache=False,
                       amp=True, **common),
            train_case("bilevel, encoder LoRA, uncached, amp, grad checkpointing", mode="bilevel",
                       encoder_lora=True, cache=False, amp=True, checkpointing=True, **common),
            train_case("lora-only, frozen encoder, cached, amp", mode="lora-only", encoder_lora=False, cache=True,
                       amp=True, **common),
        ]
        onnx = onnx_section(args.config, device, root, args.repeats)
    header["wall time"] = f"{time.perf_counter() - started:.0f} s"
    table = markdown(header, rows, onnx)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if not all(row["finite losses"] for row in rows):
        print("gpu_smoke: non-finite training losses", file=sys.stderr)
        return 1
    return 0 if onnx["passed"] else 3


if __name__ == "__main__":
    sys.exit(main())
