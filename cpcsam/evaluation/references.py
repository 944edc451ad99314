"""Prompt-only reference rows: what a segmenter must beat to be worth its weights.

- `filled_box`: the prompt's box itself, filled. On data whose objects fill their boxes well it is
  a strong answer (~64-68 Dice on the embedded data and on TrashCan), and a trained SAM that
  loses to it adds nothing over its prompt.
- `grabcut`: OpenCV's GrabCut initialised from the box (a classical colour-model segmentation,
  no learning).

Both answer only prompts with a box; on points-only protocols they are absent from the table
rather than scored as empty masks. They implement `encode`/`predict` like `cpcsam.inference.Predictor`, so the
evaluation loop treats them as models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cpcsam.prompts.perturb import Prompt

REFERENCE_MODELS = ("filled_box", "grabcut")


@dataclass
class RawImage:
    image: np.ndarray  # [H, W, 3] uint8
    orig_size: tuple[int, int]


class PromptOnlyReference:
    """Base of the reference rows: logits +inf inside the answer, -inf outside.

    A hard mask, so the same at any `evaluate.threshold` (with ±1 a threshold of −2, chosen for a
    model, filled the whole frame and let every model beat the "box").
    """

    name = "reference"
    needs_box = True

    def encode(self, image: np.ndarray) -> RawImage:
        return RawImage(np.ascontiguousarray(image), tuple(image.shape[:2]))

    def supports(self, kind: str) -> bool:
        return "box" in kind

    def predict(self, encoded: RawImage, prompts: Sequence[Sequence[Prompt]]) -> np.ndarray:
        h, w = encoded.orig_size
        out = np.full((len(prompts), h, w), -np.inf, np.float32)
        for i, variants in enumerate(prompts):
            box = variants[0].box()
            if box is None:
                raise ValueError(f"{self.name}: entity {i} has no box prompt")
            out[i][self.segment(encoded.image, _clip_box(box, w, h), variants[0])] = np.inf
        return out

    def segment(self, image: np.ndarray, box: tuple[int, int, int, int], prompt: Prompt) -> np.ndarray:
        raise NotImplementedError


def _clip_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = int(np.clip(np.floor(x0), 0, width - 1)), int(np.clip(np.ceil(x1), 1, width))
    y0, y1 = int(np.clip(np.floor(y0), 0, height - 1)), int(np.clip(np.ceil(y1), 1, height))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


class FilledBox(PromptOnlyReference):
    name = "filled_box"

    def segment(self, image: np.ndarray, box: tuple[int, int, int, int], prompt: Prompt) -> np.ndarray:
        mask = np.zeros(image.shape[:2], bool)
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = True
        return mask


class GrabCut(PromptOnlyReference):
    """`cv2.grabCut` with GC_INIT_WITH_RECT, 5 iterations; an error or an empty answer falls back to the box."""

    name = "grabcut"
    iterations = 5

    def segment(self, image: np.ndarray, box: tuple[int, int, int, int], prompt: Prompt) -> np.ndarray:
        import cv2

        x0, y0, x1, y1 = box
        mask = np.zeros(image.shape[:2], np.uint8)
        if x1 - x0 < 3 or y1 - y0 < 3:
            mask[y0:y1, x0:x1] = 1
            return mask.astype(bool)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's k-means initialisation: same pixels, same mask
        try:
            cv2.grabCut(image[..., ::-1].copy(), mask, (x0, y0, x1 - x0, y1 - y0), bgd, fgd, self.iterations,
                        cv2.GC_INIT_WITH_RECT)
        except cv2.error:
            mask[:] = 0
            mask[y0:y1, x0:x1] = cv2.GC_FGD
        out = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        if not out.any():  # GrabCut gives up on small boxes (few pixels to fit its colour models)
            out[y0:y1, x0:x1] = True
        return out


def reference_engines() -> dict[str, PromptOnlyReference]:
    return {"filled_box": FilledBox(), "grabcut": GrabCut()}
