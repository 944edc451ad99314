"""A tiny training project built in tmp: synthetic images + masks, a manifest per CONTRACTS.md,
the perturb stage's prompts, and a tiny SAM configuration (milliseconds per step)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from cpcsam.prompts import PerturbConfig, perturb_manifest
from cpcsam.config import PretrainConfig
from cpcsam.training.pretrain import pretrain_sam

# A SAM small enough for many steps in a test: 128² input, 8×8 embedding grid.
TINY_MODEL: dict[str, Any] = {
    "type": "small",
    "checkpoint": None,
    "sizes": {
        "small": {
            "image_size": 128,
            "patch_size": 16,
            "encoder_embed_dim": 32,
            "encoder_depth": 2,
            "encoder_num_heads": 2,
            "encoder_window_size": 4,
            "encoder_global_attn_indexes": [1],
            "prompt_embed_dim": 32,
            "decoder_depth": 2,
            "decoder_mlp_dim": 64,
            "decoder_num_heads": 2,
            "iou_head_hidden_dim": 32,
        }
    },
    "capl": {"mode": "causal", "task_hidden": 16, "entity_hidden": 16, "entity_rank": 4},
    "lora": {"rank": 2, "alpha": 2, "dropout": 0.0, "targets": ["image_encoder_qkv", "decoder_attention"]},
}

TINY_PARAMS: dict[str, Any] = {
    "seed": 0,
    "model": TINY_MODEL,
    "perturb": {"seed": 1, "k": 3, "sigma_box": 0.1, "prompt_slots": 8},
    "train": {
        "seed": 2,
        "mode": "bilevel",
        "steps": 4,
        "batch_images": 2,
        "max_entities": 2,
        "capl_optim": {"lr": 0.003, "warmup_steps": 0},
        "sam_optim": {"lr": 0.003, "warmup_steps": 0},
        "checkpoint_every": 100,
        "keep_checkpoints": 2,
        "device": "cpu",
        "embedding_cache": "off",
        "log_every": 1,
    },
    "pretrain": {
        "seed": 3,
        "steps": 4,
        "batch_images": 2,
        "max_entities": 3,
        "optim": {"lr": 0.001, "warmup_steps": 0},
        "device": "cpu",
        "log_every": 1,
        "val_every": 0,
    },
}

CLASSES = {"fish": "base", "crab": "base", "eel": "target"}
COLOURS = {"fish": (230, 180, 40), "crab": (200, 40, 40), "eel": (40, 200, 90)}


def _shape(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.2, 0.8) * width
    ry, rx = rng.uniform(0.1, 0.22) * height, rng.uniform(0.1, 0.22) * width
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def write_tiny_dataset(root: Path, num_images: int = 6, seed: int = 0) -> pd.DataFrame:
    """PNG images under root/images with 2–3 entities each; returns the manifest (also written)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        height, width = (96, 128) if i % 2 == 0 else (112, 80)  # two aspect ratios
        image = np.zeros((height, width, 3), np.float64) + rng.uniform(10, 50, size=3)
        image += rng.normal(0, 6, size=image.shape)
        taken = np.zeros((height, width), bool)
        names = ["fish", "crab", "eel"][: 2 + i % 2]
        for j, cls in enumerate(names):
            mask = _shape(height, width, rng) & ~taken
            if mask.sum() < 20:
                continue
            taken |= mask
            image[mask] = COLOURS[cls]
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            rows.append(
                {
                    "image_id": f"img{i:02d}",
                    "image_uri": str(root / "images" / f"img{i:02d}.png"),
                    "width": width,
                    "height": height,
                    "entity_id": f"img{i:02d}-e{j}",
                    "class_name": cls,
                    "rle_counts": rle["counts"].decode("ascii"),
                    "bbox_x": x,
                    "bbox_y": y,
                    "bbox_w": w,
                    "bbox_h": h,
                    "area": int(mask.sum()),
                    "split": "train" if i < num_images - 1 else "val",
                    "role": CLASSES[cls],
                    "group_id": f"g{i}",
                }
            )
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"img{i:02d}.png")
    manifest = pd.DataFrame(rows).astype({"width": "int64", "height": "int64", "area": "int64"})
    manifest.to_parquet(root / "manifest.parquet")
    return manifest


def decode(counts: str, height: int, width: int) -> np.ndarray:
    return mask_utils.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning threads per process can be
    ~10x slower than 1. Restored afterwards, so other test folders keep torch's default."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_per_module():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{'root', 'manifest', 'prompts', 'params', 'sam_checkpoint', 'pretrain_metrics'}.

    A tiny dataset (5 training images), its perturbed prompts, and a tiny SAM pretrained here
    for 60 steps by the pretrain loop (a random SAM gives LoRA nothing to adapt).
    """
    root = tmp_path_factory.mktemp("tiny_project")
    manifest = write_tiny_dataset(root)
    params = copy.deepcopy(TINY_PARAMS)
    perturb = PerturbConfig.from_params(params["perturb"])
    prompts = perturb_manifest(manifest, perturb, seed=params["perturb"]["seed"], decode=decode, progress=False)
    prompts.to_parquet(root / "prompts.parquet")
    # A few corpus scenes, seen again and again: the tiny SAM learns them in 60 steps (the endless
    # corpus needs thousands of steps of a real configuration).
    cfg = PretrainConfig.from_params({**params["pretrain"], "steps": 60, "corpus_scenes": 4,
                                      "optim": {"lr": 3e-3, "warmup_steps": 0}})
    with one_torch_thread():  # session fixtures are set up before the module's thread fixture
        _, metrics = pretrain_sam(params["model"], cfg, root / "sam.pth", progress=False)
    return {
        "root": root,
        "manifest": manifest,
        "prompts": prompts,
        "params": params,
        "sam_checkpoint": root / "sam.pth",
        "pretrain_metrics": metrics,
    }


@pytest.fixture
def tiny_params(tiny_project: dict[str, Any]) -> dict[str, Any]:
    """A fresh deep copy of the tiny params (tests may edit it)."""
    return copy.deepcopy(tiny_project["params"])
