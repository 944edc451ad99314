"""PyTorch inference of a CPC-SAM for evaluation: image → embedding, prompts → full-size logits.

Supports test-time calibration: each entity may carry K' prompt variants [N, K', P]; they are
calibrated together (the task causal module's context is the mean over the K' groups, as in
training), decoded, and their logits averaged. Averaging the low-resolution logits before
upsampling equals averaging the full-size ones (upsampling and cropping are linear), and is
K' times cheaper.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cpcsam.modeling import CPCSAM, has_lora, merge_lora
from cpcsam.modeling.transforms import coords_to_model, postprocess_masks, preprocess_image, resized_shape
from cpcsam.prompts.perturb import Prompt, pad_points


@dataclass
class EncodedImage:
    embedding: torch.Tensor  # [1, C, h, w]
    orig_size: tuple[int, int]  # (H, W)
    input_size: tuple[int, int]  # (h, w) of the resized image inside the square model frame


def pad_prompts(prompts: Sequence[Sequence[Prompt]], orig_size: tuple[int, int], image_size: int):
    """N entities × K' variants of `Prompt` (original pixels) → coords [N, K', P, 2] (model frame), labels [N, K', P].

    P is the largest prompt's size; shorter prompts are padded with label −1 (not-a-point).
    """
    n, k = len(prompts), max(len(v) for v in prompts)
    for i, variants in enumerate(prompts):
        if len(variants) != k:
            raise ValueError(f"entity {i}: {len(variants)} prompt variants, expected {k}")
    flat = [q for variants in prompts for q in variants]
    coords, labels = pad_points([q.coords for q in flat], [q.labels for q in flat])
    coords, labels = coords.reshape(n, k, -1, 2), labels.reshape(n, k, -1)
    model_coords = coords_to_model(coords, orig_size, image_size)
    return model_coords, torch.from_numpy(labels)


class TorchEngine:
    """Evaluation-time inference of one model (eval mode, no grad, CPU by default)."""

    def __init__(self, model: CPCSAM, batch_entities: int = 32, device: str = "cpu") -> None:
        if has_lora(model):
            # Inference only: fold the adapters into the weights (same maths, no PEFT overhead).
            model = merge_lora(copy.deepcopy(model))
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_entities = max(1, int(batch_entities))

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> EncodedImage:
        h, w = image.shape[:2]
        x = preprocess_image(image, self.image_size)[None].to(self.device)
        return EncodedImage(self.model.encode_images(x), (h, w), resized_shape(h, w, self.image_size))

    @torch.no_grad()
    def low_res_logits(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """coords [N, K', P, 2] (model frame), labels [N, K', P] → low-res logits [N, 4h, 4w], mean over K'."""
        n, k, p = labels.shape
        chunks = []
        per_chunk = max(1, self.batch_entities // k)
        for start in range(0, n, per_chunk):
            c = coords[start : start + per_chunk].to(self.device)
            lab = labels[start : start + per_chunk].to(self.device)
            m = lab.shape[0]
            sparse = self.model.embed_prompts(c.reshape(m * k, p, 2), lab.reshape(m * k, p))
            sparse = self.model.calibrate_prompts(sparse.reshape(m, k, p, -1), lab)
            index = torch.zeros(m * k, dtype=torch.long, device=self.device)
            out = self.model.decode(embedding, index, sparse.reshape(m * k, p, -1))
            chunks.append(out.low_res_logits.reshape(m, k, *out.low_res_logits.shape[-2:]).mean(dim=1))
        return torch.cat(chunks)

    @torch.no_grad()
    def predict(self, encoded: EncodedImage, prompts: Sequence[Sequence[Prompt]]) -> np.ndarray:
        """Full-size logits [N, H, W] (float32) for N entities, each with K' ≥ 1 prompt variants."""
        if not prompts:
            return np.zeros((0, *encoded.orig_size), np.float32)
        coords, labels = pad_prompts(prompts, encoded.orig_size, self.image_size)
        return self.predict_model_frame(encoded, coords, labels)

    @torch.no_grad()
    def predict_model_frame(self, encoded: EncodedImage, coords: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """As `predict`, with coords [N, K', P, 2] already in the model frame (e.g. automatic prompts)."""
        low = self.low_res_logits(encoded.embedding, coords, labels)
        full = postprocess_masks(low[:, None], encoded.orig_size, self.image_size)[:, 0]
        return full.float().cpu().numpy()
