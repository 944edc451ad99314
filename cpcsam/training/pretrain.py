"""The starting SAM: a class-agnostic generalist pretrained on the procedural corpus.

No SA-1B weights can be downloaded here, so the `pretrain` stage trains a randomly initialised
SAM (all weights) on `cpcsam.training.corpus` scenes, which share no class with any fine-tuning
data. From SAM's recipe it keeps what pays on a CPU budget:
- random prompts per object: a box whose sides move by up to `sigma_max` of the side, 1-3
  positive points (displaced by the same noise), 0-2 negatives from the band outside, or both;
- iterative point sampling: after the first prediction, one corrective click in the error region
  (positive where the object was missed, negative where background was taken) and a second
  decoder pass on the same image embedding, both passes supervised (decoder-only cost);
- the mask loss plus SAM's IoU-head MSE. The mask loss is class-balanced BCE + Dice rather than
  SAM's focal + Dice: from scratch, an unbalanced pixel loss first collapses every mask to
  background and stays there for hundreds of steps (measured on the embedded data).
Left out: multi-mask output for ambiguous clicks (the pipeline decodes one mask per prompt) and
dense mask prompts (the pipeline's decoder takes none).

Training is resumable: `checkpoints/step_*.pt` hold model, optimiser, scheduler and step; scene
`i` of the corpus is a pure function of `(seed, i)`, so a resumed run sees the same batches.
The result is a plain segment-anything state dict (`Sam.state_dict()`), so everything downstream
treats it exactly like an official checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from cpcsam.config import ModelConfig, PretrainConfig, coerce
from cpcsam.errors import ConfigError
from cpcsam.files import torch_save_atomic, write_json_atomic
from cpcsam.prompts.perturb import pad_prompt, prompt_from_mask
from cpcsam.training.checkpoint import (
    file_digest,
    latest_matching,
    load_checkpoint,
    run_fingerprint,
    save_checkpoint,
    source_digest,
)
from cpcsam.training.corpus import CorpusConfig, render_scene
from cpcsam.training.device import resolve_device
from cpcsam.training.distributed import (
    SINGLE,
    World,
    all_gather_objects,
    all_reduce_gradients,
    broadcast_module,
    broadcast_object,
    current_world,
    global_sum,
    rank_device,
    shard_range,
)
from cpcsam.training.errors import NonFiniteLossError
from cpcsam.training.losses import balanced_seg_loss_logits, iou_prediction_loss, mask_iou, seg_loss_logits
from cpcsam.training.metric_logger import MetricLogger, NullLogger

logger = logging.getLogger(__name__)

LABEL_POSITIVE, LABEL_NEGATIVE, LABEL_PAD = 1, 0, -1
VALIDATION_SEED_OFFSET = 1_000_003  # validation scenes come from another seed: never trained on
MASK_LOSSES = {"balanced": balanced_seg_loss_logits, "bce_dice": seg_loss_logits}


@dataclass
class CorpusBatch:
    inputs: torch.Tensor  # [B, 3, S, S]
    image_index: torch.Tensor  # [N]
    coords: torch.Tensor  # [N, P, 2] model frame
    labels: torch.Tensor  # [N, P]
    targets: torch.Tensor  # [N, L, L] in [0, 1]


def corpus_batch(
    seed: int, first_index: int, cfg: PretrainConfig, image_size: int, lowres: int, sigma: float | None = None,
    shard: tuple[int, int] | None = None,
) -> CorpusBatch:
    """Scenes `first_index .. first_index + batch_images - 1` with one random prompt per object.

    `sigma=None` draws each object's prompt noise from U(0, sigma_max); validation passes 0.
    `shard=(start, stop)`: only those scenes of the batch (a rank's share); each scene is a pure
    function of `(seed, scene)`, so the shards of all ranks are the single-process batch.
    """
    from cpcsam.modeling.transforms import mask_to_model, preprocess_image

    corpus = CorpusConfig(long_side=image_size, size_range=tuple(cfg.object_radius))
    kinds = list(cfg.kinds)
    probs = np.array([cfg.kinds[k] for k in kinds], np.float64)
    inputs, index, coords, labels, targets = [], [], [], [], []
    start, stop = shard if shard is not None else (0, cfg.batch_images)
    for b in range(stop - start):
        scene = first_index + start + b
        if cfg.corpus_scenes and sigma is None:  # a finite corpus (validation scenes stay distinct)
            scene %= cfg.corpus_scenes
        image, masks = render_scene(seed, scene, corpus)
        rng = np.random.default_rng([seed, scene, 11])
        if len(masks) > cfg.max_entities:
            masks = [masks[i] for i in sorted(rng.choice(len(masks), cfg.max_entities, replace=False))]
        inputs.append(preprocess_image(image, image_size))
        for mask in masks:
            kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))] if sigma is None else "box"
            noise = float(rng.uniform(0, cfg.sigma_max)) if sigma is None else sigma
            prompt = prompt_from_mask(
                mask, kind, noise, rng, num_positive=int(rng.integers(1, 4)), num_negative=int(rng.integers(0, 3))
            )
            c, lab = pad_prompt(prompt, cfg.prompt_slots)
            coords.append(torch.from_numpy(np.asarray(c, np.float32)))
            labels.append(torch.from_numpy(np.asarray(lab, np.int64)))
            targets.append(mask_to_model(mask, image_size, lowres).clamp(0, 1))
            index.append(b)
    return CorpusBatch(
        inputs=torch.stack(inputs),
        image_index=torch.tensor(index, dtype=torch.long),
        coords=torch.stack(coords),  # the scene's long side is the model side: original = model frame
        labels=torch.stack(labels),
        targets=torch.stack(targets),
    )


def corrective_clicks(
    logits: torch.Tensor, targets: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, scale: float,
    gen: torch.Generator, world: World = SINGLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per prompt in its error region, written into the first padding slot.

    A missed object pixel gives a positive click, a wrongly taken background pixel a negative
    one (SAM's iterative sampling); prompts with no free slot or no error stay as they are.

    The clicks are drawn one after the other from `gen`, in the order of the global batch. Under
    several processes each rank holds a contiguous share of it, so it first skips the draws of
    the ranks before it and afterwards those of the ranks after it (the counts are gathered):
    every click, and the generator's state after the round, is the single process's.
    """
    coords, labels = coords.clone(), labels.clone()
    pred = logits.detach() > 0
    truth = targets >= 0.5
    error = (pred ^ truth).flatten(1)
    width = logits.shape[-1]
    clicked = (labels == LABEL_PAD).any(dim=1) & error.any(dim=1)  # a free slot and an error to click in
    counts = all_gather_objects(int(clicked.sum()), world)
    _skip_draws(gen, sum(counts[: world.rank]))
    for n in range(logits.shape[0]):
        if not bool(clicked[n]):
            continue
        free = (labels[n] == LABEL_PAD).nonzero()
        where = error[n].nonzero()
        pick = int(where[torch.randint(len(where), (1,), generator=gen)].item())
        y, x = divmod(pick, width)
        slot = int(free[0])
        coords[n, slot] = torch.tensor([(x + 0.5) * scale, (y + 0.5) * scale])
        labels[n, slot] = LABEL_POSITIVE if bool(truth[n].flatten()[pick]) else LABEL_NEGATIVE
    _skip_draws(gen, sum(counts[world.rank + 1 :]))
    return coords, labels


def _skip_draws(gen: torch.Generator, count: int) -> None:
    """Advance `gen` past `count` click draws (one `randint` consumes the same state for any bound)."""
    for _ in range(count):
        torch.randint(1, (1,), generator=gen)


def _decode(model: Any, embeddings: torch.Tensor, batch: CorpusBatch, coords: torch.Tensor, labels: torch.Tensor):
    sparse = model.embed_prompts(coords, labels)
    # SAM's per-entity transformer: the order in which the shipped checkpoint's gradients were summed
    out = model.decode(embeddings, batch.image_index, sparse, sam_order=True)
    return out.low_res_logits[:, 0], out.iou_pred


@torch.no_grad()
def validate(model: Any, cfg: PretrainConfig, images: int) -> float:
    """Mean box@0 mask IoU on held-out corpus scenes (another seed)."""
    model.eval()
    scores = []
    for first in range(0, images, cfg.batch_images):
        batch = corpus_batch(cfg.seed + VALIDATION_SEED_OFFSET, first, cfg, model.image_size, model.mask_size, sigma=0.0)
        logits, _ = _decode(model, model.encode_images(batch.inputs), batch, batch.coords, batch.labels)
        scores.append(mask_iou(logits, batch.targets))
    model.train()
    return float(torch.cat(scores).mean())


def pretrain_sam(
    model_section: ModelConfig | Mapping[str, Any],
    cfg: PretrainConfig,
    out_path: str | Path | None,
    metric_logger: MetricLogger | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train SAM (`model_section` sizes, random or `cfg.init` weights) on the corpus for `cfg.steps`; returns (sam, metrics).

    With `checkpoint_dir`, resumes from its latest checkpoint if this run wrote it (same params,
    init weights and code: `cpcsam.training.checkpoint`) and writes one every
    `cfg.checkpoint_every` steps. Writes `sam.state_dict()` to `out_path` atomically when given.

    Inside a process group (`cpcsam.training.distributed`, torchrun) each rank renders its share
    of the batch's scenes; its loss is its objects' share of the global mean and the gradients
    are summed over ranks before clipping, so the step is the single process's on the same
    batch. Rank 0 alone validates and writes checkpoints and outputs; every rank resumes from
    the same checkpoint, with any number of processes.
    """
    from tqdm import tqdm

    from cpcsam.modeling import CPCSAM, build_sam

    metric_logger = metric_logger or NullLogger()
    world = current_world()
    if cfg.batch_images < world.size:
        raise ConfigError(f"pretrain.batch_images ({cfg.batch_images}) is smaller than the number of processes "
                          f"({world.size}): every process needs at least one scene per step")
    device = rank_device(resolve_device(cfg.device), world)
    torch.manual_seed(cfg.seed)
    model_section = coerce(ModelConfig, model_section, "model").model_copy(update={"checkpoint": None})
    sam = build_sam(model_section)
    if cfg.init:  # a further phase: strict loading, except mask refinement stages the init lacks
        load_init(sam, cfg.init)
    seg_loss = MASK_LOSSES[cfg.mask_loss]
    # CPCSAM in `fixed` mode is SAM itself (no CaPL parameters) with the same training entry
    # points as the trainer: the weights learn exactly the path that is fine-tuned later.
    model = CPCSAM(sam, {"mode": "fixed"}).to(device)
    broadcast_module(model, world)  # same seed, same init on every rank; made certain, as DDP does
    model.train()
    params = list(model.sam.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.optim.lr_factor(s, cfg.steps))
    # float16 autocast (amp on CUDA) needs loss scaling, or small gradients underflow to zero;
    # disabled (a no-op, the same bits) on the CPU, whose autocast is bfloat16.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    start, curve, seconds_before = 0, [], 0.0
    fingerprint = run_fingerprint(cfg.as_dict(), model_section.model_dump(mode="json"), file_digest(cfg.init),
                                  source_digest())
    latest = latest_matching(checkpoint_dir, fingerprint) if checkpoint_dir is not None and world.is_main else None
    latest = broadcast_object(latest, world)  # rank 0 alone may clear another run's checkpoints
    if latest is not None:
        state = load_checkpoint(latest)
        model.sam.load_state_dict(state["sam"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start, curve, seconds_before = int(state["step"]), list(state["curve"]), float(state["seconds"])
        logger.info("pretrain: resumed from %s (step %d)", latest, start)
    lowres = model.mask_size
    scale = model.image_size / lowres
    clicks = torch.Generator().manual_seed(cfg.seed)
    shard = shard_range(cfg.batch_images, world.rank, world.size)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)
        if cfg.amp
        else contextlib.nullcontext()
    )
    started = time.perf_counter()
    for step in tqdm(range(start + 1, cfg.steps + 1), desc="pretrain", disable=not progress or not world.is_main, initial=start, total=cfg.steps):
        clicks.manual_seed(cfg.seed * 1_000_003 + step)
        batch = corpus_batch(cfg.seed, (step - 1) * cfg.batch_images, cfg, model.image_size, lowres, shard=shard)
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        batch.image_index = batch.image_index.to(device)
        # This rank's objects' share of the global mean (exactly 1.0 in one process: same bits).
        local = len(batch.image_index)
        share = local / int(global_sum(torch.tensor(float(local)), world))
        with autocast:
            embeddings = model.encode_images(inputs)
            logits, iou_pred = _decode(model, embeddings, batch, batch.coords.to(device), batch.labels.to(device))
            mask_loss = seg_loss(logits, targets).mean()
            iou_loss = iou_prediction_loss(iou_pred, logits, targets)
            first_iou = mask_iou(logits.detach(), targets).mean()
            loss = mask_loss + cfg.iou_loss_weight * iou_loss
            for _ in range(cfg.corrective_clicks):
                coords, labels = corrective_clicks(logits, targets, batch.coords, batch.labels, scale, clicks, world)
                logits, iou_pred = _decode(model, embeddings, batch, coords.to(device), labels.to(device))
                loss = loss + seg_loss(logits, targets).mean()
                loss = loss + cfg.iou_loss_weight * iou_prediction_loss(iou_pred, logits, targets)
        loss = loss * share
        # One collective for the logged values; every rank takes the same NaN decision on the total.
        total, mask_total, iou_total, iou_mean = global_sum(
            torch.stack([loss.detach(), mask_loss.detach() * share, iou_loss.detach() * share, first_iou * share]), world
        ).tolist()
        if not math.isfinite(total):
            raise NonFiniteLossError(f"pretrain step {step}: non-finite loss ({total}); nothing was written")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        all_reduce_gradients(params, world)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        scaler.step(optimizer)  # skipped (and the scale lowered) when float16 gradients overflowed
        scaler.update()
        scheduler.step()
        row = {
            "step": step,
            "loss": total,
            "mask_loss": mask_total,
            "iou_loss": iou_total,
            "mask_iou": iou_mean,
            "grad_norm": float(grad_norm),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if world.is_main and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            row["val_box_iou"] = validate(model, cfg, cfg.val_images)
            logger.info("pretrain step %d: loss %.3f train IoU %.3f val box@0 IoU %.3f", step, row["loss"], row["mask_iou"], row["val_box_iou"])
        curve.append(row)
        if step % cfg.log_every == 0 or step == cfg.steps:
            metric_logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            if world.is_main and not progress:  # no bar (a long run logging to a file): a line instead
                per_step = (time.perf_counter() - started) / (step - start)
                logger.info("pretrain step %d/%d: loss %.3f train IoU %.3f, %.2f s/step, %.0f min left", step,
                            cfg.steps, total, iou_mean, per_step, per_step * (cfg.steps - step) / 60)
        if world.is_main and checkpoint_dir is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            state = {
                "fingerprint": fingerprint,
                "sam": model.sam.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "curve": curve,
                "seconds": seconds_before + time.perf_counter() - started,
            }
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            save_checkpoint(checkpoint_dir, step, state, keep=2)
    seconds = seconds_before + time.perf_counter() - started
    model.eval()
    tail = curve[-10:]
    vals = [r["val_box_iou"] for r in curve if "val_box_iou" in r]
    metrics = {
        "source": "pretrained-here",
        "corpus": "procedural (cpcsam.training.corpus)",
        "init": cfg.init,
        "mask_loss": cfg.mask_loss,
        "steps": cfg.steps,
        "scenes_seen": cfg.steps * cfg.batch_images,
        "first": {k: v for k, v in curve[0].items() if k != "step"},
        "final": {k: float(np.mean([r[k] for r in tail])) for k in ("loss", "mask_loss", "iou_loss", "mask_iou")},
        "val_box_iou": vals[-1] if vals else None,
    }
    if out_path is not None and world.is_main:
        save_sam_state_dict(model.sam, out_path)
        write_json_atomic(Path(out_path).with_name("curve.json"), curve, indent=None)
        # Wall time differs run to run: not in metrics.json (a DVC out that must be reproducible).
        write_json_atomic(Path(out_path).with_name("timing.json"), {"seconds": seconds})
    return model.sam, metrics


def load_init(sam: torch.nn.Module, uri: str) -> None:
    """Load `uri` into `sam` strictly; refinement stages it lacks start as identity (`grow_state_dict`)."""
    from cpcsam.modeling.build import load_state_dict_strict, read_state_dict
    from cpcsam.modeling.refine import grow_state_dict

    state, added = grow_state_dict(sam, read_state_dict(uri))
    load_state_dict_strict(sam, state, source=uri)
    if added:
        logger.info("pretrain: %s has no mask refinement stage; %d of its tensors start as identity", uri, len(added))
    logger.info("pretrain: initialised from %s", uri)


def save_sam_state_dict(sam: torch.nn.Module, path: str | Path) -> Path:
    """`torch.save(sam.state_dict())` (segment-anything's checkpoint format), atomically."""
    torch_save_atomic({k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}, path)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """The long pretraining of the shipped checkpoint (see checkpoints/README.md).

    `python -m cpcsam.training.pretrain --params params.yaml --out checkpoints/sam_small_generalist.pth
    -S pretrain.steps=8000`: the `pretrain:` and `model:` sections of the params file with the
    overrides (the seed is `pretrain.seed` as given), resumable from `--work` (checkpoints, log).
    """
    import argparse

    from cpcsam.config import load_config
    from cpcsam.files import sha256_file
    from cpcsam.training.device import configure_process

    parser = argparse.ArgumentParser(prog="python -m cpcsam.training.pretrain", description=main.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=".pretrain-work", help="checkpoints and log of the run (resumable)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(work / "pretrain.log"), logging.StreamHandler()],
    )
    params = load_config(args.params, args.overrides)
    cfg = params.pretrain
    configure_process(cfg.threads)
    model = params.model.model_copy(update={"checkpoint": None})
    recipe = {"model": model.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json")}
    logger.info("pretrain recipe: %s", json.dumps(recipe, sort_keys=True))
    _, metrics = pretrain_sam(model, cfg, args.out, progress=False, checkpoint_dir=work / "checkpoints")
    import hashlib

    md5 = hashlib.md5(Path(args.out).read_bytes()).hexdigest()
    init = {"init_md5": hashlib.md5(Path(cfg.init).read_bytes()).hexdigest()} if cfg.init else {}
    write_json_atomic(Path(args.out).with_suffix(".json"),
                      {**metrics, **init, "md5": md5, "sha256": sha256_file(args.out), "recipe": recipe})
    logger.info("pretrain: wrote %s (md5 %s), val box@0 IoU %s", args.out, md5, metrics["val_box_iou"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
