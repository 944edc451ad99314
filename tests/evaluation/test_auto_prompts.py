"""Automatic prompts (prototype → similarity → points and box) on a synthetic case."""

from __future__ import annotations

import numpy as np
import torch

from cpcsam.prompts.auto import (
    AutoPromptConfig,
    auto_prompt,
    class_prototypes,
    mask_to_grid,
    masked_average,
    valid_grid_size,
)

IMG = 256  # model input side
GRID = (16, 16)  # embedding grid: 16 px per cell


def _embedding(gen, object_cells, signature, c=128):
    emb = torch.randn(c, *GRID, generator=gen)
    for r, col in object_cells:
        emb[:, r, col] = signature + 0.1 * torch.randn(c, generator=gen)
    return emb


def test_mask_to_grid_follows_resize_and_padding():
    # A 100x200 image resizes to 128x256: its grid covers 8 of 16 rows.
    assert valid_grid_size((128, 256), IMG, GRID) == (8, 16)
    mask = np.zeros((100, 200), bool)
    mask[:50, :100] = True  # top-left quarter of the image -> rows 0-3, cols 0-7 of the grid
    grid = mask_to_grid(mask, (128, 256), IMG, GRID)
    assert grid.shape == GRID
    # Bilinear resizing softens the mask's edge by about one pixel: cells are ~fully in or ~out.
    assert float(grid[:4, :8].min()) > 0.95
    assert float(grid[4:, :].max()) < 0.05 and float(grid[:, 8:].max()) < 0.05
    assert masked_average(torch.ones(3, *GRID), torch.zeros(GRID)) is None


def test_prototype_matches_the_object_in_a_query_image():
    gen = torch.Generator().manual_seed(0)
    signature = 3 * torch.randn(128, generator=gen)
    # Support: the object in rows 2-4, cols 2-5, annotated by a full-size mask.
    support_cells = [(r, c) for r in range(2, 5) for c in range(2, 6)]
    support = _embedding(gen, support_cells, signature)
    support_mask = np.zeros((IMG, IMG), bool)
    support_mask[2 * 16 : 5 * 16, 2 * 16 : 6 * 16] = True
    feat = masked_average(support, mask_to_grid(support_mask, (IMG, IMG), IMG, GRID))
    proto = class_prototypes({"crab": [feat], "empty": [None]})
    assert set(proto) == {"crab"}  # a class with no usable support gets no prototype

    # Query: the object elsewhere, rows 9-12, cols 6-10.
    query_cells = {(r, c) for r in range(9, 13) for c in range(6, 11)}
    query = _embedding(gen, sorted(query_cells), signature)
    cfg = AutoPromptConfig(num_positive=3, num_negative=2, box_threshold=0.5)
    prompt = auto_prompt(query, proto["crab"], IMG, (IMG, IMG), cfg)

    assert prompt.labels.tolist() == [1, 1, 1, 0, 0, 2, 3]
    cell = lambda xy: (int(xy[1] // 16), int(xy[0] // 16))  # noqa: E731
    positives = prompt.coords[prompt.labels == 1]
    negatives = prompt.coords[prompt.labels == 0]
    assert all(cell(p) in query_cells for p in positives)
    assert all(cell(p) not in query_cells for p in negatives)
    assert len({cell(p) for p in positives}) == 3  # distinct peaks
    x0, y0 = prompt.coords[prompt.labels == 2][0]
    x1, y1 = prompt.coords[prompt.labels == 3][0]
    assert (x0, y0, x1, y1) == (6 * 16, 9 * 16, 11 * 16, 13 * 16)  # tight box of the object cells
    assert prompt.score > 0.9


def test_padding_is_never_prompted():
    # A wide image: only the top 8 grid rows are image, the rest is padding.
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(32, *GRID, generator=gen)
    proto = emb[:, 12, 3].clone()  # the best match sits in the padding...
    emb[:, 2, 3] = proto * 0.9 + 0.1 * torch.randn(32, generator=gen)  # ...and a good one in the image
    prompt = auto_prompt(emb, proto, IMG, (128, 256), AutoPromptConfig(num_positive=1, num_negative=3))
    assert np.all(prompt.coords[:, 1] < 128) and np.all(prompt.coords[:, 0] < 256)
    pos = prompt.coords[prompt.labels == 1][0]
    assert (int(pos[1] // 16), int(pos[0] // 16)) == (2, 3)
    assert np.isnan(prompt.similarity[12, 3])
