"""Storage access for local paths and `s3://bucket/key` URIs: the one place that touches files.

Everything in the data layer (and later stages that read images or checkpoints) goes through
these functions, so a source folder can live on disk or under an S3 prefix with no other change.
S3 goes through boto3, which takes its endpoint (`AWS_ENDPOINT_URL`), credentials and region
from the standard AWS environment / config files.

An S3 error is one of two kinds, and they must never be confused:
- the object is not there (404 / NoSuchKey): a problem of the data, a `DataError` naming the
  file, which a source quarantines (`missing_image`) and goes on;
- the storage did not serve the request (connection refused or reset, a timeout, a 5xx,
  throttling such as SlowDown; also refused credentials or a missing bucket): an outage, a
  `StorageUnavailable`. Transient ones are retried here, bounded, with exponential backoff
  (`CPCSAM_S3_ATTEMPTS` attempts, default 5, first wait `CPCSAM_S3_BACKOFF_S`, default 1 s,
  doubling, jittered; `CPCSAM_S3_TIMEOUT_S` connect/read timeout, default 20 s), then raised.
  It is never a quarantine reason: quarantining samples because the endpoint was down loses them
  (a retrain tick marks what it read as seen).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import posixpath
import random
import re
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
from PIL import Image

from cpcsam.errors import DataError

S3_SCHEME = "s3://"

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageUnavailable(RuntimeError):
    """The storage did not serve a request (after the bounded retries, when retrying can help).

    An outage, not bad data. Deliberately neither a `DataError` (sources quarantine those per
    sample) nor any `CpcSamError` (a pipeline step exits 2, "not retryable", on those): a step
    that meets it crashes (exit 1), which the orchestrator retries.
    """


class ImageError(DataError):
    """An image that cannot be used; `reason` is its quarantine reason.

    `problem` is the message without the leading file name (for messages that name the file
    themselves, e.g. "mask file x: <problem>").
    """

    def __init__(self, message: str, reason: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.problem = problem if problem is not None else message


# How libraries name an in-memory buffer in their messages (PIL: `<_io.BytesIO object at 0x7f..>`,
# pyarrow: `'<Buffer>'`): noise for the user, replaced by the file's name.
_BUFFER_REPR = re.compile(r"'?<_io\.\w+ object at 0x[0-9a-fA-F]+>'?|'?<Buffer>'?")


def name_the_file(message: str, uri: str | os.PathLike) -> str:
    """`message` with every in-memory buffer repr replaced by the quoted name of `uri`."""
    name = posixpath.basename(str(uri).rstrip("/")) if is_s3(uri) else Path(uri).name
    return _BUFFER_REPR.sub(lambda _: repr(name or str(uri)), str(message))


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    rest = str(uri)[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataError(f"{uri}: not an s3://bucket/key URI")
    return bucket, key


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"environment {name}={raw!r}: not a number") from exc
    if value < 0:
        raise ValueError(f"environment {name}={raw!r}: must not be negative")
    return value


def retry_settings() -> tuple[int, float, float]:
    """(attempts, first backoff in s, connect/read timeout in s) from the CPCSAM_S3_* environment."""
    return (
        max(1, int(_env_number("CPCSAM_S3_ATTEMPTS", 5))),
        _env_number("CPCSAM_S3_BACKOFF_S", 1.0),
        _env_number("CPCSAM_S3_TIMEOUT_S", 20.0) or 20.0,
    )


@functools.lru_cache(maxsize=4)
def _s3_client_for(endpoint: str | None, region: str | None, timeout: float):
    import boto3  # imported lazily: local-only use never pays for it
    from botocore.config import Config

    # One attempt per call: the retries are ours (`call_s3`), bounded and logged, instead of
    # botocore's silent ones multiplied by ours.
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1, "mode": "standard"})
    return boto3.client("s3", config=config)


def endpoint_url() -> str | None:
    """The S3 endpoint of the environment (boto3's own variables, the S3-specific one first); None = AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client():
    """A boto3 S3 client; cached per endpoint so tests that switch endpoints get a fresh one."""
    return _s3_client_for(
        endpoint_url(),
        os.environ.get("AWS_DEFAULT_REGION"),
        retry_settings()[2],
    )


# S3 error codes, by what they say. Only these mean "the object is not there".
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# The service is overloaded or failing: retry.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "EC2ThrottledException",
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError",
    "ServiceUnavailable", "InternalFailure", "OperationAborted",
})
# The endpoint refuses us as a whole (credentials, bucket): no sample is at fault and a retry
# in the same second cannot help; the run fails.
_REFUSED_CODES = frozenset({
    "AccessDenied", "403", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "NoSuchBucket", "AllAccessDisabled", "AccountProblem",
    "InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed",
})

