"""Global attention of the image encoder in query-row chunks, for the exported encoder graph.

A global-attention block of SAM's ViT holds its whole attention matrix at once: heads × HW × HW
floats, 12 × 4096² × 4 B = 0.8 GB at ViT-B sizes, and softmax keeps its input and output alive
together. ONNX Runtime runs the traced graph as written, so the served encoder peaked at 4.6 GB
(benchmarks/bench_memory.py). Attention rows are independent of each other (the softmax runs
along the keys), so computing them a band of grid rows at a time gives the same result with one
band's matrix alive at a time; the decomposed relative-position bias splits the same way (its
height term is indexed by the query row, its width term does not depend on it).

`ChunkedAttention` is swapped in for the export only (`chunked_global_attention`). Training and the
PyTorch backend keep segment-anything's module untouched. A block whose matrix fits the budget
in one band keeps segment-anything's own forward, so the graphs of small models do not change.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

import cpcsam.modeling  # noqa: F401  (first: segment_anything without its package __init__, see sam_package)
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import Tensor, nn

# Bytes of attention logits one band may hold (one float32 matrix: heads × band rows·W × HW).
DEFAULT_BAND_BYTES = 256 * 2**20


class ChunkedAttention(nn.Module):
    """segment-anything's encoder `Attention`, computed `band_rows` query grid rows at a time.

    Holds the original module's parameters (not copies): state-dict keys are unchanged.
    """

    def __init__(self, attention: Attention, band_rows: int) -> None:
        super().__init__()
        self.num_heads = attention.num_heads
        self.scale = attention.scale
        self.qkv = attention.qkv
        self.proj = attention.proj
        self.use_rel_pos = attention.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attention.rel_pos_h
            self.rel_pos_w = attention.rel_pos_w
        self.band_rows = band_rows

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        kt = k.transpose(-2, -1)
        bh, _, dim = q.shape
        if self.use_rel_pos:
            rh = get_rel_pos(h, h, self.rel_pos_h)  # [q_h, k_h, C]
            rw = get_rel_pos(w, w, self.rel_pos_w)  # [q_w, k_w, C]
        bands = []
        for r0 in range(0, h, self.band_rows):
            r1 = min(h, r0 + self.band_rows)
            qb = q[:, r0 * w : r1 * w]
            attn = (qb * self.scale) @ kt
            if self.use_rel_pos:
                r_q = qb.reshape(bh, r1 - r0, w, dim)
                rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh[r0:r1])
                rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
                attn = (attn.view(bh, r1 - r0, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :])
                attn = attn.view(bh, (r1 - r0) * w, h * w)
            bands.append(attn.softmax(dim=-1) @ v)
        out = torch.cat(bands, dim=1)
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def band_rows_for(num_heads: int, grid: tuple[int, int], band_bytes: int = DEFAULT_BAND_BYTES) -> int:
    """Query grid rows per band: one band's float32 logits within `band_bytes`, bands of equal height."""
    h, w = grid
    row_bytes = num_heads * w * (h * w) * 4
    most = max(1, min(h, math.floor(band_bytes / row_bytes)))
    return math.ceil(h / math.ceil(h / most))  # bands of equal height: 64 rows at most 21 → 4 × 16


@contextmanager
def chunked_global_attention(image_encoder: nn.Module, band_bytes: int = DEFAULT_BAND_BYTES) -> Iterator[int]:
    """Within the block, each global-attention block whose logits exceed `band_bytes` is a
    `ChunkedAttention`; yields how many were swapped and puts the originals back afterwards."""
    patch = image_encoder.patch_embed.proj.kernel_size
    grid = (image_encoder.img_size // patch[0], image_encoder.img_size // patch[1])
    originals: list[tuple[nn.Module, Attention]] = []
    for block in image_encoder.blocks:
        if block.window_size != 0 or not isinstance(block.attn, Attention):
            continue  # windowed blocks hold (window²)² per window: small
        rows = band_rows_for(block.attn.num_heads, grid, band_bytes)
        if rows < grid[0]:
            originals.append((block, block.attn))
            block.attn = ChunkedAttention(block.attn, rows)
    try:
        yield len(originals)
    finally:
        for block, attention in originals:
            block.attn = attention
