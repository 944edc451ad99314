"""Prefect flow `retrain`: new deep-sea data in S3 → validated, versioned, trained, gated.

One tick (the deployment runs it on a cron schedule, see infra/prefect.yaml):
1. preflight: the watched S3 endpoint + bucket, the DVC remote and the tracking store answer;
2. list `s3://<bucket>/<prefix>` and keep the objects whose (key, ETag) was not seen before
   (`flows.s3_watch`; S3 times are whole seconds, so no time watermark);
3. each batch (first folder under the prefix: a COCO layout, `annotations.json` + `images/`)
   with new objects is read by the data layer's own COCO source (`cpcsam.data`), which
   validates every image and annotation and quarantines what is bad; only the good samples
   are copied into the local dataset (`datasets/deepsea/`, one merged COCO file) and the
   quarantine report is kept beside them (`quarantine/<batch>.json`). A batch without its
   annotation file yet (upload in progress) waits for the next tick;
4. `dvc add` the dataset and `dvc push` it to the remote: the data version is the DVC md5;
5. `run_deployment("train/oceancoco")` with the `oceancoco` profile pointed at the dataset
   (the data version is a param, so DVC re-runs ingest exactly when the data changed);
6. report promotion or rejection (read from MLflow: the pipeline run of that flow run).
A tick with no new objects and the current data version already trained does nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cpcsam.config import Params, load_config
from cpcsam.data import storage
from cpcsam.data.records import ImageRecord, Quarantine
from cpcsam.data.sources.coco import CocoSource
from cpcsam.errors import DataError
from cpcsam.files import write_json_atomic
from flows import s3_watch, stages
from flows.train import project_root
from operations import registry as register
from operations import preflight

ANNOTATIONS = "annotations.json"
IMAGES = "images"


# --------------------------------------------------------------------------- dataset (no Prefect)


def read_batch(bucket: str, batch_prefix: str, group_pattern: str | None, max_pixels: int | None) -> tuple[list[ImageRecord], Quarantine, list[str]]:
    """Validate one uploaded batch with the data layer's COCO source: (good records, quarantine, classes)."""
    cfg = {
        "source": "coco",
        "root": f"s3://{bucket}/{batch_prefix.rstrip('/')}",
        "annotations": ANNOTATIONS,
        "images_dir": IMAGES,
        "group_pattern": group_pattern,
        "progress": False,
    }
    source = CocoSource(cfg, max_pixels)
    quarantine = Quarantine()
    records = [r for r in source.records(quarantine) if r.entities]
    return records, quarantine, source.classes()


def merge_batch(dataset: Path, batch: str, images_root: str, records: list[ImageRecord], quarantine: Quarantine) -> dict[str, int]:
    """Copy a batch's good samples into the dataset's merged COCO file (idempotent per image file).

    Re-reading a batch (new images arrived) replaces its earlier entries, never duplicates them.
    """
    ann_path = dataset / ANNOTATIONS
    coco = json.loads(ann_path.read_text()) if ann_path.is_file() else {"images": [], "annotations": [], "categories": []}
    cat_ids = {c["name"]: c["id"] for c in coco["categories"]}
    by_file = {img["file_name"]: img for img in coco["images"]}
    next_image = max((img["id"] for img in coco["images"]), default=0) + 1
    next_ann = max((a["id"] for a in coco["annotations"]), default=0) + 1
    added = 0
    for rec in records:
        rel = storage.relative_to(images_root, rec.image_uri)
        file_name = str(PurePosixPath(batch) / rel) if batch else rel
        target = dataset / IMAGES / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(rec.image_uri))
        if file_name in by_file:  # replace this image's earlier version and annotations
            image_id = by_file[file_name]["id"]
            coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != image_id]
        else:
            image_id, next_image = next_image, next_image + 1
            entry = {"id": image_id, "file_name": file_name, "width": rec.width, "height": rec.height}
            coco["images"].append(entry)
            by_file[file_name] = entry
            added += 1
        for ent in rec.entities:
            if ent.class_name not in cat_ids:
                cat_ids[ent.class_name] = max(cat_ids.values(), default=0) + 1
                coco["categories"].append({"id": cat_ids[ent.class_name], "name": ent.class_name})
            coco["annotations"].append({
                "id": next_ann,
                "image_id": image_id,
                "category_id": cat_ids[ent.class_name],
                "segmentation": {"size": [rec.height, rec.width], "counts": ent.rle_counts},
                "area": int(ent.area),
                "bbox": [float(v) for v in ent.bbox],
                "iscrowd": 0,
            })
            next_ann += 1
    dataset.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ann_path, coco)
    write_json_atomic(dataset / "quarantine" / f"{batch or '_root'}.json", quarantine.to_json())
    return {"images_accepted": len(records), "images_new": added, "quarantined": len(quarantine.items)}


