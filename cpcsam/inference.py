"""One inference object for every consumer: evaluation, `predict`, serving and the export's parity check.

A `Predictor` owns the geometry (an image → the square model frame and back: `encode`, the
full-size logits of `decode`) and delegates the two networks to a backend:

- `TorchBackend`: a trained CPC-SAM in PyTorch, LoRA folded into the weights. An entity may carry
  K' prompt variants [N, K', P]: they are calibrated together (the task causal module's context
  spans the K' groups as it spans the K in training, `model.capl.task_context`), decoded, and
  their logits averaged (test-time calibration). Averaging the low-resolution logits before
  upsampling equals averaging the full-size ones (upsampling and cropping are linear), and is K'
  times cheaper.
- `OnnxBackend`: the two exported graphs in onnxruntime. The exported decoder calibrates one
  prompt per entity, so it takes K' = 1 only and says so otherwise.

Both return the same `Decoded` for the same inputs, which is what the parity check compares: the
PyTorch side of that check is the very code path the evaluation scores, so a passing export is
the model that was measured. Prompt padding lives in `cpcsam.prompts.perturb` (`pad_points`);
`pad_prompts` lays N entities × K' variants out on top of it.

Focus crop (`model.crop`): an entity with a box prompt is
segmented in a square crop around its box, `context` times the box's longer side, instead of in
the whole image; outside the crop its logits are `OUTSIDE_CROP_LOGIT`. A small model sees the
whole image at 256² (TrashCan's 480×360 frames shrink 1.9×, a 30-pixel object covers one cell
of the 16×16 embedding grid), while in its crop the object spans half the frame. It costs one
encoder pass per boxed entity instead of one per image, which the small CPU models can afford
and ViT-B cannot (off by default). Points-only prompts say nothing about an object's extent and
keep the whole image. In crop mode the whole image is encoded on first use only, so an image
whose entities all have boxes costs one encoder pass per entity, not one more.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from cpcsam.config import CropConfig
from cpcsam.errors import ConfigError
from cpcsam.modeling.transforms import coords_to_model, crop_window, postprocess_masks, preprocess_image, resized_shape
from cpcsam.prompts.perturb import Prompt, pad_points


Encoding = tuple[torch.Tensor, "torch.Tensor | None"]  # (embedding, entity keys) of a backend's `encode`


@dataclass
class EncodedImage:
    """An image as the decoder needs it: its embedding [1, C, h, w] (CPU for the ONNX backend), CaPL's
    entity keys [1, S·H, r, HW] (modes `causal` and `entity` only, else None), its sizes, and for focus crops its
    pixels. Built from an `Encoding`, or from a function that makes one on first use (`lazy`)."""

    orig_size: tuple[int, int]  # (H, W)
    input_size: tuple[int, int]  # (h, w) of the resized image inside the square model frame
    encoding: Encoding | None = None
    pixels: np.ndarray | None = None  # the RGB image, kept for focus crops
    encode_fn: Callable[[], Encoding] | None = field(default=None, repr=False)

    @classmethod
    def lazy(cls, encode_fn: Callable[[], Encoding], orig_size: tuple[int, int], input_size: tuple[int, int],
             pixels: np.ndarray | None = None) -> "EncodedImage":
        return cls(orig_size, input_size, None, pixels, encode_fn)

    @property
    def encoded(self) -> bool:
        """Whether the encoder has run on this image (a lazy one runs at the first `embedding`)."""
        return self.encoding is not None

    @property
    def embedding(self) -> torch.Tensor:
        return self._encoding()[0]

    @property
    def entity_keys(self) -> torch.Tensor | None:
        return self._encoding()[1]

    def _encoding(self) -> Encoding:
        if self.encoding is None:
            if self.encode_fn is None:
                raise ValueError("EncodedImage has neither an encoding nor a function that makes one")
            self.encoding, self.encode_fn = self.encode_fn(), None
        return self.encoding


@dataclass
class Decoded:
    """N entities' outputs: full-size logits, predicted IoU, low-resolution logits (float32)."""

    masks: np.ndarray  # [N, H, W]
    iou_predictions: np.ndarray  # [N]
    low_res_masks: np.ndarray  # [N, m, m]


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


