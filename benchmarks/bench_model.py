"""Forward timings of the model configurations; prints a markdown table.

    .venv/bin/python benchmarks/bench_model.py [--types small base_small] [--entities 8] [--repeats 5]

Per SAM type: parameter counts (SAM, CaPL in `causal` mode, LoRA rank 4), image-encoder time per
image, decoder time for N entities of one image in `fixed` mode (plain SAM decoder) and in `causal`
mode (task + entity calibration), a CaPL training step (forward + backward through the decoder on
cached embeddings, K = 4 prompt groups) and, for comparison, the same passes training the SAM
decoder with plain prompts. Best of `--repeats` runs after one warm-up run; the machine is shared and
noisy, so compare ratios within one run. `vit_b` works too (about 17 s per encoder pass on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from cpcsam.modeling import CPCSAM, apply_lora, build_sam, capl_parameters, lora_parameters
from cpcsam.modeling.build import count_parameters


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs after a warm-up: on a shared machine other processes only ever
    add time, so the minimum is the least noisy estimate (as `timeit` recommends)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def bench_type(sam_type: str, entities: int, points: int, repeats: int) -> dict[str, str]:
    torch.manual_seed(0)
    fixed = CPCSAM(build_sam({"type": sam_type}), {"mode": "fixed"}).eval()
    causal = CPCSAM(build_sam({"type": sam_type}), {"mode": "causal"}).eval()
    lora_params = sum(p.numel() for p in lora_parameters(apply_lora(build_sam({"type": sam_type}))))
    size = fixed.image_size
    image = torch.randn(1, 3, size, size)
    coords = torch.rand(entities, points, 2) * size
    labels = torch.tensor([2, 3] + [1] * (points - 2)).repeat(entities, 1)
    index = torch.zeros(entities, dtype=torch.long)
    with torch.no_grad():
        encode_ms = best_ms(lambda: fixed.encode_images(image), repeats)
        emb = fixed.encode_images(image)
        sparse = fixed.embed_prompts(coords, labels)
        fixed_ms = best_ms(lambda: fixed.decode(emb, index, sparse), repeats)
        causal_ms = best_ms(
            lambda: causal.decode(emb, index, causal.calibrate_prompts(sparse[:, None], labels[:, None])[:, 0]),
            repeats,
        )

    k = 4
    grouped = sparse[:, None].expand(-1, k, -1, -1)
    grouped_labels = labels[:, None].expand(-1, k, -1)
    capl_opt = torch.optim.Adam(capl_parameters(causal), lr=1e-4)
    for p in causal.sam.parameters():
        p.requires_grad_(False)
    # The same K·N decoder passes training the SAM decoder itself with plain prompts (what a
    # decoder-side LoRA step on cached embeddings costs), for the ratio.
    decoder_opt = torch.optim.Adam(fixed.sam.mask_decoder.parameters(), lr=1e-4)

    def capl_step() -> None:
        calibrated = causal.calibrate_prompts(grouped, grouped_labels)
        out = causal.decode(emb, index.repeat(k), calibrated.transpose(0, 1).reshape(k * entities, points, -1))
        loss = out.low_res_logits.sigmoid().mean() + out.attn_map.mean() + out.calibration_l1
        capl_opt.zero_grad()
        loss.backward()
        capl_opt.step()

    def decoder_step() -> None:
        out = fixed.decode(emb, index.repeat(k), grouped.transpose(0, 1).reshape(k * entities, points, -1))
        loss = out.low_res_logits.sigmoid().mean()
        decoder_opt.zero_grad()
        loss.backward()
        decoder_opt.step()

    step_ms = best_ms(capl_step, repeats)
    decoder_step_ms = best_ms(decoder_step, repeats)
    return {
        "type": sam_type,
        "input": f"{size}²",
        "SAM params": f"{count_parameters(fixed.sam) / 1e6:.2f} M",
        "CaPL params": f"{sum(p.numel() for p in capl_parameters(causal)) / 1e3:.1f} k",
        "LoRA params (r=4)": f"{lora_params / 1e3:.1f} k",
        "encoder ms/image": f"{encode_ms:.1f}",
        f"decode ms, {entities} entities, fixed": f"{fixed_ms:.1f}",
        f"decode ms, {entities} entities, causal": f"{causal_ms:.1f}",
        "CaPL step ms (K=4)": f"{step_ms:.1f}",
        "SAM-decoder step ms (K=4, fixed)": f"{decoder_step_ms:.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["small", "base_small"])
    parser.add_argument("--entities", type=int, default=8)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [bench_type(t, args.entities, args.points, args.repeats) for t in args.types]
    header = list(rows[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row[h] for h in header) + " |")


if __name__ == "__main__":
    main()
