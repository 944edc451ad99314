"""Fixtures for the model tests: a seeded small SAM (milliseconds to build)."""

from __future__ import annotations

import pytest
import torch

from cpcsam.modeling import build_sam

SMALL = {"type": "small"}


@pytest.fixture
def small_sam():
    """A randomly initialised `small` SAM, seeded, eval mode."""
    torch.manual_seed(0)
    return build_sam(SMALL)
