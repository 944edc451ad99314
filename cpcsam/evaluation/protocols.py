"""The evaluation protocols of one run (docs/METHOD.md §5–6) and the loop that scores every model.

Protocols, named as they appear in the table and in `metrics.json`:
- `box@σ`, `points@σ` (σ ∈ `evaluate.sigmas`): one prompt per ground-truth entity, derived from
  its mask by `cpcsam.prompts.perturb.prompt_from_mask` with noise σ. The random draws depend on
  (seed, image, entity, protocol) only, so every model sees the very same prompts.
- `box@σ+ttaK`: test-time calibration: the protocol's prompt plus K−1 jittered copies of its box
  (`jitter_prompt`), calibrated together and their logits averaged. Points-only prompts carry no
  object scale to jitter by, so TTA is defined for prompts with a box.
- `auto`: automatic prompts for the target classes: prototypes from the support subset (default
  10% of the evaluation images, disjoint from the query images), one prompt per (query image,
  target class present), see `cpcsam.prompts.auto`. Scored per class like the others.

The support subset first covers every target class once (a seeded pick among the images that
hold it), then fills up to `support_fraction` at random: a purely random 10% would often miss
the rarer target classes altogether and leave them unmeasured.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cpcsam.errors import ConfigError
from cpcsam.inference import EncodedImage, Predictor
from cpcsam.evaluation.metrics import ClassScores
from cpcsam.evaluation.references import REFERENCE_MODELS, PromptOnlyReference
from cpcsam.config import AutoConfig, EvaluateConfig
from cpcsam.prompts.auto import auto_prompt, class_prototypes, mask_to_grid, masked_average
from cpcsam.prompts.perturb import (
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    Prompt,
    entity_rng,
    jitter_box,
    prompt_from_mask,
)

logger = logging.getLogger(__name__)

_PROTOCOL = re.compile(r"^(box|points|box\+points)@([0-9.]+)(?:\+tta(\d+))?$")


@dataclass(frozen=True)
class Protocol:
    name: str
    kind: str  # box | points | box+points | auto
    sigma: float = 0.0
    tta: int = 1

    @classmethod
    def parse(cls, name: str) -> "Protocol":
        if name == "auto":
            return cls("auto", "auto")
        m = _PROTOCOL.match(name)
        if not m:
            raise ConfigError(f"evaluation protocol {name!r}: expected 'box@σ', 'points@σ', 'box+points@σ' (+ttaK) or 'auto'")
        tta = int(m.group(3) or 1)
        if tta > 1 and m.group(1) == "points":
            raise ConfigError(f"evaluation protocol {name!r}: test-time calibration needs a box to jitter")
        return cls(name, m.group(1), float(m.group(2)), tta)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "sigma": self.sigma, "tta": self.tta}


def protocol_names(cfg: EvaluateConfig) -> list[str]:
    """The protocol list of the `evaluate` params: kinds × sigmas, the TTA rows, `auto`."""
    names = [f"{kind}@{float(s):g}" for kind in cfg.kinds for s in cfg.sigmas]
    if cfg.tta.k > 1:
        names += [f"{base}+tta{cfg.tta.k}" for base in cfg.tta.protocols]
    if cfg.auto.enabled:
        names.append("auto")
    return names


@dataclass
class EntityRecord:
    entity_id: str
    class_name: str
    mask: np.ndarray  # bool [H, W]


@dataclass
class ImageRecord:
    image_id: str
    uri: str
    entities: list[EntityRecord] = field(default_factory=list)


def jitter_prompt(prompt: Prompt, sigma: float, rng: np.random.Generator, width: int, height: int) -> Prompt:
    """A perturbed copy of a prompt that has a box: box sides moved by U(−σ, σ)·side
    (`perturb.jitter_box`), its points displaced by U(−σ, σ)·(box w, box h), clipped to the image."""
    box = prompt.box()
    if box is None:
        raise ConfigError(f"test-time calibration needs a box in the prompt, got a {prompt.kind!r} prompt")
    new_box = jitter_box(box, sigma, rng, width, height)
    coords = prompt.coords.copy()
    is_point = ~np.isin(prompt.labels, [LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT])
    if is_point.any():
        side = np.array([box[2] - box[0], box[3] - box[1]])
        moved = coords[is_point] + rng.uniform(-sigma, sigma, size=(int(is_point.sum()), 2)) * side
        coords[is_point] = np.clip(np.round(moved), 0, [width - 1, height - 1])
    coords[prompt.labels == LABEL_BOX_TOP_LEFT] = new_box[:2]
    coords[prompt.labels == LABEL_BOX_BOTTOM_RIGHT] = new_box[2:]
    return Prompt(kind=prompt.kind, coords=coords, labels=prompt.labels.copy())


def entity_prompts(protocol: Protocol, image: ImageRecord, seed: int, num_positive: int = 1,
                   num_negative: int = 0, tta_sigma: float = 0.1) -> list[list[Prompt]]:
    """K' prompt variants per entity of the image (K' = 1 without TTA), the same for every model."""
    out = []
    for ent in image.entities:
        tag = f"{ent.entity_id}|{protocol.kind}@{protocol.sigma:g}"
        rng = entity_rng(seed, image.image_id, tag, 0)
        base = prompt_from_mask(ent.mask, protocol.kind, protocol.sigma, rng, num_positive, num_negative)
        variants = [base]
        h, w = ent.mask.shape
        for k in range(1, protocol.tta):
            variants.append(jitter_prompt(base, tta_sigma, entity_rng(seed, image.image_id, tag + "|tta", k), w, h))
        out.append(variants)
    return out


def choose_support(images: Sequence[ImageRecord], target: Iterable[str], fraction: float, seed: int) -> list[str]:
    """Image ids of the support subset: each target class covered once, then random up to `fraction`."""
    rng = np.random.default_rng([int(seed), 104729])
    ids = [im.image_id for im in images]
    want = max(1, math.ceil(fraction * len(ids))) if fraction > 0 else 0
    chosen: list[str] = []
    for name in sorted(set(target)):
        if any(name in {e.class_name for e in im.entities} for im in images if im.image_id in chosen):
            continue
        holders = [im.image_id for im in images if name in {e.class_name for e in im.entities}]
        if holders:
            chosen.append(holders[int(rng.integers(len(holders)))])
    rest = [i for i in ids if i not in chosen]
    extra = max(0, want - len(chosen))
    if extra and rest:
        chosen += [rest[int(j)] for j in rng.choice(len(rest), size=min(extra, len(rest)), replace=False)]
    # Never leave no query image at all.
    if len(chosen) >= len(ids) and len(ids) > 1:
        chosen = chosen[: len(ids) - 1]
    return chosen


@dataclass
class EvalConfig:
    """The `evaluate` section resolved for a run: its protocols parsed, its effective seed."""

    protocols: list[Protocol]
    seed: int = 0
    num_positive: int = 1
    num_negative: int = 0
    tta_sigma: float = 0.1
    support_fraction: float = 0.1
    auto: AutoConfig = field(default_factory=AutoConfig)
    threshold: float = 0.0
    overlay_images: int = 4
    overlay_protocol: str = "box@0"
    batch_entities: int = 32  # entities per decoder call, several protocols' together (`_prompt_batches`)

    @classmethod
    def from_section(cls, cfg: EvaluateConfig, seed: int) -> "EvalConfig":
        return cls(
            protocols=[Protocol.parse(n) for n in protocol_names(cfg)],
            seed=int(seed),
            num_positive=cfg.num_positive,
            num_negative=cfg.num_negative,
            tta_sigma=cfg.tta.sigma,
            support_fraction=cfg.support_fraction,
            auto=cfg.auto,
            threshold=0.0 if cfg.threshold == "auto" else cfg.threshold,  # auto: per model (evaluate_models)
            overlay_images=cfg.overlays,
            overlay_protocol=cfg.overlay_protocol,
            batch_entities=cfg.batch_entities,
        )


@dataclass
class ModelResult:
    protocols: dict[str, dict[str, Any]]
    overlays: dict[str, list[np.ndarray]]  # image id → predicted masks under the overlay protocol
    auto_missing: list[str]  # target classes with no prototype (no support instance)


def support_prototypes(engine: Predictor, support: Sequence[ImageRecord], classes: Iterable[str],
                       load_image: Callable[[ImageRecord], np.ndarray]) -> dict[str, torch.Tensor]:
    """Per-class prototypes from the support images' ground truth, with this model's encoder."""
    wanted = set(classes)
    feats: dict[str, list[torch.Tensor]] = {}
    for im in support:
        enc = engine.encode(load_image(im))
        emb = enc.embedding[0]
        grid = (int(emb.shape[-2]), int(emb.shape[-1]))
        for ent in im.entities:
            if ent.class_name in wanted:
                weights = mask_to_grid(ent.mask, enc.input_size, engine.image_size, grid)
                feat = masked_average(emb, weights)
                if feat is not None:
                    feats.setdefault(ent.class_name, []).append(feat)
    return class_prototypes(feats)


def evaluate_model(
    engine: Predictor,
    images: Sequence[ImageRecord],
    base: Sequence[str],
    target: Sequence[str],
    support_ids: Sequence[str],
    cfg: EvalConfig,
    load_image: Callable[[ImageRecord], np.ndarray],
    name: str = "model",
) -> ModelResult:
    """Every protocol of `cfg` on every image, for one model."""
    # Prompt-only references (cpcsam.evaluation.references) answer only plain box protocols.
    supports = getattr(engine, "supports", None)
    protocols = [p for p in cfg.protocols if supports is None or (supports(p.kind) and p.tta == 1)]
    scores = {p.name: ClassScores() for p in protocols}
    overlays: dict[str, list[np.ndarray]] = {}
    overlay_ids = {im.image_id for im in images[: cfg.overlay_images]}
    has_auto = any(p.kind == "auto" for p in protocols)
    support_set = set(support_ids)
    prototypes: dict[str, torch.Tensor] = {}
    if has_auto:
        prototypes = support_prototypes(engine, [im for im in images if im.image_id in support_set], target, load_image)

    for im in tqdm(images, desc=f"evaluate {name}", leave=False):
        if not im.entities:
            continue
        enc = engine.encode(load_image(im))
        gt = [e.mask for e in im.entities]
        names = [e.class_name for e in im.entities]
        for protocol in protocols:
            if protocol.kind == "auto" and im.image_id not in support_set:
                _score_auto(engine, enc, im, target, prototypes, cfg.auto, scores[protocol.name], cfg.threshold)
        for batch in _prompt_batches([p for p in protocols if p.kind != "auto"], im, cfg):
            logits = engine.predict(enc, [variants for _, prompts in batch for variants in prompts])
            start = 0
            for protocol, prompts in batch:
                own = logits[start : start + len(prompts)]
                start += len(prompts)
                preds = list(own > cfg.threshold)
                scores[protocol.name].add_image(preds, gt, names, logits=own, threshold=cfg.threshold)
                if protocol.name == cfg.overlay_protocol and im.image_id in overlay_ids:
                    overlays[im.image_id] = preds
    summaries = {p.name: scores[p.name].summary(base, target) for p in protocols}
    missing = sorted(set(target) - set(prototypes)) if has_auto else []
    return ModelResult(summaries, overlays, missing)


# One decoder call's worth of protocols: each with its prompts, K' variants per entity of the image.
_PromptBatch = list[tuple[Protocol, list[list[Prompt]]]]


def _prompt_batches(protocols: Sequence[Protocol], image: ImageRecord, cfg: EvalConfig) -> list[_PromptBatch]:
    """The protocols' prompts for one image, in batches for one `Predictor.predict` call each.

    A batch holds protocols whose prompts have the same K' variants and the same padded size P
    (`pad_prompts`), so that each entity's decoder input is exactly what its protocol's own call
    would give it (a longer P would add not-a-point tokens, which the attention sees), and at most
    `cfg.batch_entities` entities, which bounds the full-size logits held at once. Every entity is
    decoded on its own, so the scores are the same to float32 rounding (a product over more rows
    may round differently: in the embedded default, one entity's box@0.8 mask moved by a few
    pixels, its class's Dice in the sixth decimal). The per-call work (prompt embedding, the first
    block's image side, Python) is paid once per batch instead of once per protocol: the embedded
    default's eleven prompted protocols take 3 calls per image (of up to six entities) instead of 11.
    """
    batches: list[_PromptBatch] = []
    open_batches: dict[tuple[int, int], _PromptBatch] = {}  # by prompt shape (K', P): the batch still filling
    for protocol in protocols:
        prompts = entity_prompts(protocol, image, cfg.seed, cfg.num_positive, cfg.num_negative, cfg.tta_sigma)
        if not prompts:
            continue
        shape = (len(prompts[0]), max(len(q.labels) for variants in prompts for q in variants))
        batch = open_batches.get(shape)
        if batch is None or sum(len(p) for _, p in batch) + len(prompts) > cfg.batch_entities:
            batch = open_batches[shape] = []
            batches.append(batch)
        batch.append((protocol, prompts))
    return batches


def _score_auto(engine: Predictor, enc: EncodedImage, im: ImageRecord, target: Sequence[str],
                prototypes: Mapping[str, torch.Tensor], auto_cfg: AutoConfig, scores: ClassScores,
                threshold: float) -> None:
    present = sorted({e.class_name for e in im.entities} & set(target) & set(prototypes))
    if not present:
        return
    coords, labels = [], []
    for name in present:
        prompt = auto_prompt(enc.embedding[0], prototypes[name], engine.image_size, enc.input_size, auto_cfg)
        coords.append(torch.from_numpy(prompt.coords))
        labels.append(torch.from_numpy(prompt.labels))
    p = max(len(lab) for lab in labels)
    c = torch.zeros(len(present), 1, p, 2)
    lab = torch.full((len(present), 1, p), -1, dtype=torch.long)
    for i, (xy, ll) in enumerate(zip(coords, labels)):
        c[i, 0, : len(ll)] = xy
        lab[i, 0, : len(ll)] = ll
    logits = engine.predict_model_frame(enc, c, lab)
    for i, name in enumerate(present):
        gt = np.logical_or.reduce([e.mask for e in im.entities if e.class_name == name])
        scores.add_class_score(name, logits[i] > threshold, gt)


def evaluate_models(
    engines: Mapping[str, Predictor],
    images: Sequence[ImageRecord],
    base: Sequence[str],
    target: Sequence[str],
    cfg: EvalConfig,
    load_image: Callable[[ImageRecord], np.ndarray],
    headline_model: str = "cpcsam",
    headline_protocol: str = "box@0.1",
    thresholds: Mapping[str, float] | None = None,
    scored_elsewhere: Mapping[str, ModelResult] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, list[np.ndarray]]]]:
    """All models on all protocols: the `metrics.json` dict and the overlay masks per model.

    `thresholds`: a model's own mask threshold instead of `cfg.threshold` (`evaluate.threshold:
    auto`); each model's entry and the headline then say which one it was scored at.
    `scored_elsewhere`: results of the same images and protocols computed before (the pipeline's
    `references` stage), listed after `engines` in the table."""
    results = score_models(engines, images, base, target, cfg, load_image, thresholds)
    return assemble_metrics({**results, **(scored_elsewhere or {})}, images, base, target, cfg,
                            headline_model, headline_protocol, thresholds)


def score_models(
    engines: Mapping[str, Predictor],
    images: Sequence[ImageRecord],
    base: Sequence[str],
    target: Sequence[str],
    cfg: EvalConfig,
    load_image: Callable[[ImageRecord], np.ndarray],
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, ModelResult]:
    """`evaluate_model` for every engine, two at a time; the results in the engines' order."""
    support = auto_support(images, target, cfg)

    def run(name: str) -> tuple[ModelResult, float]:
        started = time.perf_counter()
        own = cfg if name not in (thresholds or {}) else replace(cfg, threshold=float(thresholds[name]))
        result = evaluate_model(engines[name], images, base, target, support, own, load_image, name)
        return result, time.perf_counter() - started

    # Each model's numbers depend only on its own seeded prompts, so the order of work and the
    # worker that does it change nothing. The prompt-only references need no model and no torch
    # (GrabCut); they go first, so that a slow one does not start last.
    references = [name for name, engine in engines.items() if isinstance(engine, PromptOnlyReference)]
    names = [*references, *(name for name in engines if name not in references)]
    if torch.get_num_threads() == 1 and len(names) > 1 and _can_fork():
        done = _in_two_processes(run, names)
    else:
        done = _in_two_threads(run, names, references)
    for name in engines:
        result, seconds = done[name]
        logger.info("evaluated %s in %.1f s: target Dice %s", name, seconds,
                    {p: round(s["target"]["dice"], 4) for p, s in result.protocols.items() if s["target"]["dice"] is not None})
    return {name: done[name][0] for name in engines}  # the engines' order, whatever finished first


# Models on one torch thread each are scored two at a time in two forked processes, not two
# threads of this one: the per-entity work between torch calls (prompts, masks, scores) holds the
# GIL, and beside a busy process a thread descheduled while it holds the GIL stalls the other one
# too. The embedded default's evaluate stage took 45 s on two threads and 33 s on two processes,
# 57 s and 49 s beside a busy process (medians of three alternating runs, docs/PERFORMANCE.md).
# Fork hands the loaded engines and images to the workers by copying the process, so nothing is
# pickled but a model's name and its result; the call in progress waits for them here (fork
# copies module globals).
_FORKED_RUN: Callable[[str], tuple[ModelResult, float]] | None = None


def _run_forked(name: str) -> tuple[ModelResult, float]:
    assert _FORKED_RUN is not None, "score_models' worker ran outside score_models"
    return _FORKED_RUN(name)


def _can_fork() -> bool:
    """Fork only where it is safe: Linux (macOS's system libraries are not fork-safe) and no CUDA
    context (a forked child cannot use its parent's)."""
    return sys.platform == "linux" and not torch.cuda.is_initialized()


def _exit_with_parent() -> None:
    """In a forked worker: ask Linux for SIGTERM when the parent dies. A stage killed mid-run
    (an orchestrator's cancel, the OOM killer) would otherwise leave its workers waiting on the
    queue of a dead pool for ever."""
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request
        os._exit(1)


def _in_two_processes(run: Callable[[str], tuple[ModelResult, float]],
                      names: Sequence[str]) -> dict[str, tuple[ModelResult, float]]:
    global _FORKED_RUN
    _FORKED_RUN = run  # set before the pool forks its workers (on the first submit)
    try:
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_exit_with_parent) as pool:
            futures = {name: pool.submit(_run_forked, name) for name in names}
            return {name: future.result() for name, future in futures.items()}
    except BrokenProcessPool as exc:
        raise RuntimeError("a worker process scoring models died (killed, or out of memory?); with the "
                           "stage's `threads` above 1 the models are scored in the stage's own process") from exc
    finally:
        _FORKED_RUN = None


def _in_two_threads(run: Callable[[str], tuple[ModelResult, float]], names: Sequence[str],
                    references: Sequence[str]) -> dict[str, tuple[ModelResult, float]]:
    """Two threads of this process. With one torch thread per model (where fork is not safe) both
    take models from the same queue. With more, the models run one after another in this thread,
    each on all its torch threads (two models' thread teams on the same cores stall each other),
    and the second thread scores the references beside them (OpenCV releases the GIL)."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="evaluate") as pool:
        if torch.get_num_threads() == 1:
            futures = {name: pool.submit(run, name) for name in names}
            return {name: future.result() for name, future in futures.items()}
        pending = {name: pool.submit(run, name) for name in references}
        done = {name: run(name) for name in names if name not in pending}
        done.update({name: future.result() for name, future in pending.items()})
    return done


def auto_support(images: Sequence[ImageRecord], target: Sequence[str], cfg: EvalConfig) -> list[str]:
    """The support images of the `auto` protocol (none without it)."""
    if not any(p.kind == "auto" for p in cfg.protocols):
        return []
    return choose_support(images, target, cfg.support_fraction, cfg.seed)


def assemble_metrics(
    results: Mapping[str, ModelResult],
    images: Sequence[ImageRecord],
    base: Sequence[str],
    target: Sequence[str],
    cfg: EvalConfig,
    headline_model: str,
    headline_protocol: str,
    thresholds: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, list[np.ndarray]]]]:
    """The `metrics.json` dict (models in the order of `results`) and the overlays per model."""
    support = auto_support(images, target, cfg)
    metrics: dict[str, Any] = {
        "protocols": {p.name: p.spec() for p in cfg.protocols},
        "classes": {"base": list(base), "target": list(target)},
        "images": {"evaluated": len(images), "auto_support": sorted(support),
                   "auto_queries": len(images) - len(support)},
        "models": {},
    }
    overlays: dict[str, dict[str, list[np.ndarray]]] = {}
    for name, result in results.items():
        metrics["models"][name] = {"protocols": result.protocols}
        if thresholds and name in thresholds:
            metrics["models"][name]["threshold"] = float(thresholds[name])
        if result.auto_missing:
            metrics["models"][name]["auto_classes_without_prototype"] = result.auto_missing
        overlays[name] = result.overlays
    metrics["headline"] = headline_numbers(metrics, headline_model, headline_protocol)
    return metrics, overlays


def headline_numbers(metrics: Mapping[str, Any], model: str, protocol: str) -> dict[str, Any]:
    """The gating numbers: one model under one protocol (ConfigError when either is absent)."""
    if model not in metrics["models"]:
        raise ConfigError(f"evaluate.headline.model: {model!r} was not evaluated (have {sorted(metrics['models'])})")
    protocols = metrics["models"][model]["protocols"]
    if protocol not in protocols:
        raise ConfigError(f"evaluate.headline.protocol: {protocol!r} is not a protocol of this run ({sorted(protocols)})")
    s = protocols[protocol]
    own_threshold = metrics["models"][model].get("threshold")
    references = {
        name: {"target_dice": entry["protocols"][protocol]["target"]["dice"],
               "base_dice": entry["protocols"][protocol]["base"]["dice"]}
        for name, entry in metrics["models"].items()
        if name in REFERENCE_MODELS and protocol in entry["protocols"]
    }
    return {
        "model": model,
        "protocol": protocol,
        "references": references,
        "target_dice": s["target"]["dice"],
        "base_dice": s["base"]["dice"],
        "overall_dice": s["overall"]["dice"],
        "target_iou": s["target"]["iou"],
        "base_iou": s["base"]["iou"],
        "label_map_miou": s.get("label_map_miou"),
        **({"threshold": own_threshold} if own_threshold is not None else {}),
    }


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`model/protocol/group_metric` → value, for MLflow (None values left out)."""
    out: dict[str, float] = {}
    for model, entry in metrics["models"].items():
        for protocol, s in entry["protocols"].items():
            key = f"{model}/{protocol.replace('+', '_').replace('@', '_s')}"
            for group in ("base", "target", "overall"):
                for metric in ("dice", "iou"):
                    if s[group][metric] is not None:
                        out[f"{key}/{group}_{metric}"] = float(s[group][metric])
            if s.get("label_map_miou") is not None:
                out[f"{key}/label_map_miou"] = float(s["label_map_miou"])
    for k, v in metrics.get("headline", {}).items():
        if isinstance(v, (int, float)) and v is not None:
            out[f"headline/{k}"] = float(v)
    return out


def image_records(manifest: "pd.DataFrame", splits: Sequence[str], max_images: int = 0,  # noqa: F821
                  seed: int = 0) -> list[ImageRecord]:
    """The evaluation images of `splits` with their entities' masks, in a stable order.

    With `max_images` > 0 a seeded sample of that many images (sorted by id) keeps the run short.
    """
    from cpcsam.data import decode_mask

    rows = manifest[manifest["split"].isin(list(splits))]
    if rows.empty:
        raise ConfigError(f"evaluate.split: no images in split(s) {list(splits)} of the manifest")
    ids = sorted(rows["image_id"].unique())
    if max_images and len(ids) > max_images:
        rng = np.random.default_rng([int(seed), 7919])
        ids = sorted(ids[int(i)] for i in rng.choice(len(ids), size=int(max_images), replace=False))
    wanted = set(ids)
    records: dict[str, ImageRecord] = {}
    for row in rows[rows["image_id"].isin(wanted)].sort_values(["image_id", "entity_id"], kind="stable").itertuples():
        rec = records.setdefault(row.image_id, ImageRecord(str(row.image_id), str(row.image_uri)))
        mask = decode_mask(row.rle_counts, int(row.height), int(row.width))
        rec.entities.append(EntityRecord(str(row.entity_id), str(row.class_name), np.asarray(mask, bool)))
    return [records[i] for i in ids]
