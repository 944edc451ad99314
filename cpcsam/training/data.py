"""Training batches from the manifest and the perturbed prompts.

- `TrainingImages`: the train-split, base-class images of a manifest; preprocessed model inputs
  (or cached image embeddings) in a byte-bounded LRU cache, GT masks at the decoder's
  low-resolution frame. With focus crops (`model.crop`) every entity is also an "image" of its
  own: the crop around its ground-truth box that inference segments a boxed entity in. The whole
  images stay, because inference still gives points-only prompts the whole image (a model
  trained on crops alone lost two thirds of its points Dice on TrashCan).
- Prompt providers: `TablePrompts` (the `perturb` stage's K prompts per entity) and
  `GroundTruthPrompts` (a random GT-derived prompt per draw, for the stand-in pretraining).
- `BatchStream`: an endless seeded stream of batches over a fixed list of images. Each batch is a
  pure function of `(seed, stream name, epoch, position)`, so the stream's whole state is two
  integers, saved in checkpoints (no `next(iter(loader))` per step, no hidden RNG). With several
  processes every rank walks the same global stream and materialises only its contiguous slice
  of each global batch (`next(shard=(rank, size))`), so N processes see together exactly the
  batch one process would, and the stream state does not depend on N.
- `split_halves`: the two disjoint image halves of bi-level training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from cpcsam.config import CropConfig
from cpcsam.errors import ConfigError, DataError
from cpcsam.prompts.perturb import Prompt, mask_box, pad_prompt, prompt_from_mask, training_entities

logger = logging.getLogger(__name__)


def stream_rng(seed: int, *keys: Any) -> np.random.Generator:
    """A generator that depends only on `seed` and `keys` (stable across processes)."""
    text = "\x1f".join(["cpcsam.training", str(int(seed)), *map(str, keys)])
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little"))


# ---------------------------------------------------------------------------------------------
# Images and targets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntityRow:
    entity_id: str
    rle_counts: str


@dataclass(frozen=True)
class ImageRow:
    image_id: str
    image_uri: str
    height: int
    width: int
    entities: tuple[EntityRow, ...]


class LRUCache:
    """A dict bounded by the total bytes of the tensors it holds (the newest entries win)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.numel() * old.element_size()
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()


class EmbeddingSource(Protocol):
    """Cached image embeddings (see `cpcsam.training.embeddings.EmbeddingStore`)."""

    def get(self, image_id: str) -> Tensor: ...