def dvc_data_version(root: Path, dataset_rel: str) -> str | None:
    """The md5 DVC recorded for the dataset folder in `<dataset>.dvc`."""
    import yaml

    dvc_file = root / f"{dataset_rel}.dvc"
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    return str(outs[0].get("md5")) if outs else None


def profile_override(
    dataset_rel: str, group_pattern: str | None, data_version: str, extra: dict[str, Any] | None = None
) -> str:
    """`data.profiles.oceancoco=<coco source on the dataset>`; the version makes DVC re-ingest on change.

    `extra`: more keys of the profile (e.g. its own `split` / `roles`).
    """
    cfg = {
        **(extra or {}),
        "source": "coco",
        "root": dataset_rel,
        "annotations": ANNOTATIONS,
        "images_dir": IMAGES,
        "group_pattern": group_pattern,
        "data_version": data_version,
    }
    return "data.profiles.oceancoco=" + json.dumps(cfg, sort_keys=True)


# --------------------------------------------------------------------------- tasks


@task(name="preflight", cache_policy=NO_CACHE, persist_result=False)
def preflight_task(params: Params, s3: list[tuple[str | None, str | None]]) -> list[str]:
    done = preflight.preflight(params, s3_endpoints=s3)
    get_run_logger().info("preflight ok: %s", "; ".join(done))
    return done


