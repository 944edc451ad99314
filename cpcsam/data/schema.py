"""The manifest's rules as a pandera schema, plus the class-table rules; one report for both.

`validate_manifest(df, classes, eval_splits)` checks everything lazily (all failures at once)
and returns a report whose failures name the rule, the rows (index + entity ids) and why.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import pandera.pandas as pa

from cpcsam.data.manifest import ROLES, SPLITS
from cpcsam.data.masks import parse_compressed_counts
from cpcsam.errors import DataError

MAX_IDS_IN_REPORT = 50


def _in_one_split(df: pd.DataFrame, key: str) -> pd.Series:
    return df.groupby(key)["split"].transform("nunique") == 1


def _rle_fits(df: pd.DataFrame) -> pd.Series:
    def ok(row) -> bool:
        try:
            runs = parse_compressed_counts(row.rle_counts)
        except DataError:
            return False
        return sum(runs) == row.width * row.height and all(r >= 0 for r in runs)

    return pd.Series([ok(r) for r in df.itertuples(index=False)], index=df.index, dtype=bool)


def manifest_schema(class_roles: dict[str, str] | None = None) -> pa.DataFrameSchema:
    """The row-level rules. With `class_roles` (from classes.json) classes and roles are checked too."""
    class_check = [pa.Check.isin(sorted(class_roles), error="class_name is not in classes.json")] if class_roles else []
    checks = [
        pa.Check(lambda df: (df.bbox_x + df.bbox_w <= df.width) & (df.bbox_y + df.bbox_h <= df.height),
                 name="bbox_inside_image", error="bbox_inside_image: the box reaches past the image's right/bottom edge"),
        pa.Check(lambda df: df.area <= df.bbox_w * df.bbox_h, name="area_within_bbox",
                 error="area_within_bbox: the mask has more pixels than its box"),
        pa.Check(lambda df: ~((df.split == "train") & (df.role == "target")), name="no_target_in_train",
                 error="no_target_in_train: a target-class entity is in the train split"),
        pa.Check(lambda df: _in_one_split(df, "image_id"), name="image_in_one_split",
                 error="image_in_one_split: the image has entities in more than one split"),
        pa.Check(lambda df: _in_one_split(df, "group_id"), name="group_in_one_split",
                 error="group_in_one_split: the group (near-duplicate frames) spans more than one split"),
        pa.Check(lambda df: df.groupby("class_name")["role"].transform("nunique") == 1, name="one_role_per_class",
                 error="one_role_per_class: the class is base in some rows and target in others"),
        pa.Check(_rle_fits, name="rle_matches_image_size",
                 error="rle_matches_image_size: the RLE is invalid or does not cover width*height pixels"),
    ]
    if class_roles:
        checks.append(pa.Check(lambda df: df.role == df.class_name.map(class_roles), name="role_matches_class_table",
                               error="role_matches_class_table: the row's role differs from classes.json"))
    nonempty = pa.Check.str_length(min_value=1, error="must be a non-empty string")
    return pa.DataFrameSchema(
        {
            "image_id": pa.Column(str, nonempty),
            "image_uri": pa.Column(str, nonempty),
            "width": pa.Column("int64", pa.Check.gt(0)),
            "height": pa.Column("int64", pa.Check.gt(0)),
            "entity_id": pa.Column(str, nonempty, unique=True),
            "class_name": pa.Column(str, [nonempty, *class_check]),
            "rle_counts": pa.Column(str, nonempty),
            "bbox_x": pa.Column("float64", pa.Check.ge(0)),
            "bbox_y": pa.Column("float64", pa.Check.ge(0)),
            "bbox_w": pa.Column("float64", pa.Check.gt(0)),
            "bbox_h": pa.Column("float64", pa.Check.gt(0)),
            "area": pa.Column("int64", pa.Check.gt(0)),
            "split": pa.Column(str, pa.Check.isin(list(SPLITS))),
            "role": pa.Column(str, pa.Check.isin(list(ROLES))),
            "group_id": pa.Column(str, nonempty),
        },
        checks=checks,
        strict=True,
        coerce=False,
    )


def _class_table_failures(df: pd.DataFrame, classes: dict[str, Any], eval_splits: Sequence[str]) -> list[dict]:
    failures = []
    base, target = list(classes.get("base", [])), list(classes.get("target", []))
    if not base:
        failures.append({"rule": "base_classes_nonempty", "message": "classes.json lists no base class"})
    if not target:
        failures.append({"rule": "target_classes_nonempty", "message": "classes.json lists no target class"})
    both = sorted(set(base) & set(target))
    if both:
        failures.append({"rule": "base_target_disjoint", "message": f"classes {both} are both base and target",
                         "classes": both})
    for split in eval_splits:
        present = set(df.loc[df.split == split, "class_name"])
        missing = [c for c in target if c not in present]
        if missing:
            failures.append({"rule": "target_in_evaluation_splits",
                             "message": f"target class(es) {missing} have no entity in evaluation split {split!r}",
                             "classes": missing, "split": split})
    return failures


def validate_manifest(df: pd.DataFrame, classes: dict[str, Any], eval_splits: Sequence[str] = ("val", "test")) -> dict:
    """All rules at once. Returns {"valid", "n_rows", "rules", "failures": [...]}; never raises on bad data."""
    class_roles = {c["name"]: c["role"] for c in classes.get("classes", [])}
    schema = manifest_schema(class_roles or None)
    failures: list[dict] = []
    try:
        schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases.copy()
        # a frame-wide check reports one case per (row, column): group those by check alone
        cases["column"] = cases["column"].where(cases["schema_context"] != "DataFrameSchema", "")
        for (context, column, check), group in cases.groupby(["schema_context", "column", "check"], dropna=False, sort=False):
            idx = sorted({int(i) for i in group["index"].dropna()})
            entry = {
                "rule": str(check).split(":")[0] if context == "DataFrameSchema" else f"{column}: {check}",
                "message": str(check) if context == "DataFrameSchema" else f"column {column!r} fails {check}",
                "count": len(idx) if idx else int(len(group)),
                "rows": idx[:MAX_IDS_IN_REPORT],
            }
            if idx and "entity_id" in df.columns:
                entry["entity_ids"] = [str(df.entity_id.iloc[i]) for i in idx[:MAX_IDS_IN_REPORT] if i < len(df)]
            if not idx:  # schema-level failures (missing column, dtype) carry no row index
                entry["failure_cases"] = [str(v) for v in group["failure_case"].head(MAX_IDS_IN_REPORT)]
                entry["message"] += f": {', '.join(entry['failure_cases'])}"
            failures.append(entry)
    failures.extend(_class_table_failures(df, classes, eval_splits) if "split" in df.columns else [])
    rules = [c.name for c in schema.checks] + [
        "base_classes_nonempty", "target_classes_nonempty", "base_target_disjoint", "target_in_evaluation_splits",
    ]
    return {"valid": not failures, "n_rows": int(len(df)), "rules": rules, "failures": failures}


def failure_message(report: dict) -> str:
    """One line naming every broken rule and a few of its rows."""
    parts = []
    for f in report["failures"]:
        ids = f.get("entity_ids") or []
        where = f" ({f['count']} rows, e.g. entity {', '.join(ids[:3])})" if ids else ""
        parts.append(f"{f['message']}{where}")
    return f"manifest breaks {len(report['failures'])} rule(s): " + "; ".join(parts)
