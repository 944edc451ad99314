"""Batch inference over dives in S3 with a registered model version (the `predict` flow's logic).

Layout, under the flow's parameters `bucket`, `prefix` and `out_prefix`:

    s3://<bucket>/<prefix><dive>/images/**.jpg       the new images (any suffix `cpcsam predict` reads)
    s3://<bucket>/<prefix><dive>/prompts.json        optional: boxes/points per image, `cpcsam predict`'s format
    s3://<bucket>/<out_prefix><model>/v<version>/<dive>/predictions.json   COCO: every processed image of the dive
                                                        masks/<image>/<k>_<class>.png
                                                        processed.json     what was done, see below

Why the state lives beside the outputs, per model version: predictions are a function of the
model, so a new champion's outputs go to their own folder and it processes every dive again,
while the same champion skips each image whose (key, ETag) is already in `processed.json`
(S3's ETag changes with the content; a time watermark would miss same-second uploads). A changed
`prompts.json` makes every image of its dive new. The state is written last, after the
predictions and masks: a run that dies in between redoes those images (the merge replaces an
image's old entries), it never marks as done what was not uploaded. Images that fail on their
own (unreadable, a prompt outside the image) are recorded with their error and ETag, so they are
not retried until they change; infrastructure errors propagate and fail the run.

A dive without `prompts.json` runs in automatic mode when the flow has a support set and classes
(docs/METHOD.md §5), and is otherwise reported as skipped with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, Sequence

from cpcsam.errors import ConfigError

logger = logging.getLogger(__name__)

PROMPTS = "prompts.json"
PREDICTIONS = "predictions.json"
STATE = "processed.json"
IMAGES = "images"


class S3Object(Protocol):
    """What a listing gives per object (`flows.s3_watch.S3Object`)."""

    key: str
    etag: str


@dataclass
class DiveReport:
    dive: str
    images: int = 0  # image objects found under the dive
    new: int = 0  # not in processed.json (or changed)
    processed: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    skipped_reason: str | None = None
    output: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_prefix(out_prefix: str, model_name: str, version: str) -> str:
    return f"{out_prefix.rstrip('/')}/{model_name}/v{version}/" if out_prefix.strip("/") else f"{model_name}/v{version}/"


def download_export(model_name: str, version: str, cache_root: Path, tracking_uri: str) -> Path:
    """The registered version's ONNX folder (the pyfunc model's `export` artifact), cached per version.

    The folder is located through the model's own `MLmodel` file, not a guessed path.
    """
    import mlflow.artifacts
    import yaml

    from operations.tracking import make_client

    dest = cache_root / f"{model_name}-v{version}"
    if not (dest / "MLmodel").is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_root))
        try:
            # The registry of `tracking_uri`, not the process's default one.
            source = make_client(uri=tracking_uri).get_model_version_download_uri(
                model_name, version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                        tracking_uri=tracking_uri)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(local, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    mlmodel = yaml.safe_load((dest / "MLmodel").read_text())
    try:
        rel = mlmodel["flavors"]["python_function"]["artifacts"]["export"]["path"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"models:/{model_name}/{version} is not a CPC-SAM pyfunc model (no `export` artifact "
                          f"in its MLmodel)") from exc
    return dest / rel


def image_objects(objects: Sequence[S3Object], dive_prefix: str) -> list[S3Object]:
    from cpcsam.predict import IMAGE_SUFFIXES

    images = f"{dive_prefix}{IMAGES}/"
    return [o for o in objects if o.key.startswith(images) and PurePosixPath(o.key).suffix.lower() in IMAGE_SUFFIXES]


def read_json(client, bucket: str, key: str) -> Any | None:
    """The JSON object at `key`, or None when it does not exist (other errors propagate)."""
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return json.loads(body)


def put_json(client, bucket: str, key: str, obj: Any) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=(json.dumps(obj, indent=1) + "\n").encode(),
                      ContentType="application/json")


def merge_predictions(existing: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """One COCO file from the dive's previous predictions and this run's; an image of this run
    replaces the previous entries of the same `uri`. Ids are renumbered, categories joined by name."""
    merged: dict[str, Any] = {"images": [], "categories": [], "annotations": []}
    categories: dict[str, int] = {}
    replaced = {im["uri"] for im in new.get("images", [])}
    for coco in (existing or {"images": [], "categories": [], "annotations": []}, new):
        names = {c["id"]: c["name"] for c in coco.get("categories", [])}
        image_ids: dict[int, int] = {}
        for im in coco.get("images", []):
            if coco is existing and im["uri"] in replaced:
                continue
            image_ids[im["id"]] = len(merged["images"]) + 1
            merged["images"].append({**im, "id": image_ids[im["id"]]})
        for ann in coco.get("annotations", []):
            if ann["image_id"] not in image_ids:
                continue
            cid = categories.setdefault(names[ann["category_id"]], len(categories) + 1)
            merged["annotations"].append({**ann, "id": len(merged["annotations"]) + 1,
                                          "image_id": image_ids[ann["image_id"]], "category_id": cid})
    merged["categories"] = [{"id": i, "name": n} for n, i in categories.items()]
    return merged


def process_dive(
    client,
    bucket: str,
    prefix: str,
    dive: str,
    objects: Sequence[S3Object],
    out_prefix: str,
    export_dir: Path,
    *,
    support: str | None = None,
    classes: Sequence[str] | None = None,
    device: str = "auto",
    overlays: bool = False,
) -> DiveReport:
    """Predict the dive's new images and upload masks, the merged COCO JSON and then the state."""
    from cpcsam.predict import predict

    dive_prefix = f"{prefix.rstrip('/')}/{dive}/" if prefix.strip("/") else f"{dive}/"
    out = f"{out_prefix}{dive}/"
    report = DiveReport(dive, output=f"s3://{bucket}/{out}")
    images = image_objects(objects, dive_prefix)
    report.images = len(images)
    prompts_obj = next((o for o in objects if o.key == dive_prefix + PROMPTS), None)
    if prompts_obj is None and not (support and classes):
        report.skipped_reason = (f"no {PROMPTS} in s3://{bucket}/{dive_prefix} and no support set + classes for "
                                 f"automatic mode")
        return report
    state = read_json(client, bucket, out + STATE) or {}
    done: dict[str, Any] = state.get("images", {})
    prompts_etag = prompts_obj.etag if prompts_obj else None
    if state.get("prompts_etag") != prompts_etag:
        done = {}  # other prompts: every image's answer may change
    new = [o for o in images if done.get(o.key, {}).get("etag") != o.etag]
    report.new = len(new)
    if not new:
        return report

    with tempfile.TemporaryDirectory(prefix="cpcsam-dive-") as tmp:
        work = Path(tmp)
        prompts = None
        if prompts_obj is not None:
            prompts = work / PROMPTS
            prompts.write_bytes(client.get_object(Bucket=bucket, Key=prompts_obj.key)["Body"].read())
        uris = [f"s3://{bucket}/{o.key}" for o in new]
        summary = predict(uris, work / "out", prompts=prompts, support=support,
                          classes=list(classes or []) if prompts is None else None, onnx_dir=export_dir,
                          device=device, overlays=overlays)
        result = json.loads((work / "out" / PREDICTIONS).read_text())
        for path in sorted(p for p in (work / "out").rglob("*.png")):
            rel = path.relative_to(work / "out").as_posix()
            client.upload_file(str(path), bucket, out + rel)
    merged = merge_predictions(read_json(client, bucket, out + PREDICTIONS), result)
    put_json(client, bucket, out + PREDICTIONS, merged)
    errors = {f["image"]: f["error"] for f in summary.failures}
    for obj in new:
        uri = f"s3://{bucket}/{obj.key}"
        done[obj.key] = {"etag": obj.etag, **({"error": errors[uri]} if uri in errors else {})}
    report.processed = len(summary.processed)
    report.failed = [{"image": k, "error": v} for k, v in errors.items()]
    # Last: what is in the state was uploaded above.
    put_json(client, bucket, out + STATE, {"prompts_etag": prompts_etag, "images": done})
    return report
