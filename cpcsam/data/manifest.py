"""The manifest: one row per entity, split by group, base/target by class (docs/CONTRACTS.md).

Building it: `assign_splits` (groups -> train/val/test, seeded), `assign_roles` (classes ->
base/target, from lists or a seeded ratio), `build_manifest` (rows, with target-class entities
of train images withheld and reported). Reading it: `load_manifest`, `load_classes`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, Mapping

import numpy as np
import pandas as pd

from cpcsam.data.records import ImageRecord
from cpcsam.config import RolesConfig, SplitConfig, coerce
from cpcsam.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ROLES = ("base", "target")
MANIFEST_COLUMNS = {
    "image_id": "str",
    "image_uri": "str",
    "width": "int64",
    "height": "int64",
    "entity_id": "str",
    "class_name": "str",
    "rle_counts": "str",
    "bbox_x": "float64",
    "bbox_y": "float64",
    "bbox_w": "float64",
    "bbox_h": "float64",
    "area": "int64",
    "split": "str",
    "role": "str",
    "group_id": "str",
}


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read `manifest.parquet` (local or s3://) with the contract's columns and dtypes."""
    from cpcsam.data import storage

    import io

    data = storage.read_bytes(path)  # outside the try: an S3 outage must not read as a bad file
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet manifest: {storage.name_the_file(str(exc), path)}") from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks columns {missing}")
    df = _typed(df[list(MANIFEST_COLUMNS)])
    df["image_uri"] = [_resolve_uri(uri, path) for uri in df["image_uri"]]
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write `manifest.parquet` atomically; image paths inside its folder are stored relative to it.

    Why relative: ingest's generated images live in its own out (`images/`). With absolute paths
    the manifest's bytes depended on the checkout's location (another clone got another
    `dvc.lock`), and a manifest restored from DVC's cache in another worktree (every flow run has
    one) pointed at the images of a worktree that no longer exists. `load_manifest` resolves them
    against the manifest's folder again. Other paths (a data set elsewhere, `s3://`) stay as given.
    """
    from cpcsam.files import atomic_path

    folder = os.path.abspath(os.path.dirname(os.fspath(path)))

    def relative(uri: str) -> str:
        if "://" in uri:
            return uri
        absolute = os.path.abspath(uri)
        inside = absolute.startswith(folder + os.sep)
        return Path(os.path.relpath(absolute, folder)).as_posix() if inside else uri

    out = df.assign(image_uri=[relative(uri) for uri in df["image_uri"]])
    with atomic_path(path) as tmp:
        out.to_parquet(tmp, index=False)


def _resolve_uri(uri: str, manifest: str | os.PathLike) -> str:
    """A stored image URI as a usable one: relative paths are relative to the manifest's folder."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    base = os.fspath(manifest)
    if "://" in base:
        return f"{base.rsplit('/', 1)[0]}/{uri}"
    return os.path.join(os.path.abspath(os.path.dirname(base)), uri)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col, dtype in MANIFEST_COLUMNS.items():
        out[col] = out[col].astype(object).astype(str) if dtype == "str" else out[col].astype(dtype)
    return out.reset_index(drop=True)


def load_classes(path: str | os.PathLike) -> dict[str, Any]:
    """Read `classes.json`: {"classes": [{"name", "id", "role"}], "base": [...], "target": [...]}."""
    from cpcsam.data import storage

    try:
        table = json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    for key in ("classes", "base", "target"):
        if key not in table:
            raise DataError(f"{path}: class table lacks {key!r}")
    return table


