"""Pipeline step `validate`: check the manifest against the pandera schema and the class table.

    python -m components.validate [--params params.yaml] [--manifest data/ingest] [--out data/validate]

Writes `report.json` (every broken rule with its rows) under `--out`, and exits 2 with one
line naming the broken rules when the manifest breaks any.
"""

from __future__ import annotations

import sys
from pathlib import Path

from components.cli import stage_main
from cpcsam.errors import DataError

REPORT = "report.json"


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", default="data/ingest", help="folder with manifest.parquet + classes.json")
    parser.add_argument("--out", default="data/validate")


def work(params, args, run) -> str:
    from cpcsam.data import load_classes, load_manifest
    from cpcsam.data.ingest import CLASSES, MANIFEST
    from cpcsam.data.schema import failure_message, validate_manifest
    from cpcsam.files import write_json_atomic

    src, out = Path(args.manifest), Path(args.out)
    report = validate_manifest(load_manifest(src / MANIFEST), load_classes(src / CLASSES), params.data.eval_splits)
    report["manifest"] = str(src / MANIFEST)
    write_json_atomic(out / REPORT, report)
    run.log_metrics({"valid": float(report["valid"]), "broken_rules": len(report["failures"]), "n_rows": report["n_rows"]})
    run.log_dict(report, "validate/report.json")
    if not report["valid"]:
        raise DataError(f"{src / MANIFEST}: {failure_message(report)} (details in {out / REPORT})")
    return f"validate: {report['n_rows']} rows pass {len(report['rules'])} rules -> {out / REPORT}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("validate", __doc__, add_arguments, work, argv)


if __name__ == "__main__":
    sys.exit(main())
