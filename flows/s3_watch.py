"""Polling an S3 prefix for new objects: remember every seen key *and* its ETag.

S3's `LastModified` has whole-second resolution, so a time watermark misses an object
written in the same second as the last tick, and never sees an object re-uploaded with new
content under the same key. The state is the set of (key, ETag) pairs seen; an object is
new when its key is unseen or its ETag changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from cpcsam.data import storage
from cpcsam.files import write_json_atomic


@dataclass(frozen=True)
class S3Object:
    key: str
    etag: str
    size: int
    last_modified: str


def s3_client(endpoint_url: str | None = None, timeout: float = 10.0):
    """boto3 S3 client; endpoint from the argument or the standard AWS_ENDPOINT_URL(_S3) env.

    botocore's own few retries stay on (other callers use this client directly);
    `list_objects` adds the data layer's bounded backoff and outage error on top.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or storage.endpoint_url()
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 3})
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def list_objects(client, bucket: str, prefix: str, page_size: int = 1000) -> list[S3Object]:
    """Every object under `prefix` (all pages of `page_size`), sorted by key.

    An outage (after bounded retries) raises `storage.StorageUnavailable`; a failure on a later
    page restarts the whole listing, so a partial listing is never returned.
    """

    def listing() -> list[S3Object]:
        found: list[S3Object] = []
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        for page in pages:
            for obj in page.get("Contents", []) or []:
                if obj["Key"].endswith("/"):  # folder markers made by some consoles
                    continue
                found.append(
                    S3Object(obj["Key"], str(obj["ETag"]).strip('"'), int(obj["Size"]), obj["LastModified"].isoformat())
                )
        return found

    return sorted(storage.call_s3("list", f"s3://{bucket}/{prefix}", listing), key=lambda o: o.key)


class SeenState:
    """The watcher's memory: key -> ETag of every object already handled, plus free-form fields."""

    def __init__(self, seen: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        self.seen: dict[str, str] = dict(seen or {})
        self.extra: dict[str, Any] = dict(extra or {})

    @classmethod
    def load(cls, path: str | Path) -> "SeenState":
        path = Path(path)
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(data.get("seen", {}), {k: v for k, v in data.items() if k != "seen"})

    def save(self, path: str | Path) -> None:
        """Atomic and durable (`cpcsam.files.write_json_atomic`: temp file, fsync, rename): a crash
        mid-save leaves the previous state, never half a file nor a stray temp file."""
        write_json_atomic(path, {**self.extra, "seen": dict(sorted(self.seen.items()))})

    def new(self, objects: Iterable[S3Object]) -> list[S3Object]:
        """Objects whose key is unseen or whose content (ETag) changed since it was seen."""
        return [o for o in objects if self.seen.get(o.key) != o.etag]

    def mark(self, objects: Iterable[S3Object]) -> None:
        for obj in objects:
            self.seen[obj.key] = obj.etag


def batches_of(objects: Iterable[S3Object], prefix: str) -> dict[str, list[S3Object]]:
    """Group objects by their first path component under `prefix` (one uploaded batch each).

    `deepsea/2026-05-01/annotations.json` -> batch `2026-05-01`; objects directly under the
    prefix form the batch "" (the prefix itself).
    """
    groups: dict[str, list[S3Object]] = {}
    for obj in objects:
        rest = obj.key[len(prefix):].lstrip("/")
        batch = rest.split("/", 1)[0] if "/" in rest else ""
        groups.setdefault(batch, []).append(obj)
    return dict(sorted(groups.items()))


def as_dicts(objects: Iterable[S3Object]) -> list[dict[str, Any]]:
    return [asdict(o) for o in objects]
