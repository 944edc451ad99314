"""Putting a training run together from typed params sections and files (what the components call).

    trainer = prepare_training(params.seeded("train"), params.model, params.perturb, manifest, prompts, sam, out)
    summary = trainer.run()
    save_cpcsam(out / "model.pt", trainer.model, training_model_cfg(params.model, trainer.cfg.mode, None))

Library code: no MLflow/DVC here; the metric logger is passed in.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from cpcsam.errors import ConfigError, DataError
from cpcsam.training.bilevel import Trainer
from cpcsam.training.checkpoint import file_digest, run_fingerprint, source_digest
from cpcsam.config import EmbedConfig, ModelConfig, PerturbConfig, TrainConfig
from cpcsam.training.data import TablePrompts, TrainingImages
from cpcsam.training.metric_logger import MetricLogger

logger = logging.getLogger(__name__)

ENCODER_LORA_TARGET = "image_encoder_qkv"


def training_model_cfg(model: ModelConfig, mode: str, sam_checkpoint: str | Path | None) -> ModelConfig:
    """The `model` section as a training mode uses it: baselines get `capl.mode = fixed`."""
    capl = model.capl if mode == "bilevel" else model.capl.model_copy(update={"mode": "fixed"})
    return model.model_copy(update={"checkpoint": str(sam_checkpoint) if sam_checkpoint else None, "capl": capl})


def build_training_model(model: ModelConfig, mode: str, sam_checkpoint: str | Path | None):
    """SAM (from `sam_checkpoint`) + CaPL, with LoRA adapters in the bilevel and lora-only modes."""
    from cpcsam.modeling import build_cpcsam

    return build_cpcsam(training_model_cfg(model, mode, sam_checkpoint), with_lora=mode in ("bilevel", "lora-only"))


def encoder_is_frozen(model: ModelConfig, mode: str) -> bool:
    """True when training never changes the image encoder, so its embeddings can be cached."""
    return mode != "full-finetune" and ENCODER_LORA_TARGET not in model.lora.targets


def configure_training_process(model: ModelConfig, train: TrainConfig) -> None:
    """This process's CPU settings for training (`configure_process`), set before the trainer is built.

    Large blocks come from a heap that is kept whole whenever the image encoder is frozen: its
    pass then runs without gradients (or not at all, from the embedding cache), the case where a
    kept heap pays (`keep_freed_memory`). A frozen ViT-B encoder, uncached (focus crops, or
    `embedding_cache: off`), 4 entities per image: lora-only 13.4–14.1 → 8.6 s per step, bilevel
    24.8–26.0 → 15.5–17.2 s, at a peak RSS of 4.0–5.3 against 4.0 GB and 4.9–5.5 against 4.15 GB
    (old and new alternating in fresh processes). Not with LoRA on the encoder: peak RSS doubled.
    """
    from cpcsam.training.device import configure_process

    configure_process(train.threads, large_blocks_from_heap=encoder_is_frozen(model, train.mode))


def use_embedding_cache(model: ModelConfig, train: TrainConfig) -> bool:
    """Whether training reads `data/embeddings/` (`train.embedding_cache`: auto | on | off)."""
    frozen = encoder_is_frozen(model, train.mode)
    if model.crop.context > 0:  # each entity has its own crop, never a whole image's embedding
        if train.embedding_cache == "on":
            raise ConfigError("train.embedding_cache: on cannot serve focus crops (model.crop.context > 0): every "
                              "entity is encoded in its own crop; use auto or off")
        return False
    if train.embedding_cache == "on" and not frozen:
        raise ConfigError(
            "train.embedding_cache: on needs a frozen image encoder; remove "
            f"{ENCODER_LORA_TARGET!r} from model.lora.targets or use mode lora-only/bilevel (not full-finetune)"
        )
    return train.embedding_cache == "on" or (train.embedding_cache == "auto" and frozen)


def prepare_training(
    cfg: TrainConfig,
    model_section: ModelConfig,
    perturb: PerturbConfig,
    manifest: Any,
    prompts_table: Any,
    sam_checkpoint: str | Path | None,
    out_dir: str | Path | None,
    embeddings_dir: str | Path | None = None,
    metric_logger: MetricLogger | None = None,
    checkpoint_dir: str | Path | None = None,
) -> Trainer:
    """A ready `Trainer`: `cfg` carries the effective seed (`Params.seeded("train")`)."""
    from cpcsam.training.embeddings import EmbeddingStore, encoder_fingerprint

    # LoRA's A matrices (and SAM itself without a checkpoint) are randomly initialised.
    torch.manual_seed(cfg.seed)
    model = build_training_model(model_section, cfg.mode, sam_checkpoint)
    cached = use_embedding_cache(model_section, cfg)
    store = None
    if cached:
        if embeddings_dir is None:
            raise ConfigError("train: the embedding cache is in use but no embeddings folder was given")
        store = EmbeddingStore(embeddings_dir, encoder_fingerprint(model.sam.image_encoder))
    data = TrainingImages(manifest, model.image_size, model.mask_size, cache_mb=cfg.cache_mb, embeddings=store,
                          crop=model_section.crop)
    if store is not None:
        missing = store.covers(data.image_ids)
        if missing:
            raise DataError(f"{embeddings_dir}: no cached embeddings for {len(missing)} training images (e.g. {missing[:3]}); re-run the embed stage")
    prompts = TablePrompts(prompts_table, perturb.k, perturb.prompt_slots)
    prompts.check_covers(data)
    fingerprint = run_fingerprint(
        cfg.as_dict(),
        training_model_cfg(model_section, cfg.mode, None).model_dump(mode="json"),
        {"k": perturb.k, "slots": perturb.prompt_slots},
        sorted((e.entity_id, row.image_id) for row in data.images.values() for e in row.entities),
        prompts_digest(prompts_table),
        file_digest(sam_checkpoint),
        cached,
        source_digest(),
    )
    return Trainer(model, cfg, data, prompts, out_dir, metric_logger, fingerprint=fingerprint,
                   checkpoint_dir=checkpoint_dir)


def prompts_digest(table: Any) -> str:
    """A hash of the prompt table's content (a changed perturb stage invalidates checkpoints)."""
    import pandas as pd

    hashed = pd.util.hash_pandas_object(table[["entity_id", "k", "kind"]].astype(str), index=False)
    digest = hashlib.sha256(hashed.values.tobytes())
    for coords in table["coords"]:
        digest.update(repr(list(coords)).encode())
    return digest.hexdigest()


