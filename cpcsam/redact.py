"""Secrets out of logs, messages and MLflow: the one place that masks them.

    from cpcsam.redact import redact, redact_obj
    logger.warning("MLflow at %s unavailable", redact(uri))   # postgresql://mlflow:***@db/mlflow
    client.log_param(run_id, key, redact(value))

What is masked (replaced by `***`):
- the password of a URI's user info: `scheme://user:PASSWORD@host` (tracking and backend store
  URIs, S3/HTTP endpoints); the user name stays, it helps to tell stores apart;
- credential query parameters: `?password=`, `token=`, `X-Amz-Signature=`, `X-Amz-Credential=`,
  `X-Amz-Security-Token=`, ... (pre-signed S3 URLs);
- `NAME=value` pairs whose name looks secret (`AWS_SECRET_ACCESS_KEY=...` in a command line);
- AWS access key ids (`AKIA...`/`ASIA...` + 16 characters), wherever they appear;
- the value of every environment variable whose name looks secret (`AWS_SECRET_ACCESS_KEY`,
  `AWS_SESSION_TOKEN`, `MLFLOW_TRACKING_PASSWORD`, `PGPASSWORD`, `PREFECT_API_KEY`, ...), read
  from the environment at each call, so a secret is masked even where nothing marks it as one.

`redact_obj` does the same through JSON-like values (params, tags, logged dicts) and masks the
whole value of a key whose name looks secret. `install_log_redaction` puts a filter on the root
logger's handlers, so every record a stage prints (ours, MLflow's, boto's) is masked as well.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

MASK = "***"

# A name that holds a secret: AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN,
# MLFLOW_TRACKING_PASSWORD, PGPASSWORD, PREFECT_API_KEY, db_password, ...
_SECRET_WORDS = "SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE_KEY"
SECRET_NAME = re.compile(_SECRET_WORDS, re.I)
# Environment values shorter than this are not masked as free text: short values are ordinary
# words (moto's default credentials are "testing") and masking them would garble every message.
# Real keys and passwords this pipeline handles are longer (AWS: 20 and 40 characters).
MIN_ENV_SECRET_LENGTH = 8

_URI_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/?#@\s'\"]*):(?P<secret>[^@/?#\s'\"]*)@")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|secret|token|access_token|api_key|apikey|sig|signature"
    r"|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|AWSAccessKeyId)=)(?P<secret>[^&#\s'\"]+)",
    re.I,
)
_NAMED_SECRET = re.compile(rf"(?P<head>\b\w*(?:{_SECRET_WORDS})\w*=)(?P<secret>[^\s'\"&]+)", re.I)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def _env_secrets() -> list[str]:
    """Values of the secret-named environment variables, longest first (a value inside another)."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_ENV_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: Any) -> str:
    """`text` (anything, as `str`) with every secret it holds replaced by `***` (see the module doc)."""
    out = str(text)
    for value in _env_secrets():
        out = out.replace(value, MASK)
    out = _URI_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@" if m["secret"] != MASK else m[0], out)
    out = _QUERY_SECRET.sub(lambda m: m["head"] + MASK, out)
    out = _NAMED_SECRET.sub(lambda m: m["head"] + MASK, out)
    return _AWS_KEY_ID.sub(MASK, out)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like value with every string redacted and secret-named keys' values masked."""
    if isinstance(obj, Mapping):
        return {k: (MASK if isinstance(k, str) and SECRET_NAME.search(k) and v not in (None, "") else redact_obj(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in a record's message and traceback before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add one `RedactingFilter` to each handler of `logger` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