# One object cannot be read (archived, a bad range): that file's problem, not the endpoint's.
_PER_OBJECT_CODES = frozenset({"InvalidObjectState", "InvalidRange", "ObjectNotInActiveTierError"})

MISSING, TRANSIENT, REFUSED, OTHER = "missing", "transient", "refused", "other"


def classify_s3_error(exc: BaseException) -> str:
    """What an exception from an S3 call means: MISSING (404: the object is not there),
    TRANSIENT (connection refused/reset, timeout, 5xx, throttling: retry, then an outage),
    REFUSED (credentials, missing bucket: an outage at once) or OTHER (a per-object 4xx such as
    InvalidObjectState, or not an S3 error at all)."""
    from botocore import exceptions as bex

    if isinstance(exc, bex.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _MISSING_CODES:
            return MISSING
        if code in _PER_OBJECT_CODES:
            return OTHER
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TRANSIENT
        if code in _REFUSED_CODES or status in (401, 403):
            return REFUSED
        if status == 404:  # a 404 under another code (not NoSuchBucket, handled above)
            return MISSING
        return OTHER
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError)):
        return TRANSIENT  # EndpointConnectionError, Connect/ReadTimeout, ConnectionClosed, streaming errors
    if isinstance(exc, bex.BotoCoreError):
        return REFUSED  # NoCredentialsError, NoRegionError, ...: the client cannot reach S3 at all
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TRANSIENT  # a raw socket error leaking from a body read
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover
        return OTHER
    return TRANSIENT if isinstance(exc, Urllib3Error) else OTHER


def call_s3(what: str, uri: str, fn: Callable[[], T]) -> T:
    """`fn()` (one S3 request), retried with exponential backoff while it fails transiently.

    `what` and `uri` name the request in messages ("read", "s3://bucket/key"). After the last
    attempt, or at once for a REFUSED error, raises `StorageUnavailable` naming the endpoint, the
    attempts and the time spent. Every other exception (a 404, a per-object 4xx) is re-raised as
    is, for the caller to turn into its `DataError`.
    """
    attempts, backoff, _ = retry_settings()
    start = time.monotonic()
    endpoint = endpoint_url() or "AWS S3"
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            kind = classify_s3_error(exc)
            if kind not in (TRANSIENT, REFUSED):
                raise
            if kind == REFUSED:
                raise StorageUnavailable(
                    f"{uri}: S3 at {endpoint} refused to {what} ({exc}); no data is at fault: nothing was "
                    "quarantined for it"
                ) from exc
            if attempt == attempts:
                raise StorageUnavailable(
                    f"{uri}: S3 at {endpoint} unavailable: could not {what} after {attempts} attempt(s) over "
                    f"{time.monotonic() - start:.1f} s (last error: {exc}). An outage, not bad data: nothing "
                    "was quarantined for it"
                ) from exc
            delay = min(backoff * 2 ** (attempt - 1), 30.0) * random.uniform(0.5, 1.0)
            log.warning("%s: cannot %s (%s); attempt %d/%d, retrying in %.2f s", uri, what, exc, attempt, attempts,
                        delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def join(root: str | os.PathLike, *parts: str) -> str:
    """Join path parts under a local root or an S3 prefix (no escape check: see `resolve_under`)."""
    if is_s3(root):
        return posixpath.join(str(root), *parts)
    return str(Path(root, *parts))


def resolve_under(
    root: str | os.PathLike,
    relative: str,
    follow_symlinks: bool = False,
    data_root: str | os.PathLike | None = None,
) -> str:
    """`root/relative`, refusing a relative path that escapes `root` (`../`, absolute paths).

    Symbolic links (the file itself or a folder on its way) are resolved, and a link whose
    target lies outside both `root` and `data_root` (the data set's folder that holds `root`,
    when given) is an escape too — unless `follow_symlinks` (a source's `follow_symlinks: true`,
    for data sets symlinked on purpose): then links are followed wherever they point and the
    path is returned as written under `root` (`../` and absolute paths are refused either way).
    Raises DataError naming the path (and the link's target); sources quarantine the item with
    reason `path_escapes_root`.
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
    if follow_symlinks:
        return str(base if norm == "." else base / norm)
    full = (base / norm).resolve()  # resolves symlinks too: a link pointing outside is an escape
    allowed = [base] if data_root is None or is_s3(data_root) else [base, Path(data_root).resolve()]
    if not any(full == b or b in full.parents for b in allowed):
        # `norm` has no `..` left, so only a symbolic link can lead outside
        raise DataError(
            f"{relative}: path escapes the data root {data_root if data_root is not None else root} through a "
            f"symbolic link (to {full}); links leaving the root are refused unless the source sets "
            "`follow_symlinks: true`"
        )
    return str(full)


def exists(uri: str | os.PathLike) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))

        def head() -> bool:
            try:
                s3_client().head_object(Bucket=bucket, Key=key)
                return True
            except Exception as exc:
                if classify_s3_error(exc) == MISSING:
                    return False
                raise

        try:
            return call_s3("check the existence of", str(uri), head)
        except StorageUnavailable:
            raise
        except Exception as exc:
            raise DataError(f"{uri}: cannot check existence: {exc}") from exc
    return Path(uri).exists()


def is_dir(uri: str | os.PathLike) -> bool:
    """A local directory, or an S3 prefix holding at least one object."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        prefix = key.rstrip("/") + "/" if key else ""
        resp = call_s3("list", str(uri), lambda: s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1))
        return resp.get("KeyCount", 0) > 0
    return Path(uri).is_dir()


