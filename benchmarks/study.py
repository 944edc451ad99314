"""The study: CPC-SAM against its same-budget baselines, several training seeds, paired intervals.

    python benchmarks/study.py [--profiles oceancoco,trashcan] [--seeds 0,1,2]
        [--variants cpcsam,lora_only,full_finetune] [--split test] [--out reports/study]
        [-S train.steps=200 ...] [-P trashcan:model.sizes.small.image_size=384 ...]

For each data profile: ingest once, perturb once, then for every seed × variant train from the
starting SAM of params.yaml (`model.checkpoint`) with the same budget (`train:` section, the
variant setting only the trainer and CaPL modes), and score every evaluation image under the
box and points protocols of `evaluate.sigmas`, next to the starting SAM and the filled box.
Statistics are over images, paired: for (CPC-SAM − baseline) — or, without `cpcsam` in
`--variants`, the first variant's — the per-image target Dice difference, averaged over seeds,
with a 95% bootstrap interval (10 000 resamples of images).
Writes `<out>/study.json` (every per-image score) and `<out>/report.md` (tables, intervals,
budget, timings), and prints the report. Hyper-parameters are never chosen on the test split:
`--split val` is the one to tune on.

    python benchmarks/study.py --pool DIR,DIR,... --out DIR

pools finished studies that differ only in `data.split.seed` (the same profile, settings, variants,
seeds and protocols, each scored on its own split's held-out part): one estimate over more held-out
videos than one split has. Each split's images are resampled within that split (a stratified
bootstrap), and the pooled mean weighs every image once per split that holds it. Writes
`<out>/pooled.md` and `<out>/pooled.json`.

    python benchmarks/study.py --profiles trashcan --holdout trashcan_new ...

also scores the same trained models on every image of another data profile (`--holdout`), a set
that no split of the study's profile holds (e.g. other videos of the same data set): its own
report section, whose intervals also resample whole groups (videos), since frames of one video are
near-duplicates and an image bootstrap would overstate how much they tell. The held-out profile
must name the same target classes.

`--inference-ablations` also scores every trained CPC-SAM with a part of CaPL removed at inference
only (`cpcsam-task_off`: no task causal module, `cpcsam-entity_off`: no entity causal module),
the same weights otherwise: what each module contributes to the model that was trained with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = 10_000


def per_image_scores(engine: Any, images: list, protocols: list, target: set[str], seed: int,
                     threshold: float = 0.0) -> dict[str, list]:
    """Per protocol, the target-class Dice of each image (mean over its target classes; None: none),
    masks being logits > `threshold` (`evaluate.threshold`, as the evaluate stage).

    One encoder pass per image serves every protocol.
    """
    from cpcsam.evaluation.metrics import dice
    from cpcsam.evaluation.protocols import entity_prompts

    out: dict[str, list[float | None]] = {p.name: [] for p in protocols}
    for im, pixels in images:
        names = [e.class_name for e in im.entities]
        present = sorted(set(names) & target)
        encoded = engine.encode(pixels) if present else None
        for protocol in protocols:
            if not present:
                out[protocol.name].append(None)
                continue
            logits = engine.predict(encoded, entity_prompts(protocol, im, seed))
            scores = []
            for name in present:
                idx = [j for j, n in enumerate(names) if n == name]
                pred = np.logical_or.reduce([logits[j] > threshold for j in idx])
                gt = np.logical_or.reduce([im.entities[j].mask for j in idx])
                scores.append(dice(pred, gt))
            out[protocol.name].append(float(np.mean(scores)))
    return out


def paired_interval(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Mean of a − b over images and its 95% percentile bootstrap interval."""
    diff = a - b
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))].mean(axis=1)
    return {"mean": float(diff.mean()), "low": float(np.percentile(means, 2.5)), "high": float(np.percentile(means, 97.5))}


def stratified_interval(diffs: list[np.ndarray], rng: np.random.Generator) -> dict[str, float]:
    """Mean of the per-image differences of several splits, all images weighed alike, and its 95%
    percentile bootstrap interval, each split's images resampled within that split."""
    n = sum(len(d) for d in diffs)
    totals = np.zeros(BOOTSTRAP)
    for d in diffs:
        totals += d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].sum(axis=1)
    means = totals / n
    return {"mean": float(np.concatenate(diffs).mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5))}


