"""Ingestion: a profile's source -> manifest + class table + quarantine report + summary.

`run_ingest(params.data, out_dir)` is what `components.ingest` calls. The raw data is only read;
the synthetic source is the one that writes files (its PNGs, under `out_dir/images`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from cpcsam.config import DataConfig, coerce
from cpcsam.data.manifest import SPLITS, build_manifest, split_ratios, write_manifest
from cpcsam.data.records import Quarantine
from cpcsam.data.sources import build_source
from cpcsam.errors import ConfigError, CpcSamError, DataError
from cpcsam.files import write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
CLASSES = "classes.json"
QUARANTINE = "quarantine.json"
SUMMARY = "summary.json"
IMAGES = "images"


def run_ingest(data_cfg: DataConfig | Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Ingest the selected profile into `out_dir`; returns the summary.

    The reports are written first, then DataError is raised (one message listing every
    problem) when the quarantined fraction is over `max_quarantine_fraction`, a split with a
    ratio > 0 is empty, or a target class has no entity in an evaluation split.

    Every other exit by a DataError/ConfigError (a bad profile, a source that cannot be
    opened, no usable image, the roles rule ...) writes `quarantine.json` (what was examined
    until then) and `summary.json` (`status: failed`, `failed_at`, the message in `problems`)
    before the error goes on, its message naming the reports' folder. Reports of an earlier
    run are removed first, so what is in `out_dir` always describes this run.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, CLASSES, QUARANTINE, SUMMARY):
        (out / stale).unlink(missing_ok=True)
    images_dir = out / IMAGES
    if images_dir.exists():  # stale generated images from an earlier run must not linger
        shutil.rmtree(images_dir)
    images_dir.mkdir()
    run = _Run("", start)
    try:
        data_cfg = coerce(DataConfig, data_cfg, "data")  # a ConfigError here still writes the reports
        run.profile = data_cfg.profile
        return _ingest(data_cfg, out, images_dir, run)
    except CpcSamError as exc:
        if run.reported:  # the checks' own failure: reports written, message complete
            raise
        message = f"{exc} (reports in {out})"
        try:
            _write_failure_reports(out, run, str(exc))
        except OSError as write_exc:  # pragma: no cover - an unwritable out dir
            message = f"{exc} (the reports could not be written to {out}: {write_exc})"
        raise (ConfigError(message) if isinstance(exc, ConfigError) else DataError(message)) from exc


class _Run:
    """What an ingestion run knows so far: enough to write its reports whenever it stops."""

    def __init__(self, profile: str, start: float) -> None:
        self.profile = profile
        self.source = ""
        self.start = start
        self.stage = "config"  # config -> source -> manifest -> checks
        self.quarantine = Quarantine()
        self.images_read = 0
        self.images_with_entities = 0
        self.max_fraction: float | None = None
        self.reported = False


def _ingest(data_cfg: DataConfig, out: Path, images_dir: Path, run: _Run) -> dict[str, Any]:
    name, source_cfg = data_cfg.profile, data_cfg.selected
    split_cfg, role_cfg = data_cfg.resolved_split(), data_cfg.resolved_roles()
    eval_splits = list(data_cfg.eval_splits)
    max_pixels = data_cfg.max_pixels
    max_fraction = data_cfg.max_quarantine_fraction
    run.max_fraction = max_fraction
    if source_cfg.progress is None:  # data.progress unless the profile says otherwise
        source_cfg = source_cfg.model_copy(update={"progress": data_cfg.progress})

    run.stage = "source"
    run.source = source_cfg.source
    source = build_source(source_cfg, images_dir, max_pixels)
    run.source = source.name
    log.info("ingest: profile %s, source %s, %d images", name, source.name, len(source))
    quarantine = run.quarantine
    records = []
    for rec in source.records(quarantine):  # counted as they come: a source may stop half-way
        records.append(rec)
        run.images_read += 1
        run.images_with_entities += bool(rec.entities)
    with_entities = [r for r in records if r.entities]
    run.stage = "manifest"
    df, class_table, withheld = build_manifest(with_entities, source.classes(), split_cfg, role_cfg, eval_splits)

    run.stage = "checks"
    write_manifest(df, out / MANIFEST)
    write_text_atomic(out / CLASSES, json.dumps(class_table, indent=2) + "\n")
    write_text_atomic(out / QUARANTINE, json.dumps(quarantine.to_json(), indent=2) + "\n")

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
        "status": "failed" if problems else "ok",
        "failed_at": "checks" if problems else None,
        "n_images": int(df.image_id.nunique()),
        "n_entities": int(len(df)),
        "n_groups": int(df.group_id.nunique()),
        "images_read": len(records),
        "images_without_entities": len(records) - len(with_entities),
        "splits": per_split,
        "n_classes": len(class_table["classes"]),
        "base": class_table["base"],
        "target": class_table["target"],
        "quarantine": _quarantine_summary(quarantine, max_fraction),
        **withheld,
        "problems": problems,
    }
    # No wall time in the file: data/ingest is a DVC out and must be byte-reproducible.
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    run.reported = True
    if problems:
        raise DataError(f"ingest of profile {name!r} failed: " + "; ".join(problems) + f" (reports in {out})")
    return {**summary, "seconds": round(time.perf_counter() - run.start, 3)}


def _quarantine_summary(quarantine: Quarantine, max_fraction: float | None) -> dict[str, Any]:
    return {
        "n_items": len(quarantine.items),
        "fraction": round(quarantine.fraction(), 6),
        "max_fraction": max_fraction,
        "counts_by_reason": quarantine.counts(),
        "n_notes": len(quarantine.notes),
        "notes_by_reason": quarantine.note_counts(),
    }


def _write_failure_reports(out: Path, run: _Run, problem: str) -> None:
    """quarantine.json + summary.json of a run stopped by an error (same keys as a full summary)."""
    write_text_atomic(out / QUARANTINE, json.dumps(run.quarantine.to_json(), indent=2) + "\n")
    summary = {
        "profile": run.profile,
        "source": run.source,
        "status": "failed",
        "failed_at": run.stage,
        "n_images": 0,  # nothing reached the manifest
        "n_entities": 0,
        "n_groups": 0,
        "images_read": run.images_read,
        "images_without_entities": run.images_read - run.images_with_entities,
        "splits": {s: {"images": 0, "entities": 0, "groups": 0} for s in SPLITS},
        "n_classes": 0,
        "base": [],
        "target": [],
        "quarantine": _quarantine_summary(run.quarantine, run.max_fraction),
        "withheld_target_in_train": {"count": 0, "by_class": {}, "entities": []},
        "train_images_left_without_entities": {"count": 0, "image_ids": []},
        "unused_class_entities": {"count": 0, "entity_ids": []},
        "classes_without_entities": [],
        "entities_per_class_split": {},
        "problems": [problem],
    }
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
