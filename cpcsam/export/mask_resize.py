"""The decoder's mask postprocessing, one function in two forms: PyTorch's `interpolate`
(`cpcsam.modeling.transforms.postprocess_masks_interpolated`), and matrix products for the
exported graph, because onnxruntime's `Resize` runs on one thread.

SAM's postprocessing resizes the [N, 1, l, l] low-resolution logits twice: ×f bilinear to the
square model frame, a crop to the resized image, bilinear to the original (H, W). onnxruntime's
CPU `Resize` at full size was the exported graph's largest cost: 110 of 548 ms
at 16 entities and a 1200×1800 image (ViT-B decoder sizes, 2 threads), where PyTorch's
multi-threaded `interpolate` is no faster on the same work.

Both resizes are linear along each axis, so their composition is one matrix per axis:
out = A_H · x · A_Wᵀ with A_H [H, l] and A_W [W, l]. Each output row of A reads at most four
neighbouring low-resolution rows (two bilinear taps of two bilinear taps), so:

- A_W is built dense (a scatter of four taps per output column) and x · A_Wᵀ is one product
  over the rows the crop keeps: [N, h', l] × [l, W], small because h' ≤ l.
- A_H is applied in blocks of R output rows, each block reading only its window of w
  neighbouring rows of that product: [B, R, w] × [N, 1, B, w, W] → [N, 1, B·R = H, W], w/h' of
  a dense product's multiply-adds (about a tenth at 1200×1800). R is a divisor of H,
  so that the blocks tile the output exactly: slicing a padded [N, 1, B·R, W] result down to H
  rows would copy the full-size output once more (onnxruntime's Slice copies; 36 ms at 16
  entities). An H with no divisor in [32, 128] (a prime, say) is one block: a dense product,
  slower but the same result.

Measured side by side (benchmarks/bench_mask_resize.py: 1 / 4 / 16 masks to 1200×1800, 2
threads): 8.2 / 33.2 / 117.0 ms for the two `Resize` nodes against 2.9 / 13.1 / 38.8 ms here,
the graph output's final Reshape (a copy) included. The result equals the two resizes to float32
rounding (the weights are products of the two stages' interpolation weights, rounded once), and
is closer to PyTorch's `interpolate` than onnxruntime's own `Resize` is: on logits of spread 10,
max |Δ| 2.8e-04–3.5e-04 against 1.0e-03–1.3e-03 there. PyTorch keeps `interpolate`, which runs
on every thread.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpcsam.modeling.transforms import low_res_rows_read

# Output rows per block of A_H's product are a divisor of H in this range (see the module docstring):
# small enough that a block's window stays narrow, large enough that each block's product is a real GEMM.
MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK = 32, 128


def composed_taps(out_len: Tensor, inner: Tensor, low: int, factor: int) -> tuple[Tensor, Tensor]:
    """Upsample ×`factor` (low → factor·low), keep the first `inner`, resize to `out_len`, as taps:
    for each output index, four low-resolution indices [out_len, 4] (int64, non-decreasing along
    each row and from row to row) and their weights [out_len, 4] (float32).

    Both stages are PyTorch's bilinear with align_corners=False: a source coordinate
    (o + 0.5)·scale − 0.5, clamped at 0, and its two neighbours (the right one clamped at the
    last index) weighted by distance."""
    inner_f = inner.to(torch.float32)
    o = torch.arange(0, out_len).to(torch.float32)
    s2 = torch.clamp((o + 0.5) * (inner_f / out_len.to(torch.float32)) - 0.5, min=0.0)
    m0 = torch.floor(s2)
    mu = s2 - m0
    m1 = torch.minimum(m0 + 1, inner_f - 1)

    def first_stage(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # clamped at low − 1 too: past it, bilinear's right neighbour is the last index itself
        s1 = torch.clamp((m + 0.5) / factor - 0.5, min=0.0, max=float(low - 1))
        i0 = torch.floor(s1)
        return i0, torch.clamp(i0 + 1, max=float(low - 1)), s1 - i0

    a0, a1, lam_a = first_stage(m0)
    b0, b1, lam_b = first_stage(m1)
    index = torch.stack([a0, a1, b0, b1], dim=-1).to(torch.int64)
    weight = torch.stack([(1 - mu) * (1 - lam_a), (1 - mu) * lam_a, mu * (1 - lam_b), mu * lam_b], dim=-1)
    return index, weight


def rows_per_block(rows: Tensor) -> Tensor:
    """The largest divisor of `rows` in [MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK], else `rows` (one block)."""
    candidates = torch.arange(MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK + 1)
    divides = (torch.remainder(rows, candidates) == 0).to(torch.int64)
    best = (candidates * divides).max()
    return torch.where(best > 0, best, rows)


def _apply_to_columns(x: Tensor, out_cols: Tensor, inner: Tensor, low: int, factor: int) -> Tensor:
    """x [N, 1, h', w'] → [N, 1, h', out_cols]: the dense A_W (four taps scattered per column)."""
    index, weight = composed_taps(out_cols, inner, low, factor)
    a_w = torch.zeros(index.shape[0], x.shape[-1], dtype=x.dtype).scatter_add(1, index, weight)
    return x @ a_w.transpose(0, 1)


def _apply_to_rows(t: Tensor, out_rows: Tensor, inner: Tensor, low: int, factor: int) -> Tensor:
    """t [N, 1, h', W] → [N, 1, out_rows, W]: A_H in blocks of R rows, each on its window of t's rows."""
    index, weight = composed_taps(out_rows, inner, low, factor)
    block = rows_per_block(out_rows)
    index = index.reshape(-1, block, 4)  # B x R x 4
    start = index[:, 0, 0]  # each block's first row's first tap is its smallest index
    local = (index - start[:, None, None]).reshape(-1, 4)
    width = local.max() + 1
    weights = torch.zeros(local.shape[0], width, dtype=t.dtype).scatter_add(1, local, weight)
    window = torch.clamp(start[:, None] + torch.arange(0, width), max=t.shape[2] - 1)  # B x w (clamped: weight 0)
    rows = t[:, :, window]  # N x 1 x B x w x W
    # expanded to N explicitly: onnxruntime's MatMul does not broadcast a 1 to N = 0 entities
    weights = weights.reshape(-1, block, width).expand(t.shape[0], 1, -1, -1, -1)
    return (weights @ rows).reshape(t.shape[0], 1, out_rows, t.shape[-1])


def postprocess_masks_as_products(low_res: Tensor, inner: Tensor, orig_im_size: Tensor, image_size: int) -> Tensor:
    """`transforms.postprocess_masks_interpolated`'s function as the products of the module docstring."""
    low, factor, need = low_res_rows_read(low_res, inner, image_size)
    out = orig_im_size.to(torch.int64)
    x = low_res[..., : need[0], : need[1]]
    return _apply_to_rows(_apply_to_columns(x, out[1], inner[1], low, factor), out[0], inner[0], low, factor)