def list_files(
    root: str | os.PathLike, suffixes: tuple[str, ...] | None = None, through_links: bool = False
) -> list[str]:
    """All files under `root` (recursively), as full paths/URIs, sorted; optionally by suffix.

    Local paths are listed as written under `root` (symbolic links are not resolved). By
    default a linked folder is not entered and a broken link is not listed; `through_links`
    lists both (a link cycle is entered once), for callers that check every path with
    `resolve_under` and report the links they refuse instead of silently missing them.
    """
    found: list[str] = []
    if is_s3(root):
        bucket, key = split_s3(str(root))
        prefix = key.rstrip("/") + "/" if key else ""

        def listing() -> list[str]:  # a failure on a later page restarts the listing: no half list
            keys: list[str] = []
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(f"{S3_SCHEME}{bucket}/{o['Key']}" for o in page.get("Contents", []) if not o["Key"].endswith("/"))
            return keys

        found = call_s3("list", str(root), listing)
    else:
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"{root}: folder not found")
        if through_links:
            found = _walk_through_links(base)
        else:
            found = [str(p) for p in base.rglob("*") if p.is_file()]
    if suffixes:
        lowered = tuple(s.lower() for s in suffixes)
        found = [f for f in found if f.lower().endswith(lowered)]
    return sorted(found)


def _walk_through_links(base: Path) -> list[str]:
    """Files and symbolic links (broken ones too) under `base`, entering linked folders."""
    found: list[str] = []

    def walk(folder: str, ancestors: frozenset[str]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"{folder}: cannot list the folder: {exc}") from exc
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                real = os.path.realpath(entry.path)
                if real not in ancestors:  # a link back to a folder on the way would loop forever
                    walk(entry.path, ancestors | {real})
            elif entry.is_file(follow_symlinks=True) or entry.is_symlink():
                found.append(entry.path)

    walk(str(base), frozenset({os.path.realpath(base)}))
    return found


def relative_to(root: str | os.PathLike, uri: str) -> str:
    """`uri` relative to `root`, with forward slashes.

    Compared as written first (a file listed under `root` may be a symbolic link pointing
    elsewhere: its path under `root` is what counts), then with links resolved (a resolved
    URI under a root given through a link). DataError when `uri` is under neither.
    """
    if is_s3(root):
        prefix = str(root).rstrip("/") + "/"
        return uri[len(prefix):] if uri.startswith(prefix) else uri
    try:
        return Path(os.path.abspath(uri)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        pass
    try:
        return Path(uri).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError as exc:
        raise DataError(f"{uri}: not under the folder {root}") from exc


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole file; DataError naming the file when it is missing or unreadable.

    On S3, `StorageUnavailable` (not a DataError) when the endpoint did not serve the read (see
    the module's docstring): the object may well be there, so no caller may treat it as missing.
    """
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        try:
            # the body is read inside the retried call: a connection lost mid-body is retried too
            return call_s3("read", str(uri), lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
        except StorageUnavailable:
            raise
        except Exception as exc:
            if classify_s3_error(exc) == MISSING:
                raise DataError(f"{uri}: file not found") from exc
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
                problem = f"image of {w}x{h} = {w * h} pixels is over the limit of {max_pixels}"
                raise ImageError(f"{uri}: {problem}", "image_too_large", problem)
            img.load()  # full decode: raises OSError on truncated data
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # pragma: no cover - guard disabled above
        raise ImageError(f"{uri}: decompression bomb: {exc}", "image_too_large") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        msg = name_the_file(str(exc), uri)  # PIL names the BytesIO, not the file
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            raise ImageError(f"{uri}: truncated image: {msg}", "truncated_image", f"truncated image: {msg}") from exc
        raise ImageError(f"{uri}: unreadable image: {msg}", "unreadable_image", f"unreadable image: {msg}") from exc
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
        call_s3("write", str(uri), lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def iter_bytes(uris: list[str]) -> Iterator[tuple[str, bytes]]:
    for uri in uris:
        yield uri, read_bytes(uri)