def build_embedding_cache(
    cfg: TrainConfig,
    model_section: ModelConfig,
    embed: EmbedConfig,
    manifest: Any,
    sam_checkpoint: str | Path | None,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """The `embed` stage: cache the training images' embeddings when training can use them.

    The encoder is built exactly as `prepare_training` builds it (same seed: `cfg` carries the
    train stage's effective seed; same checkpoint), so the fingerprint matches. When the cache
    does not apply (the encoder trains), an index saying so is written instead. Returns a summary.
    In a multi-process job (an initialised process group) each rank encodes its share.
    """
    from cpcsam.training.device import resolve_device
    from cpcsam.training.distributed import barrier, current_world, rank_device
    from cpcsam.training.embeddings import encoder_fingerprint, write_disabled_index, write_embeddings

    world = current_world()
    if not use_embedding_cache(model_section, cfg):
        reason = (
            f"train.embedding_cache={cfg.embedding_cache}, mode={cfg.mode}, "
            f"encoder LoRA={'yes' if not encoder_is_frozen(model_section, cfg.mode) else 'no'}"
        )
        if model_section.crop.context > 0:
            reason = f"model.crop.context={model_section.crop.context:g}: focus crops are encoded per entity"
        if world.is_main:
            write_disabled_index(out_dir, reason)
        barrier(world)
        logger.info("embed: no cache (%s)", reason)
        return {"enabled": False, "reason": reason, "images": 0}
    torch.manual_seed(cfg.seed)
    model = build_training_model(model_section, cfg.mode, sam_checkpoint)
    target = rank_device(resolve_device(embed.device), world)
    model.to(target).eval()
    data = TrainingImages(manifest, model.image_size, model.mask_size, cache_mb=0)
    write_embeddings(
        model.encode_images,
        data.preprocessed_image,
        data.image_ids,
        out_dir,
        encoder_fingerprint(model.sam.image_encoder),
        batch_size=embed.batch_size,
        device=target,
        progress=progress,
        world=world,
    )
    return {"enabled": True, "images": len(data.image_ids)}
