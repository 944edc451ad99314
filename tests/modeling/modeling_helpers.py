"""Helpers shared by the model tests (imported by name: tests/ is not a package)."""

from __future__ import annotations

import torch


def random_prompts(n: int, p: int, image_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """coords [n, p, 2] in the model frame and labels [n, p]: a box (2, 3), points (0/1), padding (−1)."""
    coords = torch.rand(n, p, 2, generator=generator) * image_size
    labels = torch.randint(0, 2, (n, p), generator=generator)
    labels[:, 0], labels[:, 1] = 2, 3
    labels[:, -1] = -1
    return coords, labels


def randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Overwrite every parameter with noise (e.g. to move CaPL away from its identity init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
