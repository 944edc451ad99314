"""Fail-fast checks a flow runs before any training: the tracking server and S3 endpoints answer.

A configured server that does not answer raises `PreflightError` naming the URL, so a flow fails
in seconds instead of after an hour of training whose logs go nowhere. URIs and endpoints in
messages and in the returned lines go through `cpcsam.redact` (a password in a URI is masked).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cpcsam.config import Params
from cpcsam.errors import CpcSamError
from cpcsam.redact import redact
from operations.tracking import (
    DATABASE_PORTS,
    database_problem,
    is_remote_uri,
    resolve_tracking_uri,
    sqlite_database,
    tracking_config,
)


class PreflightError(CpcSamError):
    """A service the run needs (tracking server, S3 endpoint) does not answer."""


def _http_reachable(url: str, timeout: float) -> tuple[bool, str]:
    """(True, status) when something answers HTTP at `url` (any status code counts)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return True, str(resp.status)
    except urllib.error.HTTPError as exc:  # an answer, even if 4xx/5xx
        return True, str(exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, str(reason)


def check_tracking(params: Params | None, timeout: float | None = None) -> str:
    """Raise `PreflightError` unless the configured tracking store can be used. Returns the URI."""
    cfg = tracking_config(params)
    uri = resolve_tracking_uri(params)
    shown = redact(uri)
    timeout = float(timeout if timeout is not None else cfg.preflight_timeout_s)
    parsed = urllib.parse.urlparse(uri)
    if is_remote_uri(uri):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as resp:
                if resp.status == 200:
                    return uri
                problem = f"/health answered HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            problem = f"/health answered HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            problem = f"no answer ({redact(getattr(exc, 'reason', exc))})"
        raise PreflightError(
            f"MLflow tracking server {shown} is unreachable: {problem}. Start the local stack with "
            "`make stack-up`, or point MLFLOW_TRACKING_URI / params tracking.uri at a running server "
            "(sqlite:///mlflow.db needs no server). Nothing was trained."
        )
    if parsed.scheme.split("+")[0] in DATABASE_PORTS:
        problem = database_problem(uri, timeout)
        if problem:
            raise PreflightError(f"MLflow store {shown}: its database does not answer ({problem}). Nothing was trained.")
        return uri
    if parsed.scheme == "sqlite":
        db = sqlite_database(uri)
        if db is not None:
            folder = db.parent if db.parent != Path("") else Path(".")
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise PreflightError(f"MLflow store {shown}: folder {folder.resolve()} is missing or not writable")
        return uri
    if parsed.scheme in {"", "file"}:
        folder = Path(parsed.path if parsed.scheme == "file" else uri)
        probe = folder if folder.exists() else folder.parent
        if not os.access(probe if str(probe) else ".", os.W_OK):
            raise PreflightError(f"MLflow store {shown}: {probe} is not writable")
        return uri
    raise PreflightError(f"MLflow tracking URI {shown!r}: unsupported scheme {parsed.scheme!r} (use sqlite:///, http(s)://, postgresql://)")


def check_s3_endpoint(endpoint_url: str | None, bucket: str | None = None, timeout: float = 5.0) -> None:
    """Raise `PreflightError` unless an S3 endpoint answers (and `bucket` exists when given).

    With no endpoint URL (real AWS), only the bucket check applies, and only when a bucket is named.
    """
    what = redact(endpoint_url) if endpoint_url else "AWS S3"
    if endpoint_url:
        ok, detail = _http_reachable(endpoint_url, timeout)
        if not ok:
            raise PreflightError(
                f"S3 endpoint {what} is unreachable ({redact(detail)}). Start it with `make stack-up` "
                "(moto_server) or fix the endpoint URL. Nothing was trained."
            )
    if bucket:
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
        try:
            boto3.client("s3", endpoint_url=endpoint_url, config=config).head_bucket(Bucket=bucket)
        except Exception as exc:
            raise PreflightError(f"S3 bucket s3://{bucket} on {what} cannot be used: {redact(exc)}") from exc


def preflight(
    params: Params | None = None,
    s3_endpoints: list[tuple[str | None, str | None]] | None = None,
    timeout: float | None = None,
) -> list[str]:
    """Fail fast before any training. Checks the tracking store, MLflow's direct S3 artifact
    endpoint (`MLFLOW_S3_ENDPOINT_URL`, when set) and the given `(endpoint_url, bucket)` pairs.

    Returns one line per check that passed; raises `PreflightError` at the first that fails.
    """
    cfg = tracking_config(params)
    timeout = float(timeout if timeout is not None else cfg.preflight_timeout_s)
    done: list[str] = []
    if cfg.enabled:
        uri = check_tracking(params, timeout)
        done.append(f"tracking store {redact(uri)}")
        mlflow_s3 = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        if mlflow_s3 and not is_remote_uri(uri):
            check_s3_endpoint(mlflow_s3, None, timeout)
            done.append(f"MLflow S3 endpoint {redact(mlflow_s3)}")
    for endpoint, bucket in s3_endpoints or []:
        check_s3_endpoint(endpoint, bucket, timeout)
        done.append(f"S3 {redact(endpoint) if endpoint else 'aws'} bucket={bucket or '-'}")
    return done