class TrainingImages:
    """The images training sees (train split, base classes) with their model inputs and targets.

    `image_size` is the model frame side S, `lowres_size` the side of the decoder's low-resolution
    logits (4 × the embedding grid). Inputs are preprocessed with `cpcsam.modeling.transforms`;
    with `embeddings` the input of an image is its cached embedding instead.
    """

    def __init__(
        self,
        manifest: "Any",
        image_size: int,
        lowres_size: int,
        cache_mb: float = 512.0,
        embeddings: EmbeddingSource | None = None,
        read_image: Callable[[str], np.ndarray] | None = None,
        decode_mask: Callable[[str, int, int], np.ndarray] | None = None,
        crop: CropConfig | None = None,
    ) -> None:
        if read_image is None or decode_mask is None:
            from cpcsam import data as data_layer

            read_image = read_image or data_layer.read_image
            decode_mask = decode_mask or data_layer.decode_mask
        self.read_image = read_image
        self.decode_mask = decode_mask
        self.image_size = int(image_size)
        self.lowres_size = int(lowres_size)
        self.embeddings = embeddings
        rows = training_entities(manifest)
        if rows.empty:
            raise DataError("manifest has no training entities (split == 'train' and role == 'base')")
        self.images: dict[str, ImageRow] = {}
        for image_id, group in rows.groupby("image_id", sort=True):
            first = group.iloc[0]
            self.images[str(image_id)] = ImageRow(
                image_id=str(image_id),
                image_uri=str(first.image_uri),
                height=int(first.height),
                width=int(first.width),
                entities=tuple(EntityRow(str(r.entity_id), str(r.rle_counts)) for r in group.itertuples(index=False)),
            )
        # Focus crops: crop id → (the whole image's id, the entity's index there, (x0, y0, x1, y1)).
        self._crops: dict[str, tuple[str, int, tuple[int, int, int, int]]] = {}
        if crop is not None and crop.context > 0:
            if embeddings is not None:
                raise ConfigError("model.crop: focus crops are encoded per entity, so the whole-image embedding "
                                  "cache cannot serve them; set train.embedding_cache: off (or auto)")
            self._make_crops(crop)
        self._inputs = LRUCache(int(cache_mb * 2**20))
        self._targets: dict[str, Tensor] = {}

    def _make_crops(self, crop: CropConfig) -> None:
        """Add one item per entity: its crop around the entity's exact box (the box@0 prompt), where
        the entity is the one target (other objects in the crop are context)."""
        from cpcsam.modeling.transforms import crop_window

        for image_id, row in list(self.images.items()):  # the whole images stay items too
            for index, entity in enumerate(row.entities):
                mask = self.decode_mask(entity.rle_counts, row.height, row.width)
                if not mask.any():
                    raise DataError(f"{row.image_uri}: entity {entity.entity_id} has an empty mask")
                window = crop_window(mask_box(mask), crop, row.width, row.height)  # the box@0 prompt's crop
                x0, y0, x1, y1 = window
                item = f"{image_id}#{index}"
                self.images[item] = ImageRow(item, row.image_uri, y1 - y0, x1 - x0, (entity,))
                self._crops[item] = (image_id, index, window)

    @property
    def sources(self) -> dict[str, str]:
        """Item → the image it comes from (itself for a whole image)."""
        return {item: self._crops[item][0] if item in self._crops else item for item in self.images}

    def offset(self, image_id: str) -> tuple[int, int]:
        """(x0, y0) of the item in its image's pixels: what prompts in image pixels must move by."""
        found = self._crops.get(image_id)
        return (0, 0) if found is None else found[2][:2]

    @property
    def image_ids(self) -> list[str]:
        return sorted(self.images)

    @property
    def uses_embeddings(self) -> bool:
        return self.embeddings is not None

    def model_input(self, image_id: str) -> Tensor:
        """The preprocessed image [3, S, S], or its cached embedding [C, h, w]."""
        cached = self._inputs.get(image_id)
        if cached is not None:
            return cached
        if self.embeddings is not None:
            value = self.embeddings.get(image_id)
        else:
            value = self.preprocessed_image(image_id)
        self._inputs.put(image_id, value)
        return value

    def preprocessed_image(self, image_id: str) -> Tensor:
        from cpcsam.modeling.transforms import preprocess_image

        found = self._crops.get(image_id)
        row = self.images[image_id if found is None else found[0]]
        image = self.read_image(row.image_uri)
        if image.shape[:2] != (row.height, row.width):
            raise DataError(
                f"{row.image_uri}: image is {image.shape[1]}x{image.shape[0]} but the manifest says "
                f"{row.width}x{row.height}"
            )
        if found is not None:
            x0, y0, x1, y1 = found[2]
            image = image[y0:y1, x0:x1]
        return preprocess_image(image, self.image_size)

    def mask(self, image_id: str, entity_index: int) -> np.ndarray:
        found = self._crops.get(image_id)
        if found is None:
            row = self.images[image_id]
            return self.decode_mask(row.entities[entity_index].rle_counts, row.height, row.width)
        source, index, (x0, y0, x1, y1) = found
        row = self.images[source]
        return self.decode_mask(row.entities[index].rle_counts, row.height, row.width)[y0:y1, x0:x1]

    def targets(self, image_id: str) -> Tensor:
        """GT masks of the image's entities at the low-resolution logit frame, [E, L, L] in [0, 1]."""
        cached = self._targets.get(image_id)
        if cached is None:
            from cpcsam.modeling.transforms import mask_to_model

            row = self.images[image_id]
            cached = torch.stack(
                [
                    mask_to_model(self.mask(image_id, i), self.image_size, self.lowres_size).clamp(0.0, 1.0)
                    for i in range(len(row.entities))
                ]
            )
            self._targets[image_id] = cached
        return cached


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


class PromptProvider(Protocol):
    """K prompts per entity as padded arrays in *original* pixels: ([n, K, P, 2], [n, K, P])."""

    k: int
    slots: int

    def prompts(
        self, data: TrainingImages, image_id: str, entity_indices: Sequence[int], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]: ...


