"""Storage access for local paths and `s3://bucket/key` URIs: the one place that touches files.

Everything in the data layer (and later stages that read images or checkpoints) goes through
these functions, so a source folder can live on disk or under an S3 prefix with no other change.
S3 goes through boto3, which takes its endpoint (`AWS_ENDPOINT_URL`), credentials and region
from the standard AWS environment / config files.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from cpcsam.errors import DataError

S3_SCHEME = "s3://"


class ImageError(DataError):
    """An image that cannot be used; `reason` is its quarantine reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    rest = str(uri)[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataError(f"{uri}: not an s3://bucket/key URI")
    return bucket, key


@functools.lru_cache(maxsize=1)
def _s3_client_for(endpoint: str | None, region: str | None):
    import boto3  # imported lazily: local-only use never pays for it

    return boto3.client("s3")


def s3_client():
    """A boto3 S3 client; cached per endpoint so tests that switch endpoints get a fresh one."""
    return _s3_client_for(
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_DEFAULT_REGION"),
    )


def join(root: str | os.PathLike, *parts: str) -> str:
    """Join path parts under a local root or an S3 prefix (no escape check: see `resolve_under`)."""
    if is_s3(root):
        return posixpath.join(str(root), *parts)
    return str(Path(root, *parts))


def resolve_under(root: str | os.PathLike, relative: str) -> str:
    """`root/relative`, refusing a relative path that escapes `root` (`../`, absolute paths).

    Raises DataError naming the path; sources quarantine the item with reason `path_escapes_root`.
    """
    rel = str(relative).replace("\\", "/")
    if rel.startswith("/") or is_s3(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{relative}: absolute path where a path relative to {root} was expected")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise DataError(f"{relative}: path escapes the data root {root}")
    if is_s3(root):
        return posixpath.join(str(root).rstrip("/"), norm)
    base = Path(root).resolve()
    full = (base / norm).resolve()  # resolves symlinks too: a link pointing outside is an escape
    if full != base and base not in full.parents:
        raise DataError(f"{relative}: path escapes the data root {root}")
    return str(full)


def exists(uri: str | os.PathLike) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        from botocore.exceptions import ClientError

        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise DataError(f"{uri}: cannot check existence: {exc}") from exc
    return Path(uri).exists()


def is_dir(uri: str | os.PathLike) -> bool:
    """A local directory, or an S3 prefix holding at least one object."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        prefix = key.rstrip("/") + "/" if key else ""
        resp = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return resp.get("KeyCount", 0) > 0
    return Path(uri).is_dir()


def list_files(root: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under `root` (recursively), as full paths/URIs, sorted; optionally by suffix."""
    found: list[str] = []
    if is_s3(root):
        bucket, key = split_s3(str(root))
        prefix = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    found.append(f"{S3_SCHEME}{bucket}/{obj['Key']}")
    else:
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"{root}: folder not found")
        found = [str(p) for p in base.rglob("*") if p.is_file()]
    if suffixes:
        lowered = tuple(s.lower() for s in suffixes)
        found = [f for f in found if f.lower().endswith(lowered)]
    return sorted(found)


def relative_to(root: str | os.PathLike, uri: str) -> str:
    """`uri` relative to `root`, with forward slashes."""
    if is_s3(root):
        prefix = str(root).rstrip("/") + "/"
        return uri[len(prefix):] if uri.startswith(prefix) else uri
    return Path(uri).resolve().relative_to(Path(root).resolve()).as_posix()


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole file; DataError naming the file when it is missing or unreadable."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise DataError(f"{uri}: file not found") from exc
            raise DataError(f"{uri}: cannot read: {exc}") from exc
        except BotoCoreError as exc:
            raise DataError(f"{uri}: cannot read: {exc}") from exc
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{uri}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{uri}: cannot read: {exc}") from exc


def read_text(uri: str | os.PathLike) -> str:
    try:
        return read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri}: not UTF-8 text: {exc}") from exc


def open_image(data: bytes, uri: str, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully (so truncation is caught), refusing more than `max_pixels`.

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. Raises DataError naming `uri` and the problem.
    """
    try:
        # PIL's own bomb guard (MAX_IMAGE_PIXELS) would warn or raise with its default limit;
        # ours is checked explicitly below, from the header.
        with _no_pil_bomb_guard():
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(
                    f"{uri}: image of {w}x{h} = {w * h} pixels is over the limit of {max_pixels}", "image_too_large"
                )
            img.load()  # full decode: raises OSError on truncated data
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # pragma: no cover - guard disabled above
        raise ImageError(f"{uri}: decompression bomb: {exc}", "image_too_large") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            raise ImageError(f"{uri}: truncated image: {msg}", "truncated_image") from exc
        raise ImageError(f"{uri}: unreadable image: {msg}", "unreadable_image") from exc
    return img


class _no_pil_bomb_guard:
    def __enter__(self):
        self._saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self._saved
        return False


def read_image(uri: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """An image as `np.ndarray[H, W, 3] uint8` (RGB), from a local path or an `s3://` URI."""
    img = open_image(read_bytes(uri), str(uri), max_pixels)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a file locally or to S3 (used by tests and tools that stage data)."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def iter_bytes(uris: list[str]) -> Iterator[tuple[str, bytes]]:
    for uri in uris:
        yield uri, read_bytes(uri)
