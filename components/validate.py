"""Pipeline step `validate`: check the manifest against the pandera schema and the class table.

    python -m components.validate [--params params.yaml] [--manifest data/ingest] [--out data/validate]

Writes `report.json` (every broken rule with its rows) under `--out`, and exits 2 with one
line naming the broken rules when the manifest breaks any.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from components.cli import configure_logging, stage_parser
from cpcsam.config import load_params, section
from cpcsam.data import load_classes, load_manifest
from cpcsam.data.ingest import CLASSES, MANIFEST
from cpcsam.data.schema import failure_message, validate_manifest
from cpcsam.errors import CpcSamError, DataError

log = logging.getLogger("components.validate")

REPORT = "report.json"


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("validate", __doc__)
    parser.add_argument("--manifest", default="data/ingest", help="folder with manifest.parquet + classes.json")
    parser.add_argument("--out", default="data/validate")
    args = parser.parse_args(argv)
    configure_logging()
    out = Path(args.out)
    try:
        params = load_params(args.params, args.overrides)
        eval_splits = section(params, "data").get("eval_splits", ["val", "test"])
        src = Path(args.manifest)
        df = load_manifest(src / MANIFEST)
        classes = load_classes(src / CLASSES)
        report = validate_manifest(df, classes, eval_splits)
        report["manifest"] = str(src / MANIFEST)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        from components.tracking import stage_run

        with stage_run("validate", params) as run:
            run.log_metrics({"valid": float(report["valid"]), "broken_rules": len(report["failures"]),
                             "n_rows": report["n_rows"]})
            run.log_dict(report, "validate/report.json")
        if not report["valid"]:
            raise DataError(f"{src / MANIFEST}: {failure_message(report)} (details in {out / REPORT})")
    except CpcSamError as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    print(f"validate: {report['n_rows']} rows pass {len(report['rules'])} rules -> {out / REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
