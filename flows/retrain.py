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

Failures, and what each leaves (tests/orchestration/test_retrain_reliability.py):
- S3 unreachable, timing out, 5xx or throttling while a batch is read: `cpcsam.data.storage`
  retries (bounded, backoff) and then raises `StorageUnavailable`; the tick fails naming the
  object and the endpoint. Nothing is quarantined for it (only a 404 is `missing_image`), the
  dataset is not touched (a batch's images are staged and moved in only once all were read) and
  the batch is not marked seen: the next tick reads it again.
- Seen marks are per batch and saved right after that batch is merged: a batch is seen
  exactly when it is in the dataset. A merged batch that still needs `dvc add`/`push` leaves
  `pending_version` in the state, so a failed push is redone by the next tick even when
  nothing new arrived.
- Two ticks at once (the schedule firing during a manual run): the part that reads and writes
  the state and the dataset holds an exclusive lock (`pick_up_new_data`); a training claim in
  the state keeps a second tick from training a version that is being trained.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cpcsam.config import Params, load_config
from cpcsam.data import storage
from cpcsam.data.records import ImageRecord, Quarantine
from cpcsam.data.sources.coco import CocoSource
from cpcsam.errors import DataError
from cpcsam.files import LockBusy, exclusive_lock, write_json_atomic
from flows import s3_watch, stages
from flows.train import project_root
from operations import registry as register
from operations import preflight

ANNOTATIONS = "annotations.json"
IMAGES = "images"
LOG = logging.getLogger("cpcsam.retrain")


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
    Every image is read into a staging folder beside the dataset first: when a read fails (an S3
    outage raises `storage.StorageUnavailable`), the dataset is left exactly as it was.
    """
    ann_path = dataset / ANNOTATIONS
    coco = json.loads(ann_path.read_text()) if ann_path.is_file() else {"images": [], "annotations": [], "categories": []}
    cat_ids = {c["name"]: c["id"] for c in coco["categories"]}
    by_file = {img["file_name"]: img for img in coco["images"]}
    next_image = max((img["id"] for img in coco["images"]), default=0) + 1
    next_ann = max((a["id"] for a in coco["annotations"]), default=0) + 1
    added = 0
    dataset.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset.name}.staging-", dir=dataset.parent))
    try:
        staged: list[tuple[ImageRecord, str, Path]] = []
        for rec in records:  # all reads first: nothing in the dataset changes until they all succeeded
            rel = storage.relative_to(images_root, rec.image_uri)
            file_name = str(PurePosixPath(batch) / rel) if batch else rel
            tmp = staging / str(len(staged))
            tmp.write_bytes(storage.read_bytes(rec.image_uri))
            staged.append((rec, file_name, tmp))
        for rec, file_name, tmp in staged:
            target = dataset / IMAGES / file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


def ingest_batch(root: str, dataset_rel: str, bucket: str, batch_prefix: str, batch: str,
                 group_pattern: str | None, max_pixels: int | None, log: Any = LOG) -> dict[str, Any]:
    """Read, validate and merge one batch; its report. Raises (nothing merged) on an S3 outage."""
    records, quarantine, _ = read_batch(bucket, batch_prefix, group_pattern, max_pixels)
    images_root = f"s3://{bucket}/{batch_prefix.rstrip('/')}/{IMAGES}"
    counts = merge_batch(Path(root) / dataset_rel, batch, images_root, records, quarantine)
    for item in quarantine.items:
        log.warning("quarantined %s: %s (%s)", item.file, item.reason, item.detail)
    log.info("batch %s: %d good images, %d quarantined items", batch or "(root)", counts["images_accepted"],
             counts["quarantined"])
    return {"batch": batch, **counts, "reasons": quarantine.counts()}


def version_data(root: str, dataset_rel: str, push: bool, log: Any = LOG) -> str:
    """`dvc add` the dataset (and `dvc push` it): its DVC md5. Raises `StageFailed` when dvc fails."""
    base = Path(root)
    stages.run_dvc(base, ["add", dataset_rel])
    if push:
        stages.push(base, [f"{dataset_rel}.dvc"])
    version = dvc_data_version(base, dataset_rel)
    log.info("dataset %s is DVC version %s%s", dataset_rel, version, " (pushed)" if push else "")
    return str(version)


# --------------------------------------------------------------------------- one tick, without Prefect


def state_path_of(root: Path, dataset: str) -> Path:
    return root / f"{dataset}.state.json"


def lock_path_of(root: Path, dataset: str) -> Path:
    return root / f"{dataset}.tick.lock"


def _holder_text(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


def pick_up_new_data(
    root: Path,
    bucket: str,
    prefix: str,
    dataset: str,
    group_pattern: str | None,
    max_pixels: int | None,
    push: bool,
    *,
    lock_wait_s: float = 900.0,
    ingest: Callable[..., dict[str, Any]] = ingest_batch,
    version: Callable[..., str] = version_data,
    commit: Callable[[list[str], str], None] | None = None,
    log: Any = LOG,
) -> dict[str, Any]:
    """The data half of a tick (steps 2-4): new batches into the dataset, seen marks, DVC version.

    The flow runs it with its Prefect tasks as `ingest`/`version`/`commit`; the tests run it
    with the plain functions. Under an exclusive lock on `<dataset>.tick.lock`: another tick
    waits up to `lock_wait_s`, then skips (returns {"skipped": ...}, with a log line naming the
    holder) instead of reading the same state and ingesting the same batches.

    Why a local `flock` and not a lock object in S3 (`put_object(IfNoneMatch='*')`, which
    moto_server 5.2 does honour): what is guarded is local (the dataset folder and the state
    file beside it, both on this host's disk), so the lock belongs where they are. The kernel
    drops an flock when its process dies, so a killed tick can never leave a stale lock, while
    an S3 lock would need a lease, a clock and a delete that an outage (the very fault this
    guards against) can prevent. And S3 down must not make the lock itself unavailable.

    Every batch is marked seen, and the state saved, right after it was merged; an error (an S3
    outage, a bad annotation file) ends the tick with the batches before it kept and the rest
    unseen. The DVC step runs when `pending_version` says merged data is not versioned/pushed
    yet, so a failed `dvc push` is retried by the next tick even with nothing new.
    """
    summary: dict[str, Any] = {"bucket": bucket, "prefix": prefix, "listed": 0, "new_objects": 0, "batches": [],
                               "data_version": None, "skipped": None}
    lock = lock_path_of(root, dataset)
    try:
        with exclusive_lock(lock, lock_wait_s, what=f"retrain tick on s3://{bucket}/{prefix}",
                            on_wait=lambda h: log.info("another retrain tick holds %s (%s): waiting up to %.0f s",
                                                       lock, _holder_text(h), lock_wait_s)):
            return _pick_up_locked(root, bucket, prefix, dataset, group_pattern, max_pixels, push, ingest, version,
                                   commit, log, summary)
    except LockBusy as exc:
        log.warning("another retrain tick is still running (%s): skipping this tick; nothing read, nothing marked",
                    _holder_text(exc.holder))
        summary["skipped"] = f"locked: {exc}"
        return summary


def _pick_up_locked(root, bucket, prefix, dataset, group_pattern, max_pixels, push, ingest, version, commit, log,
                    summary) -> dict[str, Any]:
    state_path = state_path_of(root, dataset)
    state = s3_watch.SeenState.load(state_path)
    listed = s3_watch.list_objects(s3_watch.s3_client(), bucket, prefix)
    new = state.new(listed)
    summary.update(listed=len(listed), new_objects=len(new), data_version=state.extra.get("data_version"))
    all_by_batch = s3_watch.batches_of(listed, prefix)
    for batch, objs in s3_watch.batches_of(new, prefix).items():
        batch_prefix = f"{prefix.rstrip('/')}/{batch}" if batch else prefix.rstrip("/")
        keys = {o.key for o in all_by_batch[batch]}
        if f"{batch_prefix}/{ANNOTATIONS}" not in keys:
            log.info("batch %s: no %s yet (upload in progress?), waiting", batch, ANNOTATIONS)
            summary["batches"].append({"batch": batch, "waiting": True})
            continue
        report = ingest(str(root), dataset, bucket, batch_prefix, batch, group_pattern, max_pixels)
        summary["batches"].append(report)
        # merged: only now is the batch seen (as listed: an object changed since is new next tick)
        state.mark(all_by_batch[batch])
        if report.get("images_accepted"):
            state.extra["pending_version"] = True
        state.save(state_path)  # seen keys are remembered even when every sample was quarantined
    if state.extra.get("pending_version"):
        summary["data_version"] = version(str(root), dataset, push)
        state.extra["data_version"] = summary["data_version"]
        state.extra.pop("pending_version", None)
        state.save(state_path)
        if commit is not None:
            commit([f"{dataset}.dvc", str(Path(dataset).parent / ".gitignore"), f"{dataset}.state.json"],
                   f"retrain: dataset {dataset} at DVC version {summary['data_version']}")
    return summary


def train_if_needed(
    root: Path,
    dataset: str,
    trigger: Callable[[str], Any],
    *,
    claim_s: float,
    lock_wait_s: float = 900.0,
    log: Any = LOG,
) -> tuple[dict[str, Any], Any]:
    """Steps 5: train the current data version unless it is trained or being trained: (summary, flow run).

    `trigger(version)` starts the training and returns its finished Prefect flow run (the flow:
    `run_deployment`; tests: a stub). The decision and a claim (`training` in the state: version,
    holder, expiry after `claim_s`) are made under the tick lock, so a second tick meanwhile
    does not train the same version again; an expired claim (a killed tick) is taken over. The
    result is written back under the lock into the state as it is *then* (another tick may have
    ingested meanwhile: a stale copy saved here would forget its seen marks).
    """
    state_path = state_path_of(root, dataset)
    lock = lock_path_of(root, dataset)
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"triggered": False, "train_flow_run_id": None, "outcome": None}
    try:
        with exclusive_lock(lock, lock_wait_s, what="retrain: deciding on training"):
            state = s3_watch.SeenState.load(state_path)
            version = state.extra.get("data_version")
            if not version or state.extra.get("trained_data_version") == version:
                log.info("nothing to do: %s", "no data yet" if not version else f"data version {version} already trained")
                return out, None
            claim = state.extra.get("training") or {}
            if claim.get("data_version") == version and float(claim.get("expires_at", 0)) > time.time():
                log.info("data version %s is being trained by another tick (%s since %s): not training it twice",
                         version, claim.get("holder"), claim.get("since"))
                out["training_elsewhere"] = claim
                return out, None
            state.extra["training"] = {"data_version": version, "holder": me, "expires_at": time.time() + claim_s,
                                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            state.save(state_path)
    except LockBusy as exc:
        log.warning("another retrain tick holds the lock (%s): not triggering training this tick",
                    _holder_text(exc.holder))
        out["skipped"] = f"locked: {exc}"
        return out, None

    flow_run = None
    try:
        flow_run = trigger(version)
    finally:
        completed = bool(flow_run is not None and flow_run.state and flow_run.state.is_completed())
        with exclusive_lock(lock, max(lock_wait_s, 60.0), what="retrain: recording training"):
            state = s3_watch.SeenState.load(state_path)  # as it is now, not as read before training
            if (state.extra.get("training") or {}).get("holder") == me:
                state.extra.pop("training")
            # a version trained later by another tick stays the record when it is the current one
            if completed and state.extra.get("trained_data_version") != state.extra.get("data_version"):
                state.extra["trained_data_version"] = version
            state.save(state_path)
    out.update(triggered=True, data_version=version, train_flow_run_id=str(flow_run.id),
               train_state=flow_run.state.type.value if flow_run.state else None)
    return out, flow_run


# --------------------------------------------------------------------------- tasks


@task(name="preflight", cache_policy=NO_CACHE, persist_result=False)
def preflight_task(params: Params, s3: list[tuple[str | None, str | None]]) -> list[str]:
    done = preflight.preflight(params, s3_endpoints=s3)
    get_run_logger().info("preflight ok: %s", "; ".join(done))
    return done


@task(name="ingest-batch", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def ingest_batch_task(root: str, dataset_rel: str, bucket: str, batch_prefix: str, batch: str,
                      group_pattern: str | None, max_pixels: int | None) -> dict[str, Any]:
    return ingest_batch(root, dataset_rel, bucket, batch_prefix, batch, group_pattern, max_pixels, get_run_logger())


@task(name="dvc-version-data", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def version_data_task(root: str, dataset_rel: str, push: bool) -> str:
    return version_data(root, dataset_rel, push, get_run_logger())


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
    lock_wait_s: float = 900,
) -> dict[str, Any]:
    """Pick up new data under s3://bucket/prefix, version it, retrain and report the gate's verdict.

    `lock_wait_s`: how long to wait for another tick working on the same dataset, after which
    this tick skips (and says so) instead of racing it.
    """
    logger = get_run_logger()
    root = project_root()
    params = load_config(root / "params.yaml")
    watch_endpoint = storage.endpoint_url()
    checks: list[tuple[str | None, str | None]] = [(watch_endpoint, bucket)]
    if push:
        name, endpoint, remote_bucket = stages.remote_endpoint(root)
        if name is None:
            raise DataError(f"{root / '.dvc/config'}: push requested but no default DVC remote (core.remote)")
        checks.append((endpoint, remote_bucket))
    preflight_task(params, checks)

    commit = (lambda paths, message: git_commit_task(str(root), paths, message)) if git_commit else None
    summary = pick_up_new_data(root, bucket, prefix, dataset, group_pattern, params.data.max_pixels, push,
                               lock_wait_s=lock_wait_s, ingest=ingest_batch_task, version=version_data_task,
                               commit=commit, log=logger)
    summary.update(triggered=False, train_flow_run_id=None, outcome=None)
    if summary["skipped"]:
        return summary

    from prefect.deployments import run_deployment

    def trigger(version: str):
        # absolute: the train flow runs in its own worktree, where the dataset folder does not exist
        overrides = [profile_override(str(root / dataset), group_pattern, version, profile_extra), *train_overrides]
        logger.info("triggering %s on data version %s", deployment, version)
        return run_deployment(name=deployment, parameters={"profile": "oceancoco", "overrides": overrides},
                              timeout=wait_timeout_s)

    training, flow_run = train_if_needed(root, dataset, trigger, claim_s=wait_timeout_s + 600,
                                         lock_wait_s=lock_wait_s, log=logger)
    summary.update(training)
    if flow_run is None:
        return summary
    if not (flow_run.state and flow_run.state.is_completed()):
        raise RuntimeError(f"{deployment} flow run {flow_run.id} ended {flow_run.state}: data version "
                           f"{training['data_version']} stays untrained and the next tick retries it")
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
