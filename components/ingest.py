"""Pipeline step `ingest`: the selected data profile -> manifest, class table, quarantine report.

    python -m components.ingest [--params params.yaml] [--out data/ingest] [-S data.profile=tiny ...]

Reads the `data` section of params.yaml; writes `manifest.parquet`, `classes.json`,
`quarantine.json`, `summary.json` and (synthetic source) `images/` under `--out`. Exits 2 with
one line on stderr when the input is unusable (quarantined fraction over the limit, an empty
split or target class, a bad config).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from components.cli import stage_main
from cpcsam.data.ingest import MANIFEST, QUARANTINE, SUMMARY, run_ingest
from cpcsam.errors import CpcSamError


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
        **({"seconds": summary["seconds"]} if "seconds" in summary else {}),
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


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")


def work(params, args, run) -> str:
    out = Path(args.out)
    try:
        summary = run_ingest(params.data, out)
    except CpcSamError:
        if (out / SUMMARY).exists():  # the failed ingestion's reports still go to MLflow
            _log_summary(run, json.loads((out / SUMMARY).read_text()), out)
        raise
    _log_summary(run, summary, out)
    q = summary["quarantine"]
    return (
        f"ingest: profile {summary['profile']}: {summary['n_images']} images, {summary['n_entities']} entities "
        f"(train/val/test images {'/'.join(str(summary['splits'][s]['images']) for s in ('train', 'val', 'test'))}); "
        f"quarantined {q['n_items']} item(s) ({q['fraction']:.1%}) {q['counts_by_reason'] or ''}; "
        f"{summary['withheld_target_in_train']['count']} target-class entities withheld from train; -> {out}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("ingest", __doc__, add_arguments, work, argv)


if __name__ == "__main__":
    sys.exit(main())
