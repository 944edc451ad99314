"""Ingestion: a profile's source -> manifest + class table + quarantine report + summary.

`run_ingest(data_cfg, out_dir)` is what `components.ingest` calls. The raw data is only read;
the synthetic source is the one that writes files (its PNGs, under `out_dir/images`).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from cpcsam.data.manifest import SPLITS, build_manifest, split_ratios
from cpcsam.data.records import Quarantine
from cpcsam.data.sources import build_source
from cpcsam.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
CLASSES = "classes.json"
QUARANTINE = "quarantine.json"
SUMMARY = "summary.json"
IMAGES = "images"


def resolve_profile(data_cfg: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(profile name, source config, split config, role config) for `data.profile`.

    A profile entry is a source config (`source:` + its keys); it may carry its own `split`
    and `roles` mappings, which override `data.split` / `data.roles` key by key.
    """
    name = data_cfg.get("profile")
    profiles = data_cfg.get("profiles") or {}
    if not name:
        raise ConfigError("params data.profile: not set (name one of data.profiles)")
    if name not in profiles or not isinstance(profiles[name], dict):
        raise ConfigError(f"params data.profile={name!r}: not an entry of data.profiles {sorted(profiles)}")
    source_cfg = copy.deepcopy(profiles[name])
    split_cfg = {**copy.deepcopy(data_cfg.get("split", {})), **source_cfg.pop("split", {})}
    role_cfg = {**copy.deepcopy(data_cfg.get("roles", {})), **source_cfg.pop("roles", {})}
    if "progress" in data_cfg and "progress" not in source_cfg:
        source_cfg["progress"] = data_cfg["progress"]
    return str(name), source_cfg, split_cfg, role_cfg


def run_ingest(data_cfg: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Ingest the selected profile into `out_dir`; returns the summary.

    The reports are written first, then DataError is raised (one message listing every
    problem) when the quarantined fraction is over `max_quarantine_fraction`, a split with a
    ratio > 0 is empty, or a target class has no entity in an evaluation split.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / IMAGES
    if images_dir.exists():  # stale generated images from an earlier run must not linger
        shutil.rmtree(images_dir)
    images_dir.mkdir()
    name, source_cfg, split_cfg, role_cfg = resolve_profile(data_cfg)
    eval_splits = list(data_cfg.get("eval_splits", ["val", "test"]))
    unknown = sorted(set(eval_splits) - set(SPLITS))
    if unknown:
        raise ConfigError(f"params data.eval_splits: unknown split(s) {unknown}")
    max_pixels = int(data_cfg.get("max_pixels", 40_000_000))
    max_fraction = float(data_cfg.get("max_quarantine_fraction", 0.1))

    source = build_source(source_cfg, images_dir, max_pixels)
    log.info("ingest: profile %s, source %s, %d images", name, source.name, len(source))
    quarantine = Quarantine()
    records = list(source.records(quarantine))
    with_entities = [r for r in records if r.entities]
    df, class_table, withheld = build_manifest(with_entities, source.classes(), split_cfg, role_cfg, eval_splits)

    df.to_parquet(out / MANIFEST, index=False)
    (out / CLASSES).write_text(json.dumps(class_table, indent=2) + "\n")
    (out / QUARANTINE).write_text(json.dumps(quarantine.to_json(), indent=2) + "\n")

    ratios = split_ratios(split_cfg)
    per_split = {
        s: {
            "images": int(df.loc[df.split == s, "image_id"].nunique()),
            "entities": int((df.split == s).sum()),
            "groups": int(df.loc[df.split == s, "group_id"].nunique()),
        }
        for s in SPLITS
    }
    problems: list[str] = []
    fraction = quarantine.fraction()
    if fraction > max_fraction:
        problems.append(
            f"{fraction:.1%} of the examined items were quarantined, over data.max_quarantine_fraction="
            f"{max_fraction} (by reason: {quarantine.counts()})"
        )
    for s in SPLITS:
        if ratios[s] > 0 and per_split[s]["entities"] == 0:
            problems.append(f"split {s!r} is empty")
    for cls in class_table["target"]:
        for s in eval_splits:
            if not ((df.class_name == cls) & (df.split == s)).any():
                problems.append(f"target class {cls!r} has no entity in evaluation split {s!r}")
    summary = {
        "profile": name,
        "source": source.name,
        "n_images": int(df.image_id.nunique()),
        "n_entities": int(len(df)),
        "n_groups": int(df.group_id.nunique()),
        "images_read": len(records),
        "images_without_entities": len(records) - len(with_entities),
        "splits": per_split,
        "n_classes": len(class_table["classes"]),
        "base": class_table["base"],
        "target": class_table["target"],
        "quarantine": {
            "n_items": len(quarantine.items),
            "fraction": round(fraction, 6),
            "max_fraction": max_fraction,
            "counts_by_reason": quarantine.counts(),
        },
        **withheld,
        "problems": problems,
        "seconds": round(time.perf_counter() - start, 3),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if problems:
        raise DataError(f"ingest of profile {name!r} failed: " + "; ".join(problems) + f" (reports in {out})")
    return summary
