"""The exported decoder's mask postprocessing: onnxruntime's `Resize` against the products of
`cpcsam.export.mask_resize`, side by side.

    .venv/bin/python benchmarks/bench_mask_resize.py [--sizes 1200x1800,1201x640,33x2000]
        [--entities 1,4,16] [--repeats 9] [--threads 2] [--out table.md]

Each form (`postprocess_masks_interpolated`, whose `interpolate` calls trace to two `Resize`
nodes, and `postprocess_masks_as_products`) is exported alone as a graph of the low-resolution
[N, 1, 256, 256] logits and the original size, and run in a session as the library makes them
(`create_session`), the two alternating, `--repeats` times per case after two warm-up runs.
Reported: p50 wall ms of each, their ratio, and each one's max |Δ| to PyTorch's `interpolate`.
1201 rows (a prime) have no block divisor: that case measures the dense fallback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpcsam.export.mask_resize import postprocess_masks_as_products  # noqa: E402
from cpcsam.export.onnx import _export, prepadded_size  # noqa: E402
from cpcsam.export.runtime import create_session  # noqa: E402
from cpcsam.modeling.transforms import postprocess_masks_interpolated  # noqa: E402

IMAGE_SIZE, LOW = 1024, 256


class _Postprocess(nn.Module):
    def __init__(self, form) -> None:
        super().__init__()
        self.form = form

    def forward(self, low_res: Tensor, orig_im_size: Tensor) -> Tensor:
        return self.form(low_res, prepadded_size(orig_im_size, IMAGE_SIZE), orig_im_size, IMAGE_SIZE)


FORMS = {"Resize": postprocess_masks_interpolated, "products": postprocess_masks_as_products}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1200x1800,1201x640,33x2000", help="original image sizes HxW")
    parser.add_argument("--entities", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, form in FORMS.items():
            path = Path(tmp) / f"{name}.onnx"
            _export(_Postprocess(form), (torch.randn(2, 1, LOW, LOW), torch.tensor([1200.0, 1800.0])), path,
                    ["low_res", "orig_im_size"], ["masks"], {"low_res": {0: "n"}, "masks": {0: "n", 2: "h", 3: "w"}}, 17)
            sessions[name], _ = create_session(path, "cpu", args.threads)
    lines = [f"Mask postprocessing, [N, 1, {LOW}, {LOW}] logits to full size, {args.threads} threads (p50 ms)", "",
             "| H×W | N | two Resize nodes | products | products / Resize | max abs diff to interpolate: Resize, products |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        orig = np.asarray([h, w], np.float32)
        for n in (int(v) for v in args.entities.split(",")):
            feed = {"low_res": (torch.randn(n, 1, LOW, LOW, generator=gen) * 10).numpy(), "orig_im_size": orig}
            reference = _Postprocess(postprocess_masks_interpolated)(torch.from_numpy(feed["low_res"]),
                                                                     torch.from_numpy(orig)).numpy()
            times: dict[str, list[float]] = {name: [] for name in sessions}
            errors = {name: float(np.abs(s.run(None, feed)[0] - reference).max()) for name, s in sessions.items()}
            for session in sessions.values():
                session.run(None, feed)
            for _ in range(args.repeats):
                for name, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, feed)
                    times[name].append(time.perf_counter() - start)
            p50 = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            lines.append(f"| {h}×{w} | {n} | {p50['Resize']:.1f} | {p50['products']:.1f} | "
                         f"{p50['products'] / p50['Resize']:.2f}× | {errors['Resize']:.1e}, {errors['products']:.1e} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
