"""The image-embedding cache of the `embed` stage.

When the image encoder carries no LoRA it is frozen for the whole of training, so its output
for an image never changes: the `embed` stage computes it once and training reads it back
(`TrainingImages(embeddings=EmbeddingStore(...))`) instead of running the encoder each step.

Layout of `data/embeddings/`: one `<sha1(image_id)[:20]>.pt` tensor `[C, h, w]` (float32) per
image and `index.json` with the encoder fingerprint (a hash of the encoder's weights and the
input size), the tensor shape, and the image → file map. A store whose fingerprint differs from
the model's is refused: stale embeddings would silently train against another encoder.

With several processes (`world`), the batches are dealt out round-robin — rank r encodes batches
r, r + N, ... — so every batch holds the same images as in one process (on the CPU the tensors
are the same bytes), each rank writes its own files, and rank 0 writes the index once all ranks
are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from cpcsam.errors import CheckpointError, DataError
from cpcsam.files import torch_load_weights
from cpcsam.training.distributed import SINGLE, World, all_gather_objects, barrier

logger = logging.getLogger(__name__)

INDEX = "index.json"


def encoder_fingerprint(image_encoder: nn.Module) -> str:
    """SHA-256 of the encoder's input size and every weight (names, shapes, bytes)."""
    digest = hashlib.sha256()
    digest.update(f"img_size={getattr(image_encoder, 'img_size', '?')}".encode())
    for name, tensor in sorted(image_encoder.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _file_name(image_id: str) -> str:
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:20] + ".pt"


def write_disabled_index(out_dir: str | Path, reason: str) -> Path:
    """An empty store that says why there is no cache (the stage's output must still exist)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.pt"):
        stale.unlink()
    (out / INDEX).write_text(json.dumps({"enabled": False, "reason": reason}, indent=1) + "\n")
    return out


def write_embeddings(
    encode: "callable",  # [B, 3, S, S] -> [B, C, h, w]
    load_input: "callable",  # image_id -> [3, S, S]
    image_ids: Sequence[str],
    out_dir: str | Path,
    fingerprint: str,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = True,
    world: World = SINGLE,
) -> Path:
    """Encode every image (no grad, batches of `batch_size`) and write the store; returns its folder.

    With `world` (several processes), this rank encodes its share of the batches; every rank
    must call it, and all return once the index is written.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    shape: list[int] | None = None
    ids = sorted(image_ids)
    starts = list(range(0, len(ids), batch_size))[world.rank :: world.size]
    with torch.no_grad():
        for start in tqdm(starts, desc="embed", disable=not (progress and world.is_main)):
            chunk = ids[start : start + batch_size]
            batch = torch.stack([load_input(i) for i in chunk]).to(device)
            embeddings = encode(batch).float().cpu()
            for image_id, embedding in zip(chunk, embeddings):
                name = _file_name(image_id)
                tmp = out / f".{name}.tmp"
                torch.save(embedding.clone(), tmp)
                os.replace(tmp, out / name)
                files[image_id] = name
                shape = list(embedding.shape)
    if world.distributed:  # every rank's files, once every rank has written them
        gathered = all_gather_objects((files, shape), world)
        files = {k: v for part, _ in gathered for k, v in part.items()}
        shape = next((s for _, s in gathered if s is not None), None)
    if world.is_main:
        index = {"enabled": True, "fingerprint": fingerprint, "shape": shape, "images": files}
        tmp = out / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, out / INDEX)
        logger.info("embed: %d image embeddings %s written to %s", len(files), shape, out)
    barrier(world)
    return out


class EmbeddingStore:
    """Read access to a cache written by `write_embeddings`, checked against the model's encoder."""

    def __init__(self, folder: str | Path, expected_fingerprint: str | None = None) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise DataError(f"{index_path}: embedding cache index not found (run the embed stage)")
        try:
            index = json.loads(index_path.read_text())
            if index.get("enabled") is False:
                raise DataError(
                    f"{index_path}: the embed stage wrote no embeddings ({index.get('reason', 'cache not applicable')}); "
                    "re-run it with the current params"
                )
            self.fingerprint: str = index["fingerprint"]
            self.files: dict[str, str] = dict(index["images"])
            self.shape = tuple(index["shape"] or ())
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{index_path}: malformed embedding cache index: {exc}") from exc
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise DataError(
                f"{self.folder}: the cached embeddings were made by another image encoder "
                f"(fingerprint {self.fingerprint[:12]}…, model {expected_fingerprint[:12]}…); re-run the embed stage"
            )

    def covers(self, image_ids: Sequence[str]) -> list[str]:
        """The image ids the store lacks."""
        return [i for i in image_ids if i not in self.files]

    def get(self, image_id: str) -> Tensor:
        name = self.files.get(image_id)
        if name is None:
            raise DataError(f"{self.folder}: no cached embedding for image {image_id!r}; re-run the embed stage")
        path = self.folder / name
        try:
            return torch_load_weights(path, path, f"cached embedding of image {image_id!r}")
        except CheckpointError as exc:  # for the cache, a bad file is bad data: re-run the embed stage
            raise DataError(f"{exc}; re-run the embed stage") from exc