def clustered_interval(diff: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """95% percentile bootstrap interval of the mean of `diff` with whole groups resampled (each
    draw: as many groups as there are, with replacement; the mean over the drawn groups' images)."""
    names, index = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(index, weights=diff), np.bincount(index)
    draws = rng.integers(0, len(names), size=(BOOTSTRAP, len(names)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return {"group_low": float(np.percentile(means, 2.5)), "group_high": float(np.percentile(means, 97.5)),
            "groups": int(len(names))}


# Parts of a trained CPC-SAM removed at inference by `--inference-ablations` (CaPL attributes).
INFERENCE_ABLATIONS = {"cpcsam-task_off": "task", "cpcsam-entity_off": "entity"}


def without_module(model: Any, part: str) -> Any:
    """A copy of a trained CPC-SAM whose CaPL lacks `part` ("task" or "entity"); CaPL skips a
    module that is None, as in the ablation modes that never had it."""
    import copy

    ablated = copy.deepcopy(model)
    setattr(ablated.capl, part, None)
    return ablated


def holdout_images(params: Any, holdout: str, target: set[str], seen_groups: set[str],
                   out: Path) -> tuple[list, list[str]]:
    """Every image of the data profile `holdout` (ingested with all its images in one part, so
    that no target-class entity is withheld from training) with its pixels, and each one's group
    (video). Raises SystemExit when the profile is unknown, names other target classes, or holds
    a group of the study's own profile (`seen_groups`): those frames are not held out."""
    from cpcsam.config import SplitOverride
    from cpcsam.data import load_classes, load_manifest, read_image
    from cpcsam.data.ingest import run_ingest
    from cpcsam.evaluation.protocols import image_records

    profiles = dict(params.data.profiles)
    if holdout not in profiles:
        raise SystemExit(f"study --holdout: no data profile {holdout!r} in data.profiles (add it with -S)")
    profiles[holdout] = profiles[holdout].model_copy(update={"split": SplitOverride(ratios={"test": 1.0})})
    data_dir = out / "data" / holdout
    run_ingest(params.data.model_copy(update={"profile": holdout, "profiles": profiles, "eval_splits": ["test"],
                                              "progress": False}), data_dir)
    manifest, classes = load_manifest(data_dir / "manifest.parquet"), load_classes(data_dir / "classes.json")
    if set(classes["target"]) != target:
        raise SystemExit(f"study --holdout: {holdout!r} has target classes {sorted(classes['target'])}, "
                         f"the study's profile {sorted(target)}: set the same roles")
    group = dict(zip(manifest["image_id"].astype(str), manifest["group_id"].astype(str)))
    shared = sorted(set(group.values()) & seen_groups)
    if shared:
        raise SystemExit(f"study --holdout: {holdout!r} shares {len(shared)} group(s) with the study's profile "
                         f"({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}): not held out")
    records = image_records(manifest, ["test"])
    return [(im, np.array(read_image(im.uri))) for im in records], [group[im.image_id] for im in records]


def run_profile(params: Any, profile: str, seeds: list[int], variants: list[str], split: str, out: Path,
                inference_ablations: bool = False, holdout: str | None = None) -> list[dict]:
    """The study of one profile: its result, and with `holdout` a second one, the same models
    scored on every image of that profile."""
    from cpcsam.data import load_classes, load_manifest, read_image
    from cpcsam.data.ingest import run_ingest
    from cpcsam.inference import Predictor
    from cpcsam.evaluation.calibration import calibrate_threshold
    from cpcsam.evaluation.protocols import Protocol, image_records
    from cpcsam.evaluation.references import FilledBox
    from cpcsam.modeling import CPCSAM, build_sam
    from cpcsam.prompts.perturb import perturb_manifest
    from cpcsam.training.run import prepare_training
    from cpcsam.training.variants import variant_sections

    data_dir = out / "data" / profile
    run_ingest(params.data.model_copy(update={"profile": profile, "progress": False}), data_dir)
    manifest, classes = load_manifest(data_dir / "manifest.parquet"), load_classes(data_dir / "classes.json")
    perturb = params.seeded("perturb")
    prompts = perturb_manifest(manifest, perturb, perturb.seed, progress=False)
    images = [(im, np.array(read_image(im.uri))) for im in image_records(manifest, [split])]
    target = set(classes["target"])
    seen = set(manifest["group_id"].astype(str))
    held, groups = holdout_images(params, holdout, target, seen, out) if holdout else ([], [])
    protocols = [Protocol.parse(f"{kind}@{s:g}") for kind in ("box", "points") for s in params.evaluate.sigmas]
    if params.evaluate.tta.k > 1:  # test-time calibration rows, as the evaluate stage adds them
        protocols += [Protocol.parse(f"{name}+tta{params.evaluate.tta.k}") for name in params.evaluate.tta.protocols]
    eval_seed = params.stage_seed("evaluate")
    sam_path = str(params.model.checkpoint)
    threshold = params.evaluate.threshold
    calibration = params.evaluate.calibration
    if threshold == "auto" and calibration.split == split:
        raise SystemExit(f"{profile}: evaluate.calibration.split is the study's split {split!r}; choose another")
    calibration_images = image_records(manifest, [calibration.split]) if threshold == "auto" else []
    calibration_pixels = {im.image_id: np.array(read_image(im.uri)) for im in calibration_images}  # read once
    thresholds: dict[str, dict[str, float]] = {}

    result: dict[str, Any] = {"profile": profile, "split": split, "images": len(images), "target": sorted(target),
                              "base": classes["base"], "protocols": [p.name for p in protocols], "models": {},
                              "budget": {}, "seconds": {}, "thresholds": thresholds}
    scored = [(result, images)]  # each result with the images it is scored on
    if holdout:
        scored.append(({**result, "profile": f"{profile} models on {holdout}", "split": "every", "images": len(held),
                        "groups": groups, "models": {}}, held))

    def score(engine, model: str, run: str, kinds: tuple[str, ...] | None = None, own: float | None = None) -> None:
        """Record target Dice per image of every result; under `evaluate.threshold: auto` at this
        model's (and seed's) own threshold, chosen on the calibration split's base classes as the
        evaluate stage does (the held-out images at that same threshold)."""
        if own is None:
            own = threshold
            if threshold == "auto":
                own = calibrate_threshold(engine, calibration_images, classes["base"], calibration.grid, eval_seed,
                                          lambda im: calibration_pixels[im.image_id], model).threshold
                thresholds.setdefault(model, {})[run] = own
        for res, imgs in scored:
            res["models"].setdefault(model, {})[run] = per_image_scores(
                engine, imgs, [p for p in protocols if kinds is None or p.kind in kinds], target, eval_seed, own)

    score(FilledBox(), "filled_box", "-", kinds=("box",), own=0.0)  # hard masks: any threshold
    start = CPCSAM(build_sam(params.model.model_copy(update={"checkpoint": sam_path})), {"mode": "fixed"})
    score(Predictor.from_model(start, crop=params.model.crop), "sam", "-")
    for variant in variants:
        for seed in seeds:
            seeded = params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})
            train, model = variant_sections(variant, seeded.seeded("train"), params.model)
            started = time.perf_counter()
            trainer = prepare_training(train, model, params.perturb, manifest, prompts, sam_path, None)
            summary = trainer.run(resume=False, progress=False)
            seconds = time.perf_counter() - started
            score(Predictor.from_model(trainer.model.eval(), crop=params.model.crop), variant, str(seed))
            if inference_ablations and variant == "cpcsam":
                for name, part in INFERENCE_ABLATIONS.items():
                    ablated = Predictor.from_model(without_module(trainer.model, part), crop=params.model.crop)
                    score(ablated, name, str(seed))
            result["budget"][variant] = summary["budget"]
            result["seconds"].setdefault(variant, []).append(seconds)
            print(f"{profile} {variant} seed {seed}: trained in {seconds:.0f} s", file=sys.stderr, flush=True)
    return [res for res, _ in scored]


def _array(runs: dict[str, dict[str, list]], protocol: str) -> np.ndarray:
    """[seeds, images] target Dice (NaN where an image has no target class)."""
    return np.array([[np.nan if v is None else v for v in scores[protocol]] for scores in runs.values()], float)


def _per_image(arr: np.ndarray) -> np.ndarray:
    """[seeds, images] → [images] averaged over seeds; NaN, without a warning, where an image has no target class."""
    out = np.full(arr.shape[1], np.nan)
    scored = ~np.isnan(arr).all(axis=0)
    out[scored] = np.nanmean(arr[:, scored], axis=0)
    return out


def lead_model(result: dict) -> str:
    """The model the paired differences are taken from: CPC-SAM, or else the first trained variant
    of the run (`--variants entity,lora_only` compares the `entity` ablation with LoRA-only)."""
    trained = [m for m in result["models"] if m not in ("filled_box", "sam")]
    return "cpcsam" if "cpcsam" in trained else trained[0]


def summarise(result: dict, rng: np.random.Generator) -> dict:
    rows, intervals = [], []
    lead = lead_model(result)
    for protocol in result["protocols"]:
        per_model = {m: _array(runs, protocol) for m, runs in result["models"].items() if protocol in next(iter(runs.values()))}
        for model, arr in per_model.items():
            seed_means = np.nanmean(arr, axis=1)
            rows.append({"protocol": protocol, "model": model, "dice": float(seed_means.mean()),
                         "seed_sd": float(seed_means.std(ddof=1)) if len(seed_means) > 1 else 0.0, "seeds": len(seed_means)})
        if lead in per_model:
            ours = _per_image(per_model[lead])
            keep = ~np.isnan(ours)
            for other in [m for m in per_model if m != lead]:
                theirs = _per_image(per_model[other])
                interval = paired_interval(ours[keep], theirs[keep], rng)
                if result.get("groups"):
                    interval |= clustered_interval(ours[keep] - theirs[keep], np.asarray(result["groups"])[keep], rng)
                intervals.append({"protocol": protocol, "versus": other, **interval})
    return {"lead": lead, "rows": rows, "intervals": intervals}


def report(results: list[dict], summaries: list[dict]) -> str:
    lines = ["# Study: CPC-SAM vs same-budget baselines", ""]
    for result, summary in zip(results, summaries):
        lines += [f"## {result['profile']} ({result['split']} split, {result['images']} images, "
                  f"target classes {', '.join(result['target'])})", ""]
        if result.get("overrides"):
            lines += ["Parameters as params.yaml except " + ", ".join(f"`{o}`" for o in result["overrides"]) + ".", ""]
        ablated = [name for name in INFERENCE_ABLATIONS if name in result["models"]]
        if ablated:
            lines += [", ".join(f"`{name}`" for name in ablated) + ": the trained CPC-SAM of each seed scored without "
                      "that CaPL module at inference (`--inference-ablations`).", ""]
        lines += ["Target-class Dice (mean over seeds; ± the seeds' standard deviation):", "",
                  "| protocol | " + " | ".join(result["models"]) + " |",
                  "| --- |" + " ---: |" * len(result["models"])]
        for protocol in result["protocols"]:
            cells = []
            for model in result["models"]:
                row = next((r for r in summary["rows"] if r["protocol"] == protocol and r["model"] == model), None)
                cells.append("–" if row is None else f"{100 * row['dice']:.1f}" +
                             (f" ± {100 * row['seed_sd']:.1f}" if row["seeds"] > 1 else ""))
            lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
        lead = "CPC-SAM" if summary["lead"] == "cpcsam" else f"`{summary['lead']}`"
        grouped = bool(result.get("groups"))
        lines += ["", f"Paired difference of target Dice, {lead} − other (per image, seeds averaged; 95% bootstrap"
                  + (f" over images, and over the {len(set(result['groups']))} videos" if grouped else "") + "):", "",
                  "| protocol | versus | mean | 95% interval |" + (" videos resampled |" if grouped else ""),
                  "| --- | --- | ---: | --- |" + (" --- |" if grouped else "")]
        for iv in summary["intervals"]:
            lines.append(f"| {iv['protocol']} | {iv['versus']} | {100 * iv['mean']:+.1f} | "
                         f"[{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}] |"
                         + (f" [{100 * iv['group_low']:+.1f}, {100 * iv['group_high']:+.1f}] |" if grouped else ""))
        if result.get("thresholds"):
            lines += ["", "Mask thresholds (`evaluate.threshold: auto`, chosen per model and seed on the base classes "
                      "of the calibration split): " + "; ".join(
                          f"{model} " + ", ".join(f"{t:g}" for t in runs.values())
                          for model, runs in result["thresholds"].items()) + "."]
        lines += ["", "Budget per variant: " + "; ".join(
            f"{v}: {b['steps']} steps, {b['images_per_step']:.1f} images/step, {b['trainable_parameters']:,} trainable, "
            f"{np.mean(result['seconds'][v]):.0f} s" for v, b in result["budget"].items()), ""]
    return "\n".join(lines) + "\n"


SPLIT_SEED = "data.split.seed="


def load_for_pooling(dirs: list[Path]) -> list[dict]:
    """The one profile result of each `<dir>/study.json`, checked poolable: the same profile, split,
    protocols, models and training seeds, and overrides that differ only in `data.split.seed`,
    which must differ between them. Raises SystemExit naming the file and the mismatch."""
    results = []
    for d in dirs:
        path = d / "study.json"
        try:
            found = json.loads(path.read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"study --pool: {path}: not a finished study ({err})") from None
        if len(found) != 1:
            raise SystemExit(f"study --pool: {path}: holds {len(found)} profiles; pool studies of one profile")
        results.append(found[0])

    def shape(result: dict) -> dict:
        return {"profile": result["profile"], "split": result["split"], "protocols": result["protocols"],
                "models": {m: sorted(runs) for m, runs in result["models"].items()},
                "overrides": sorted(o for o in result.get("overrides", []) if not o.startswith(SPLIT_SEED))}

    first = shape(results[0])
    for d, result in zip(dirs[1:], results[1:]):
        other = shape(result)
        for key in first:
            if other[key] != first[key]:
                raise SystemExit(f"study --pool: {d / 'study.json'} differs from {dirs[0] / 'study.json'} "
                                 f"in {key}: {other[key]!r} vs {first[key]!r}")
    seeds = [split_seed(r) for r in results]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"study --pool: the studies share a data.split.seed ({seeds}): one split counted twice")
    return results