class TablePrompts:
    """The `perturb` stage's prompts (`prompts.parquet`), K per entity, indexed by entity id."""

    def __init__(self, table: "Any", k: int, slots: int) -> None:
        self.k = int(k)
        self.slots = int(slots)
        self._by_entity: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for entity_id, group in table.sort_values(["entity_id", "k"], kind="stable").groupby("entity_id", sort=False):
            if list(group["k"]) != list(range(self.k)):
                raise DataError(
                    f"prompts table: entity {entity_id!r} has prompts k={list(group['k'])}, expected 0..{self.k - 1} "
                    "(re-run the perturb stage with the current perturb.k)"
                )
            padded = [
                pad_prompt(Prompt.from_flat(r.kind, r.coords, r.labels), self.slots) for r in group.itertuples(index=False)
            ]
            self._by_entity[str(entity_id)] = (np.stack([c for c, _ in padded]), np.stack([lab for _, lab in padded]))

    def check_covers(self, data: TrainingImages) -> None:
        missing = [e.entity_id for row in data.images.values() for e in row.entities if e.entity_id not in self._by_entity]
        if missing:
            raise DataError(
                f"prompts table has no prompts for {len(missing)} training entities (e.g. {missing[:3]}); "
                "re-run the perturb stage on the current manifest"
            )

    def prompts(
        self, data: TrainingImages, image_id: str, entity_indices: Sequence[int], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        row = data.images[image_id]
        pairs = [self._by_entity[row.entities[i].entity_id] for i in entity_indices]
        coords = np.stack([c for c, _ in pairs])
        offset = data.offset(image_id)
        if offset != (0, 0):  # a focus crop: the table's prompts are in the whole image's pixels
            coords = coords - np.asarray(offset, coords.dtype)
        return coords, np.stack([lab for _, lab in pairs])


@dataclass
class GroundTruthPrompts:
    """A random GT-derived prompt per entity and draw (K = 1): pretraining's "random prompts".

    Kind from `kind_probs`, box noise `sigma`, 1..max_positives positives, 0..max_negatives
    negatives, all drawn from the batch's generator.
    """

    kind_probs: Mapping[str, float] = field(default_factory=lambda: {"box": 0.5, "points": 0.25, "box+points": 0.25})
    sigma: float = 0.1
    max_positives: int = 3
    max_negatives: int = 2
    slots: int = 8
    k: int = 1

    def prompts(
        self, data: TrainingImages, image_id: str, entity_indices: Sequence[int], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        kinds = list(self.kind_probs)
        probs = np.array([self.kind_probs[kind] for kind in kinds], dtype=np.float64)
        coords, labels = [], []
        for index in entity_indices:
            kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]
            prompt = prompt_from_mask(
                data.mask(image_id, index),
                kind,
                self.sigma,
                rng,
                num_positive=int(rng.integers(1, self.max_positives + 1)),
                num_negative=int(rng.integers(0, self.max_negatives + 1)),
            )
            c, lab = pad_prompt(prompt, self.slots)
            coords.append(c[None])
            labels.append(lab[None])
        return np.stack(coords), np.stack(labels)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One training batch: B images and the N entities drawn from them, each with K prompts."""

    image_ids: list[str]
    inputs: Tensor  # [B, 3, S, S] preprocessed images, or [B, C, h, w] cached embeddings
    is_embedding: bool
    image_index: Tensor  # [N] long: the image of each entity
    coords: Tensor  # [N, K, P, 2] model-frame coordinates
    labels: Tensor  # [N, K, P] long, -1 padding
    targets: Tensor  # [N, L, L] GT masks at the low-resolution logit frame
    entity_ids: list[str]
    # A rank's slice of a global batch (None: the batch is whole): where its entities start in the
    # global batch's entity order, and the global batch's entity and image counts.
    entity_offset: int = 0
    total_entities: int | None = None
    total_images: int | None = None

    @property
    def num_entities(self) -> int:
        return int(self.image_index.shape[0])

    @property
    def k(self) -> int:
        return int(self.labels.shape[1])

    @property
    def sharded(self) -> bool:
        return self.total_entities is not None

    @property
    def global_entities(self) -> int:
        return self.total_entities if self.total_entities is not None else self.num_entities

    @property
    def global_images(self) -> int:
        return self.total_images if self.total_images is not None else len(self.image_ids)

    def to(self, device: torch.device) -> "Batch":
        """On `device`; to CUDA through pinned memory with asynchronous copies (the batch is a
        fresh CPU tensor set, so nothing can change it while the copy is in flight)."""
        cuda = device.type == "cuda"

        def move(t: Tensor) -> Tensor:
            if cuda and t.device.type == "cpu":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)

        return dataclasses.replace(
            self,
            inputs=move(self.inputs),
            image_index=move(self.image_index),
            coords=move(self.coords),
            labels=move(self.labels),
            targets=move(self.targets),
        )


def split_halves(image_ids: Sequence[str], seed: int,
                 sources: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Two disjoint halves of the images (seeded), for the upper and the lower level.

    `sources`: item → the image it comes from (focus crops); the halves are then drawn over the
    images, so that no image lends crops to both levels.
    """
    sources = sources or {i: i for i in image_ids}
    ids = sorted({sources[i] for i in image_ids})
    if len(ids) < 2:
        raise DataError(f"bi-level training needs at least 2 training images to split in halves, got {len(ids)}")
    order = stream_rng(seed, "split-halves").permutation(len(ids))
    half = (len(ids) + 1) // 2
    first = {ids[i] for i in order[:half]}
    return sorted(i for i in image_ids if sources[i] in first), sorted(i for i in image_ids if sources[i] not in first)


class BatchStream:
    """An endless, seeded, resumable stream of batches over a fixed set of images.

    Epoch e visits the images in the order of a permutation drawn from `(seed, name, e)`;
    batches may span an epoch boundary. An image with more than `max_entities` entities gets
    a random subset per draw. State: `{"epoch", "position"}`.
    """

    def __init__(
        self,
        data: TrainingImages,
        prompts: PromptProvider,
        image_ids: Sequence[str],
        batch_images: int,
        max_entities: int,
        seed: int,
        name: str,
    ) -> None:
        if not image_ids:
            raise DataError(f"batch stream {name!r}: no images")
        if batch_images < 1 or max_entities < 1:
            raise ConfigError(f"batch stream {name!r}: batch_images and max_entities must be >= 1")
        self.data = data
        self.prompt_provider = prompts
        self.image_ids = sorted(image_ids)
        self.batch_images = int(batch_images)
        self.max_entities = int(max_entities)
        self.seed = int(seed)
        self.name = name
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[str]:
        perm = stream_rng(self.seed, self.name, "epoch", epoch).permutation(len(self.image_ids))
        return [self.image_ids[i] for i in perm]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)

    def _next_image(self) -> str:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        image_id = self._order[self.position]
        self.position += 1
        return image_id

    @property
    def images_per_batch(self) -> int:
        """Images in each (global) batch of the stream."""
        return min(self.batch_images, len(self.image_ids))

    def next(self, shard: tuple[int, int] | None = None) -> Batch:
        """The next global batch, or with `shard=(rank, size)` that rank's contiguous slice of it
        (every rank must call this in step: the stream advances by the global batch)."""
        rng = stream_rng(self.seed, self.name, "draw", self.epoch, self.position)
        image_ids = [self._next_image() for _ in range(self.images_per_batch)]
        return self.make_batch(image_ids, rng, shard)

    def make_batch(
        self, image_ids: Sequence[str], rng: np.random.Generator, shard: tuple[int, int] | None = None
    ) -> Batch:
        """The batch of `image_ids`; with `shard`, only that rank's images are loaded, but the random
        draws of every image are made in order, so the slice equals the whole batch's slice."""
        from cpcsam.modeling.transforms import coords_to_model

        from cpcsam.training.distributed import shard_range

        start, stop = (0, len(image_ids)) if shard is None else shard_range(len(image_ids), *shard)
        inputs, image_index, coords, labels, targets, entity_ids = [], [], [], [], [], []
        total = offset = 0
        for b, image_id in enumerate(image_ids):
            row = self.data.images[image_id]
            n = len(row.entities)
            chosen = list(range(n))
            if n > self.max_entities:
                chosen = sorted(int(i) for i in rng.choice(n, size=self.max_entities, replace=False))
            c, lab = self.prompt_provider.prompts(self.data, image_id, chosen, rng)
            if b < start:
                offset += len(chosen)
            total += len(chosen)
            if not start <= b < stop:
                continue
            inputs.append(self.data.model_input(image_id))
            coords.append(coords_to_model(c, (row.height, row.width), self.data.image_size))
            labels.append(torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64)))
            targets.append(self.data.targets(image_id)[chosen])
            image_index += [b - start] * len(chosen)
            entity_ids += [row.entities[i].entity_id for i in chosen]
        if not inputs:
            raise ConfigError(
                f"batch stream {self.name!r}: rank {shard[0]} of {shard[1]} gets no image of a {len(image_ids)}-image "
                "batch; use at least as many images per batch as processes"
            )
        return Batch(
            image_ids=list(image_ids[start:stop]),
            inputs=torch.stack(inputs),
            is_embedding=self.data.uses_embeddings,
            image_index=torch.tensor(image_index, dtype=torch.long),
            coords=torch.cat(coords).float(),
            labels=torch.cat(labels),
            targets=torch.cat(targets),
            entity_ids=entity_ids,
            entity_offset=offset if shard is not None else 0,
            total_entities=total if shard is not None else None,
            total_images=len(image_ids) if shard is not None else None,
        )