@task(name="ingest-batch", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def ingest_batch_task(root: str, dataset_rel: str, bucket: str, batch_prefix: str, batch: str,
                      group_pattern: str | None, max_pixels: int | None) -> dict[str, Any]:
    logger = get_run_logger()
    records, quarantine, _ = read_batch(bucket, batch_prefix, group_pattern, max_pixels)
    images_root = f"s3://{bucket}/{batch_prefix.rstrip('/')}/{IMAGES}"
    counts = merge_batch(Path(root) / dataset_rel, batch, images_root, records, quarantine)
    for item in quarantine.items:
        logger.warning("quarantined %s: %s (%s)", item.file, item.reason, item.detail)
    logger.info("batch %s: %d good images, %d quarantined items", batch or "(root)", counts["images_accepted"],
                counts["quarantined"])
    return {"batch": batch, **counts, "reasons": quarantine.counts()}


@task(name="dvc-version-data", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def version_data_task(root: str, dataset_rel: str, push: bool) -> str:
    base = Path(root)
    stages.run_dvc(base, ["add", dataset_rel])
    if push:
        stages.push(base, [f"{dataset_rel}.dvc"])
    version = dvc_data_version(base, dataset_rel)
    get_run_logger().info("dataset %s is DVC version %s%s", dataset_rel, version, " (pushed)" if push else "")
    return str(version)


@task(name="git-commit-data-version", cache_policy=NO_CACHE, persist_result=False)
def git_commit_task(root: str, paths: list[str], message: str) -> None:
    import subprocess

    subprocess.run(["git", "add", "--", *paths], cwd=root, check=True)
    subprocess.run(["git", "commit", "-m", message, "--", *paths], cwd=root, check=True, capture_output=True)


# --------------------------------------------------------------------------- the flow


@flow(name="retrain", persist_result=False, log_prints=True)
def retrain(
    bucket: str = "cpcsam-incoming",
    prefix: str = "deepsea/",
    dataset: str = "datasets/deepsea",
    group_pattern: str | None = r"^(.+?)_frame",
    deployment: str = "train/oceancoco",
    train_overrides: list[str] = [],  # noqa: B006
    profile_extra: dict[str, Any] = {},  # noqa: B006
    push: bool = True,
    git_commit: bool = False,
    wait_timeout_s: float = 7200,
) -> dict[str, Any]:
    """Pick up new data under s3://bucket/prefix, version it, retrain and report the gate's verdict."""
    logger = get_run_logger()
    root = project_root()
    params = load_config(root / "params.yaml")
    max_pixels = params.data.max_pixels
    watch_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    checks: list[tuple[str | None, str | None]] = [(watch_endpoint, bucket)]
    if push:
        name, endpoint, remote_bucket = stages.remote_endpoint(root)
        if name is None:
            raise DataError(f"{root / '.dvc/config'}: push requested but no default DVC remote (core.remote)")
        checks.append((endpoint, remote_bucket))
    preflight_task(params, checks)

    state_path = root / f"{dataset}.state.json"
    state = s3_watch.SeenState.load(state_path)
    client = s3_watch.s3_client()
    listed = s3_watch.list_objects(client, bucket, prefix)
    new = state.new(listed)
    summary: dict[str, Any] = {"bucket": bucket, "prefix": prefix, "listed": len(listed), "new_objects": len(new),
                               "batches": [], "data_version": state.extra.get("data_version"),
                               "triggered": False, "train_flow_run_id": None, "outcome": None}

    if new:
        all_by_batch = s3_watch.batches_of(listed, prefix)
        for batch, objs in s3_watch.batches_of(new, prefix).items():
            batch_prefix = f"{prefix.rstrip('/')}/{batch}" if batch else prefix.rstrip("/")
            keys = {o.key for o in all_by_batch[batch]}
            if f"{batch_prefix}/{ANNOTATIONS}" not in keys:
                logger.info("batch %s: no %s yet (upload in progress?), waiting", batch, ANNOTATIONS)
                summary["batches"].append({"batch": batch, "waiting": True})
                continue
            summary["batches"].append(
                ingest_batch_task(str(root), dataset, bucket, batch_prefix, batch, group_pattern, max_pixels)
            )
            state.mark(all_by_batch[batch])  # the whole batch as read now
        if any(b.get("images_accepted") for b in summary["batches"]):
            summary["data_version"] = version_data_task(str(root), dataset, push)
            state.extra["data_version"] = summary["data_version"]
        state.save(state_path)  # seen keys are remembered even when every sample was quarantined
        if git_commit and summary["data_version"]:
            git_commit_task(str(root), [f"{dataset}.dvc", str(Path(dataset).parent / ".gitignore"), f"{dataset}.state.json"],
                            f"retrain: dataset {dataset} at DVC version {summary['data_version']}")

    version = state.extra.get("data_version")
    if not version or state.extra.get("trained_data_version") == version:
        logger.info("nothing to do: %s", "no data yet" if not version else f"data version {version} already trained")
        return summary

    from prefect.deployments import run_deployment

    # absolute: the train flow runs in its own worktree, where the dataset folder does not exist
    overrides = [profile_override(str(root / dataset), group_pattern, version, profile_extra), *train_overrides]
    logger.info("triggering %s on data version %s", deployment, version)
    flow_run = run_deployment(name=deployment, parameters={"profile": "oceancoco", "overrides": overrides},
                              timeout=wait_timeout_s)
    summary.update(triggered=True, train_flow_run_id=str(flow_run.id), train_state=flow_run.state.type.value
                   if flow_run.state else None)
    if not (flow_run.state and flow_run.state.is_completed()):
        raise RuntimeError(f"{deployment} flow run {flow_run.id} ended {flow_run.state}: data version {version} "
                           "stays untrained and the next tick retries it")
    state.extra["trained_data_version"] = version
    state.save(state_path)
    outcome = register.outcome_of_flow_run(params, str(flow_run.id))
    summary["outcome"] = outcome
    if outcome and outcome.get("registration"):
        reg = outcome["registration"]
        verdict = "PROMOTED to champion" if reg["promoted"] else "REJECTED (champion unchanged)"
        print(f"retrain: {reg['model_name']} version {reg['version']} {verdict}")
    else:
        print("retrain: training finished without a gate result (no registration)")
    return summary


if __name__ == "__main__":
    print(json.dumps(retrain(), indent=2, default=str))