class Backend(Protocol):
    image_size: int
    providers: dict[str, list[str]]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Preprocessed image → (embedding, the entity module's keys or None): the per-image work."""
        ...

    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               orig_size: tuple[int, int], entity_keys: torch.Tensor | None = None) -> Decoded: ...


class TorchBackend:
    """A CPC-SAM in PyTorch (eval mode, no grad); `batch_entities` bounds the decoder batch (N·K')."""

    def __init__(self, model: Any, batch_entities: int = 32, device: str = "cpu") -> None:
        from cpcsam.modeling import has_lora, merge_lora

        if has_lora(model):
            # Inference only: fold the adapters into the weights (same maths, no PEFT overhead).
            model = merge_lora(copy.deepcopy(model))
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.model = model.to(self.device).eval()
        self.batch_entities = max(1, int(batch_entities))
        self.image_size = int(self.model.image_size)
        self.providers = {"torch": [str(self.device)]}

    @classmethod
    def from_file(cls, model_path: str | os.PathLike, device: str = "cpu") -> "TorchBackend":
        from cpcsam.modeling import load_cpcsam

        return cls(load_cpcsam(str(model_path), fold_lora=True), device=device)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        embedding = self.model.encode_images(x.to(self.device))
        return embedding, self.model.entity_keys(embedding)

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               orig_size: tuple[int, int], entity_keys: torch.Tensor | None = None) -> Decoded:
        n, k, p = labels.shape
        low_chunks, iou_chunks = [], []
        per_chunk = max(1, self.batch_entities // k)
        embedding = embedding.to(self.device)
        if entity_keys is not None:
            entity_keys = entity_keys.to(self.device)
        for start in range(0, n, per_chunk):
            c = coords[start : start + per_chunk].to(self.device, torch.float32)
            lab = labels[start : start + per_chunk].to(self.device, torch.int64)
            m = lab.shape[0]
            sparse = self.model.embed_prompts(c.reshape(m * k, p, 2), lab.reshape(m * k, p))
            one_image = torch.zeros(m, dtype=torch.long, device=self.device)
            sparse = self.model.calibrate_prompts(sparse.reshape(m, k, p, -1), lab, c, embedding, one_image)
            index = torch.zeros(m * k, dtype=torch.long, device=self.device)
            out = self.model.decode(embedding, index, sparse.reshape(m * k, p, -1), entity_keys=entity_keys)
            low_chunks.append(out.low_res_logits.reshape(m, k, *out.low_res_logits.shape[-2:]).mean(dim=1))
            iou_chunks.append(out.iou_pred.reshape(m, k).mean(dim=1))
        low = torch.cat(low_chunks)
        full = postprocess_masks(low[:, None], orig_size, self.image_size)[:, 0]
        return Decoded(full.float().cpu().numpy(), torch.cat(iou_chunks).float().cpu().numpy(),
                       low.float().cpu().numpy())


class OnnxBackend:
    """The exported graphs: one prompt per entity (K' = 1). `encoder` and `decoder` are
    `cpcsam.export.runtime`'s `OnnxImageEncoder` and `OnnxDecoder` (`onnx_predictor` opens them
    from the export stage's folder)."""

    def __init__(self, encoder: Any, decoder: Any) -> None:
        from cpcsam.export.runtime import check_pair

        check_pair(encoder, decoder)
        self.encoder, self.decoder = encoder, decoder
        self.image_size = int(encoder.image_size)
        self.providers = {"image_encoder": encoder.info.providers, "decoder": decoder.info.providers}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from cpcsam.export.runtime import ENTITY_KEYS

        out = self.encoder(x.cpu().numpy())
        keys = out.get(ENTITY_KEYS)
        return torch.from_numpy(out["image_embeddings"]), None if keys is None else torch.from_numpy(keys)

    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               orig_size: tuple[int, int], entity_keys: torch.Tensor | None = None) -> Decoded:
        if labels.shape[1] != 1:
            raise ConfigError(f"the exported decoder calibrates one prompt per entity; got {labels.shape[1]} "
                              "variants per entity (test-time calibration runs on the PyTorch backend)")
        out = self.decoder(embedding.cpu().numpy(), coords[:, 0].cpu().numpy(),
                           labels[:, 0].cpu().numpy().astype(np.float32), orig_size,  # the graph's dtype
                           entity_keys=None if entity_keys is None else entity_keys.cpu().numpy())
        return Decoded(out["masks"][:, 0], out["iou_predictions"][:, 0], out["low_res_masks"][:, 0])


