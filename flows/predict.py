"""Prefect flow `predict`: the registered champion over the dives in an S3 prefix.

    prefect deployment run predict/deepsea                      # on the stack (also scheduled, and
                                                                # triggered when a champion is promoted)
    python -m flows.predict --bucket cpcsam-incoming --prefix dives/   # same flow, no server needed

1. params (`data.profile=<profile>`), preflight of the tracking store and the S3 endpoint;
2. the model version behind `models:/cpcsam-<profile>@<alias>`; none yet → nothing to do;
3. its ONNX graphs downloaded once per version (`.cache/models/`);
4. one task per dive (first folder under `prefix`): new images (key + ETag) predicted and uploaded
   with the dive's merged COCO JSON (`operations.batch_inference` has the layout and the rules).
Returns a summary dict: the model version and one report per dive.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cpcsam.config import Params, load_config
from cpcsam.data import storage
from cpcsam.errors import ConfigError
from flows import s3_watch
from flows.train import absolute_tracking, project_root
from operations import batch_inference, preflight
from operations import registry as register
from operations import tracking

CACHE = ".cache/models"


@task(name="preflight", cache_policy=NO_CACHE, persist_result=False)
def preflight_task(params: Params, bucket: str) -> list[str]:
    return preflight.preflight(params, s3_endpoints=[(storage.endpoint_url(), bucket)])


@task(name="download-model", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def download_task(name: str, version: str, root: str, tracking_uri: str) -> str:
    return str(batch_inference.download_export(name, version, Path(root) / CACHE, tracking_uri))


@task(name="predict-dive", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=10)
def dive_task(bucket: str, prefix: str, dive: str, objects: list[dict[str, Any]], out: str, export_dir: str,
              support: str | None, classes: list[str] | None, device: str, overlays: bool) -> dict[str, Any]:
    client = s3_watch.s3_client()
    found = [s3_watch.S3Object(**o) for o in objects]
    report = batch_inference.process_dive(client, bucket, prefix, dive, found, out, Path(export_dir), support=support,
                                          classes=classes, device=device, overlays=overlays)
    logger = get_run_logger()
    if report.skipped_reason:
        logger.warning("dive %s skipped: %s", dive, report.skipped_reason)
    else:
        logger.info("dive %s: %d images, %d new, %d predicted, %d failed -> %s", dive, report.images, report.new,
                    report.processed, len(report.failed), report.output)
        for failure in report.failed:
            logger.warning("dive %s: %s: %s", dive, failure["image"], failure["error"])
    return report.as_dict()


@flow(name="predict", persist_result=False, log_prints=True)
def predict_dives(
    bucket: str = "cpcsam-incoming",
    prefix: str = "dives/",
    out_prefix: str = "predictions/",
    profile: str = "oceancoco",
    alias: str = "champion",
    support: str | None = None,
    classes: list[str] | None = None,
    device: str = "auto",
    overlays: bool = False,
) -> dict[str, Any]:
    """Run the `alias` version of `cpcsam-<profile>` over the new images of every dive under `prefix`.

    `support` + `classes`: automatic mode for dives without a `prompts.json` (a COCO support set
    on the worker's disk and the classes to find).
    """
    logger = get_run_logger()
    root = project_root()
    params = absolute_tracking(load_config(root / "params.yaml", [f"data.profile={profile}"]), root)
    preflight_task(params, bucket)
    name = register.model_name_for(params, profile)
    summary: dict[str, Any] = {"model": name, "alias": alias, "version": None, "dives": []}
    version = register.champion_version(tracking.make_client(uri=params.tracking.uri), name, alias)
    if version is None:
        logger.warning("no version of %s has the alias %r yet: nothing to predict with", name, alias)
        return summary
    summary["version"] = version
    export_dir = download_task(name, version, str(root), params.tracking.uri)
    out = batch_inference.version_prefix(out_prefix, name, version)
    objects = s3_watch.list_objects(s3_watch.s3_client(), bucket, prefix)
    for dive, found in s3_watch.batches_of(objects, prefix).items():
        if not dive:
            logger.warning("%d object(s) directly under s3://%s/%s belong to no dive folder: ignored", len(found),
                           bucket, prefix)
            continue
        summary["dives"].append(dive_task.with_options(name=f"predict-{dive}")(
            bucket, prefix, dive, s3_watch.as_dicts(found), out, export_dir, support, classes, device, overlays))
    new = sum(d["new"] for d in summary["dives"])
    print(f"predict: {name} v{version} over {len(summary['dives'])} dive(s), {new} new image(s) -> s3://{bucket}/{out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.predict", description="Run the predict flow once, locally.")
    parser.add_argument("--bucket", default="cpcsam-incoming")
    parser.add_argument("--prefix", default="dives/")
    parser.add_argument("--out-prefix", default="predictions/")
    parser.add_argument("--profile", default="oceancoco")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--support", help="COCO support set (automatic mode for dives without prompts.json)")
    parser.add_argument("--classes", nargs="*", help="classes to find in automatic mode")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        summary = predict_dives(bucket=args.bucket, prefix=args.prefix, out_prefix=args.out_prefix,
                                profile=args.profile, alias=args.alias, support=args.support, classes=args.classes,
                                device=args.device)
    except (ConfigError, preflight.PreflightError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
