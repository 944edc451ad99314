"""Pipeline step `ingest`: the selected data profile -> manifest, class table, quarantine report.

    python -m components.ingest [--params params.yaml] [--out data/ingest] [-S data.profile=tiny ...]

Reads the `data` section of params.yaml; writes `manifest.parquet`, `classes.json`,
`quarantine.json`, `summary.json` and (synthetic source) `images/` under `--out`. Exits 2 with
one line on stderr when the input is unusable (quarantined fraction over the limit, an empty
split or target class, a bad config).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cpcsam.config import load_params, section
from cpcsam.data.ingest import MANIFEST, QUARANTINE, SUMMARY, run_ingest
from cpcsam.errors import CpcSamError

log = logging.getLogger("components.ingest")

DEFAULT_OUT = "data/ingest"


def _log_summary(run, summary: dict, out: Path) -> None:
    """Ingestion summary to MLflow: counts as metrics, reports as artifacts, profile as tag."""
    metrics = {
        "n_images": summary["n_images"],
        "n_entities": summary["n_entities"],
        "n_groups": summary["n_groups"],
        "quarantine_fraction": summary["quarantine"]["fraction"],
        "quarantined_items": summary["quarantine"]["n_items"],
        "withheld_target_in_train": summary["withheld_target_in_train"]["count"],
        "seconds": summary["seconds"],
    }
    for split, counts in summary["splits"].items():
        metrics[f"{split}_images"] = counts["images"]
        metrics[f"{split}_entities"] = counts["entities"]
    for reason, n in summary["quarantine"]["counts_by_reason"].items():
        metrics[f"quarantine_{reason}"] = n
    run.log_metrics(metrics)
    run.set_tags({"data.profile": summary["profile"], "data.source": summary["source"],
                  "data.target_classes": ",".join(summary["target"])})
    run.log_dict(summary, "ingest/summary.json")
    if (out / QUARANTINE).exists():
        run.log_artifact(str(out / QUARANTINE), "ingest")
    if (out / MANIFEST).exists():
        from cpcsam.data import load_manifest

        run.log_dataset(load_manifest(out / MANIFEST), name=f"manifest-{summary['profile']}",
                        source=str((out / MANIFEST).resolve()), context="ingest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S data.profile=tiny (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        params = load_params(args.params, args.overrides)
        data_cfg = section(params, "data")
        from components.tracking import stage_run

        with stage_run("ingest", params) as run:
            try:
                summary = run_ingest(data_cfg, out)
            except CpcSamError:
                if (out / SUMMARY).exists():  # the failed ingestion's reports still go to MLflow
                    _log_summary(run, json.loads((out / SUMMARY).read_text()), out)
                raise
            _log_summary(run, summary, out)
    except CpcSamError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    q = summary["quarantine"]
    print(
        f"ingest: profile {summary['profile']}: {summary['n_images']} images, {summary['n_entities']} entities "
        f"(train/val/test images {'/'.join(str(summary['splits'][s]['images']) for s in ('train', 'val', 'test'))}); "
        f"quarantined {q['n_items']} item(s) ({q['fraction']:.1%}) {q['counts_by_reason'] or ''}; "
        f"{summary['withheld_target_in_train']['count']} target-class entities withheld from train; -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