def split_ratios(cfg: SplitConfig | Mapping[str, Any]) -> dict[str, float]:
    cfg = coerce(SplitConfig, cfg, "data.split")
    ratios = {s: float(cfg.ratios.get(s, 0.0)) for s in SPLITS}
    if any(r < 0 for r in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise ConfigError(f"params data.split.ratios: {ratios} must be >= 0 and add up to 1")
    return ratios


def assign_splits(group_sizes: dict[str, int], ratios: dict[str, float], seed: int) -> dict[str, str]:
    """Groups -> split, whole groups only, image counts close to the ratios.

    Groups are ordered by a seeded hash of their id and laid end to end by image count; a
    group goes to the split whose share of that line holds the group's midpoint. A group's
    place depends only on its id, the seed and the sizes before it, so losing a few images
    to quarantine moves at most the groups at a boundary, instead of reshuffling every split.
    Every split with a ratio > 0 gets at least one group when there are enough groups.
    """
    order = sorted(group_sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    total = sum(group_sizes.values())
    active = [s for s in SPLITS if ratios[s] > 0]
    bounds, acc = [], 0.0
    for s in active:
        acc += ratios[s]
        bounds.append((acc, s))
    assigned: dict[str, str] = {}
    midpoints: dict[str, float] = {}
    pos = 0
    for group in order:
        mid = (pos + group_sizes[group] / 2) / total
        pos += group_sizes[group]
        midpoints[group] = mid
        assigned[group] = next((s for b, s in bounds if mid < b), active[-1])
    # a split left empty takes the group nearest to its share from a split that has several
    if len(order) >= len(active):
        for b, split in bounds:
            if split in assigned.values():
                continue
            centre = b - ratios[split] / 2
            counts = {s: sum(1 for v in assigned.values() if v == s) for s in active}
            donors = [g for g in order if counts[assigned[g]] > 1]
            group = min(donors, key=lambda g: abs(midpoints[g] - centre))
            assigned[group] = split
    return assigned


def assign_roles(
    class_names: Sequence[str],
    class_counts: dict[str, dict[str, int]],
    cfg: RolesConfig | Mapping[str, Any],
    eval_splits: Sequence[str],
) -> dict[str, str]:
    """Classes -> base/target.

    Explicit lists (`cfg.target`, optionally `cfg.base`) win; otherwise `cfg.target_ratio` of
    the classes that have entities in every evaluation split become target, drawn with
    `cfg.seed` (a target class absent from evaluation could never be measured).
    `class_counts[class][split]` = entities per split before any withholding.
    """
    cfg = coerce(RolesConfig, cfg, "data.roles")
    names = list(class_names)
    target = list(cfg.target)
    base = list(cfg.base)
    unknown = sorted(set(target + base) - set(names))
    if unknown:
        raise ConfigError(f"params data.roles: unknown class(es) {unknown}; the source's classes are {names}")
    overlap = sorted(set(target) & set(base))
    if overlap:
        raise ConfigError(f"params data.roles: class(es) {overlap} are listed as both base and target")
    if not target:
        ratio = float(cfg.target_ratio)
        if not 0.0 < ratio < 1.0:
            raise ConfigError("params data.roles: give a `target` class list or a `target_ratio` in (0, 1)")
        present = [n for n in names if sum(class_counts.get(n, {}).values()) > 0]
        eligible = [n for n in present if n not in base and all(class_counts[n].get(s, 0) > 0 for s in eval_splits)]
        n_target = max(1, int(round(ratio * len(present))))
        if len(eligible) < n_target:
            raise DataError(
                f"only {len(eligible)} class(es) have entities in every evaluation split {list(eval_splits)}: "
                f"{eligible}; cannot draw {n_target} target classes (target_ratio={ratio})"
            )
        rng = np.random.default_rng(cfg.seed)
        target = sorted(eligible[i] for i in rng.choice(len(eligible), size=n_target, replace=False))
    roles = {n: ("target" if n in target else "base") for n in names}
    if base:  # an explicit base list: classes in neither list are not used at all
        roles = {n: r for n, r in roles.items() if n in base or n in target}
    return roles


def build_manifest(
    records: Iterable[ImageRecord],
    class_names: Sequence[str],
    split_cfg: SplitConfig | Mapping[str, Any],
    role_cfg: RolesConfig | Mapping[str, Any],
    eval_splits: Sequence[str] = ("val", "test"),
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """Rows + class table + a report of what was withheld.

    Target-class entities inside *train* images are withheld from the manifest (train must
    never show a target class) and reported with counts and ids; the train image keeps its
    base entities. A train image left with no entity leaves the manifest and is reported too.
    Entities of classes outside an explicit base+target list are reported as `unused`.
    """
    records = list(records)
    group_sizes: dict[str, int] = {}
    for rec in records:
        group_sizes[rec.group_id] = group_sizes.get(rec.group_id, 0) + 1
    if not group_sizes:
        raise DataError("the source produced no usable image (all were quarantined or had no entity)")
    split_cfg = coerce(SplitConfig, split_cfg, "data.split")
    split_of_group = assign_splits(group_sizes, split_ratios(split_cfg), split_cfg.seed)

    class_counts: dict[str, dict[str, int]] = {n: {} for n in class_names}
    for rec in records:
        split = split_of_group[rec.group_id]
        for ent in rec.entities:
            class_counts[ent.class_name][split] = class_counts[ent.class_name].get(split, 0) + 1
    roles = assign_roles(class_names, class_counts, role_cfg, eval_splits)

    rows: list[dict[str, Any]] = []
    withheld: list[dict[str, str]] = []
    unused: list[str] = []
    emptied_images: list[str] = []
    for rec in records:
        split = split_of_group[rec.group_id]
        kept = 0
        for ent in rec.entities:
            role = roles.get(ent.class_name)
            if role is None:
                unused.append(ent.entity_id)
                continue
            if split == "train" and role == "target":
                withheld.append({"entity_id": ent.entity_id, "image_id": rec.image_id, "class_name": ent.class_name})
                continue
            x, y, w, h = ent.bbox
            rows.append(
                {
                    "image_id": rec.image_id,
                    "image_uri": rec.image_uri,
                    "width": rec.width,
                    "height": rec.height,
                    "entity_id": ent.entity_id,
                    "class_name": ent.class_name,
                    "rle_counts": ent.rle_counts,
                    "bbox_x": x,
                    "bbox_y": y,
                    "bbox_w": w,
                    "bbox_h": h,
                    "area": ent.area,
                    "split": split,
                    "role": role,
                    "group_id": rec.group_id,
                }
            )
            kept += 1
        if kept == 0 and rec.entities:
            emptied_images.append(rec.image_id)
    df = _typed(pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)))

    ordered = [n for n in class_names if n in roles]
    class_table = {
        "classes": [{"name": n, "id": i, "role": roles[n]} for i, n in enumerate(ordered)],
        "base": [n for n in ordered if roles[n] == "base"],
        "target": [n for n in ordered if roles[n] == "target"],
    }
    by_class: dict[str, int] = {}
    for w in withheld:
        by_class[w["class_name"]] = by_class.get(w["class_name"], 0) + 1
    report = {
        "withheld_target_in_train": {
            "count": len(withheld),
            "by_class": dict(sorted(by_class.items())),
            "entities": withheld,
        },
        "train_images_left_without_entities": {"count": len(emptied_images), "image_ids": emptied_images},
        "unused_class_entities": {"count": len(unused), "entity_ids": unused},
        "classes_without_entities": [n for n in ordered if sum(class_counts[n].values()) == 0],
        "entities_per_class_split": {n: dict(sorted(class_counts[n].items())) for n in ordered},
    }
    return df, class_table, report