OUTSIDE_CROP_LOGIT = -1e4  # a focus crop's entity outside its crop: background at any threshold


class Predictor:
    """Image → embedding → N entities' full-size logits, over one backend (see the module docstring).

    `crop`: focus crops for entities with a box (None or context 0: the whole image for all).
    """

    def __init__(self, backend: Backend, crop: CropConfig | None = None) -> None:
        self.backend = backend
        self.image_size = int(backend.image_size)
        self.providers = backend.providers
        self.crop = crop if crop is not None and crop.context > 0 else None

    @classmethod
    def from_model(cls, model: Any, batch_entities: int = 32, device: str = "cpu",
                   crop: CropConfig | None = None) -> "Predictor":
        return cls(TorchBackend(model, batch_entities, device), crop)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB [H, W, 3] uint8 → the model's input [1, 3, S, S]."""
        return preprocess_image(np.array(image), self.image_size)[None]  # a writable copy for torch

    def encode(self, image: np.ndarray) -> EncodedImage:
        """The image's encoding; under focus crops made on first use (boxed entities never use it)."""
        h, w = image.shape[:2]
        input_size = resized_shape(h, w, self.image_size)
        if self.crop is None:
            return EncodedImage((h, w), input_size, self.backend.encode(self.preprocess(image)))
        pixels = np.asarray(image)
        return EncodedImage.lazy(lambda: self.backend.encode(self.preprocess(pixels)), (h, w), input_size, pixels)

    def decode(self, encoded: EncodedImage, coords: torch.Tensor, labels: torch.Tensor) -> Decoded:
        """coords [N, K', P, 2] in the model frame, labels [N, K', P] → `Decoded` at the original size."""
        if labels.shape[0] == 0:
            return Decoded(np.zeros((0, *encoded.orig_size), np.float32), np.zeros(0, np.float32),
                           np.zeros((0, 0, 0), np.float32))
        return self.backend.decode(encoded.embedding, coords, labels, encoded.orig_size, encoded.entity_keys)

    def predict(self, encoded: EncodedImage, prompts: Sequence[Sequence[Prompt]]) -> np.ndarray:
        """Full-size logits [N, H, W] (float32) for N entities, each with K' ≥ 1 prompt variants (original pixels)."""
        if not prompts:
            return np.zeros((0, *encoded.orig_size), np.float32)
        if self.crop is None:
            return self._predict_whole(encoded, prompts)
        if encoded.pixels is None:
            raise ValueError("focus crops need the image: encode it with this Predictor (EncodedImage.pixels is None)")
        boxes = [variants[0].box() for variants in prompts]
        out = np.full((len(prompts), *encoded.orig_size), OUTSIDE_CROP_LOGIT, np.float32)
        whole = [i for i, box in enumerate(boxes) if box is None]
        if whole:
            out[whole] = self._predict_whole(encoded, [prompts[i] for i in whole])
        h, w = encoded.orig_size
        for i, box in enumerate(boxes):
            if box is None:
                continue
            x0, y0, x1, y1 = crop_window(box, self.crop, w, h)
            pixels = encoded.pixels[y0:y1, x0:x1]
            inside = EncodedImage(pixels.shape[:2], resized_shape(*pixels.shape[:2], self.image_size),
                                  self.backend.encode(self.preprocess(pixels)))
            offset = np.array([x0, y0], np.float64)
            shifted = [Prompt(q.kind, q.coords - offset, q.labels) for q in prompts[i]]
            out[i, y0:y1, x0:x1] = self._predict_whole(inside, [shifted])[0]
        return out

    def _predict_whole(self, encoded: EncodedImage, prompts: Sequence[Sequence[Prompt]]) -> np.ndarray:
        coords, labels = pad_prompts(prompts, encoded.orig_size, self.image_size)
        return self.decode(encoded, coords, labels).masks

    def predict_model_frame(self, encoded: EncodedImage, coords: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """As `predict`, with coords [N, K', P, 2] already in the model frame (e.g. automatic prompts;
        always the whole image: such prompts come from the image's embedding)."""
        return self.decode(encoded, coords, labels).masks
