"""A finer mask grid for small SAM configurations: extra ×2 upsampling stages after SAM's ×4.

SAM's decoder predicts masks at 4× the embedding grid (256² for the official 64² grid). The CPU
configurations have a 16² grid, so their masks are 64² for a 256² frame: one mask pixel spans
~7.5 pixels of a 480-wide TrashCan frame, and even a perfect 64² mask of TrashCan's smallest
quarter of objects scores below the filled box (checkpoints/README.md). A finer *encoder* grid
(patch 8, or a 512² frame) costs ~5× per pretraining step; a stage costs two narrow 3×3
convolutions per entity at the mask resolution instead (measured: a pretraining step 1.6× slower,
128 masks per step; a few ms per image at inference). Grown into the shipped starting SAM it
raised TrashCan val target Dice by 2.7 over the same phase without it (checkpoints/README.md).

Each stage upsamples the decoder's per-entity features bilinearly and adds a learned residual
(3×3 conv, GELU, 3×3 conv) whose last convolution starts at zero. At initialisation the stage is
therefore exactly bilinear upsampling, and since the hypernetwork's dot product is linear, the
masks are the ×4 masks upsampled bilinearly: a checkpoint trained without the stages keeps its
quality when it grows them (`grow_state_dict`), and training only has to learn the detail.
The channel count is kept, so SAM's hypernetwork MLPs are unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ResidualUpsample(nn.Module):
    """×2 bilinear upsampling + a zero-initialised convolutional residual (same channels)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x + self.conv2(self.act(self.conv1(x)))


def refine_stage_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of every `ResidualUpsample` inside `model`."""
    return [f"{name}." for name, module in model.named_modules() if isinstance(module, ResidualUpsample)]


def grow_state_dict(model: nn.Module, state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`state` completed with `model`'s own (identity) weights for refinement stages it lacks.

    Only keys under a `ResidualUpsample` may be missing: any other difference is left for the
    strict loader to report. Returns (the completed state, the keys that were added).
    """
    prefixes = tuple(refine_stage_prefixes(model))
    grown = dict(state)
    added = []
    for key, value in model.state_dict().items():
        if key not in grown and key.startswith(prefixes):  # startswith(()) is False: nothing to grow
            grown[key] = value.detach().clone()
            added.append(key)
    return grown, added


def mask_upscale_factor(model: nn.Module) -> int:
    """Mask side / embedding side of a SAM (or anything holding one): 4 × 2 per refinement stage."""
    return 4 * 2 ** len(refine_stage_prefixes(model))


__all__ = ["ResidualUpsample", "grow_state_dict", "mask_upscale_factor", "refine_stage_prefixes"]
