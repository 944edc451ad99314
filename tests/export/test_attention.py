"""The exported encoder's banded global attention computes segment-anything's attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from cpcsam.export.attention import ChunkedAttention, band_rows_for, chunked_global_attention
from cpcsam.modeling.build import ARCHS, build_sam_from_arch


@pytest.mark.parametrize("band_rows", [1, 3, 5, 7])  # 3 and 5 leave an uneven last band
def test_bands_compute_the_same_attention(band_rows):
    torch.manual_seed(0)
    attention = Attention(dim=32, num_heads=4, use_rel_pos=True, input_size=(7, 6))
    with torch.no_grad():  # SAM zero-initialises the relative positions: make them matter
        attention.rel_pos_h.normal_()
        attention.rel_pos_w.normal_()
    x = torch.randn(2, 7, 6, 32)
    with torch.no_grad():
        expected = attention(x)
        got = ChunkedAttention(attention, band_rows)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_band_rows_keep_within_the_budget():
    # ViT-B: 12 heads, 64² grid → one grid row of logits is 12 · 64 · 4096 · 4 B = 12.6 MB: 21 rows
    # fit in 256 MB, which makes 4 bands, of 16 rows each
    assert band_rows_for(12, (64, 64), band_bytes=256 * 2**20) == 16
    assert band_rows_for(12, (64, 64), band_bytes=5 * 12 * 64 * 4096 * 4) == 5
    assert band_rows_for(12, (64, 64), band_bytes=1) == 1
    assert band_rows_for(4, (16, 16), band_bytes=256 * 2**20) == 16  # small model: one band


def test_only_large_global_blocks_are_swapped_and_restored():
    arch = dataclasses.replace(ARCHS["vit_b"], encoder_depth=2, encoder_global_attn_indexes=(1,))
    encoder = build_sam_from_arch(arch).image_encoder
    keys = list(encoder.state_dict())
    before = [block.attn for block in encoder.blocks]
    with chunked_global_attention(encoder) as swapped:
        assert swapped == 1
        assert isinstance(encoder.blocks[1].attn, ChunkedAttention) and encoder.blocks[1].attn.band_rows == 16
        assert encoder.blocks[0].attn is before[0]  # windowed block untouched
        assert list(encoder.state_dict()) == keys  # same parameters under the same names
    assert [block.attn for block in encoder.blocks] == before
    small = build_sam_from_arch(ARCHS["small"]).image_encoder
    with chunked_global_attention(small) as swapped:
        assert swapped == 0  # its logits fit one band: the small graph does not change