def split_seed(result: dict) -> str:
    return next((o[len(SPLIT_SEED):] for o in result.get("overrides", []) if o.startswith(SPLIT_SEED)), "(params.yaml)")


def pool_report(results: list[dict], rng: np.random.Generator) -> tuple[str, dict]:
    """Per split and pooled: each model's target Dice, and the lead model − each other, paired."""
    lead = lead_model(results[0])
    first = results[0]
    seeds = [split_seed(r) for r in results]
    lines = [f"# Study pooled over {len(results)} splits: {first['profile']}, {first['split']} parts", "",
             "Parameters as params.yaml except " + ", ".join(f"`{o}`" for o in first.get("overrides", [])
                                                              if not o.startswith(SPLIT_SEED)) +
             f"; `data.split.seed` {', '.join(seeds)} ({', '.join(str(r['images']) for r in results)} images).", "",
             "Target-class Dice, mean over images of the seeds' mean (pooled: every split's images):", "",
             "| protocol | " + " | ".join(first["models"]) + " |", "| --- |" + " ---: |" * len(first["models"])]
    for protocol in first["protocols"]:
        cells = []
        for model, runs in first["models"].items():
            if protocol not in next(iter(runs.values())):
                cells.append("–")
                continue
            per_image = [_per_image(_array(r["models"][model], protocol)) for r in results]
            cells.append(f"{100 * np.nanmean(np.concatenate(per_image)):.1f}")
        lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
    name = "CPC-SAM" if lead == "cpcsam" else f"`{lead}`"
    lines += ["", f"Paired difference of target Dice, {name} − other (per image, seeds averaged; 95% bootstrap, "
              "images resampled within each split):", "",
              "| protocol | versus | " + " | ".join(f"split {s}" for s in seeds) + " | pooled |",
              "| --- | --- |" + " --- |" * (len(seeds) + 1)]
    intervals = []
    for protocol in first["protocols"]:
        if protocol not in next(iter(first["models"][lead].values())):
            continue
        ours = [_per_image(_array(r["models"][lead], protocol)) for r in results]  # per split
        for other in [m for m in first["models"] if m != lead and protocol in next(iter(first["models"][m].values()))]:
            diffs = []
            for r, lead_scores in zip(results, ours):
                theirs = _per_image(_array(r["models"][other], protocol))
                keep = ~np.isnan(lead_scores)
                diffs.append(lead_scores[keep] - theirs[keep])
            per_split = [paired_interval(d, np.zeros_like(d), rng) for d in diffs]
            pooled = stratified_interval(diffs, rng)
            intervals.append({"protocol": protocol, "versus": other, "splits": dict(zip(seeds, per_split)),
                              "pooled": pooled})
            fmt = [f"{100 * iv['mean']:+.1f} [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]"
                   for iv in [*per_split, pooled]]
            lines.append(f"| {protocol} | {other} | " + " | ".join(fmt[:-1]) + f" | **{fmt[-1]}** |")
    return "\n".join(lines) + "\n", {"lead": lead, "split_seeds": seeds, "intervals": intervals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-P", "--profile-set", dest="profile_overrides", action="append", default=[],
                        metavar="PROFILE:KEY=VALUE", help="an override for one profile only (after -S)")
    parser.add_argument("--profiles", default="oceancoco,trashcan")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="cpcsam,lora_only,full_finetune")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--inference-ablations", action="store_true",
                        help="also score each trained CPC-SAM without its task / entity module at inference")
    parser.add_argument("--holdout", metavar="PROFILE",
                        help="also score the trained models on every image of this data profile")
    parser.add_argument("--out", default=str(ROOT / "reports" / "study"))
    parser.add_argument("--pool", metavar="DIR,DIR,...",
                        help="pool finished studies that differ only in data.split.seed; trains nothing")
    args = parser.parse_args(argv)
    if args.pool:
        dirs = [Path(d) for d in args.pool.split(",")]
        if len(dirs) < 2:
            parser.error("--pool: name at least two study folders")
        text, pooled = pool_report(load_for_pooling(dirs), np.random.default_rng(0))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pooled.json").write_text(json.dumps(pooled))
        (out / "pooled.md").write_text(text)  # beside, never over, a study's own report.md
        print(text)
        return 0
    torch.set_num_threads(args.threads)
    from cpcsam.config import load_config
    from cpcsam.errors import ConfigError

    per_profile: dict[str, list[str]] = {}
    for item in args.profile_overrides:
        profile, sep, override = item.partition(":")
        if not sep or "=" not in override:
            parser.error(f"-P {item!r}: expected PROFILE:KEY=VALUE")
        per_profile.setdefault(profile, []).append(override)
    unknown = sorted(set(per_profile) - set(args.profiles.split(",")))
    if unknown:
        parser.error(f"-P names profiles not in --profiles: {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    results, summaries = [], []
    rng = np.random.default_rng(0)
    for profile in args.profiles.split(","):
        overrides = args.overrides + per_profile.get(profile, [])
        try:
            params = load_config(args.params, overrides)
        except ConfigError as err:  # one line, as the pipeline's steps
            parser.exit(2, f"study: {err}\n")
        root = getattr(params.data.profiles.get(profile), "root", None)
        if root is not None and not str(root).startswith("s3://") and not Path(root).is_dir():
            print(f"study: skipping {profile}: {root} is absent", file=sys.stderr)
            continue
        for result in run_profile(params, profile, seeds, args.variants.split(","), args.split, out,
                                  args.inference_ablations, args.holdout):
            result["overrides"] = overrides
            results.append(result)
            summaries.append(summarise(result, rng))
        (out / "study.json").write_text(json.dumps({"results": results, "summaries": summaries}))
    text = report(results, summaries)
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
