"""Writing files so that nobody ever reads half of one, and hashing them.

Every output of the pipeline goes through `atomic_path`: the content is written to a temporary
file in the same folder, flushed to disk, then renamed over the final name (`os.replace` is
atomic on POSIX). A process killed mid-write, or a full disk, leaves the previous file or none,
never a truncated out that DVC would cache; the temporary file is removed on any error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # the writer may have closed it: flush what is on disk
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """JSON with sorted keys (the same object always gives the same bytes)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save` to `path` atomically, with bytes that depend only on `obj`.

    `torch.save` to a file path names the zip archive's records after that file, so saving
    through a randomly named temporary file gave the same weights different bytes on every run
    (and DVC a changed out). Serialising to memory first makes the record names fixed.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from a file, with a DataError naming the file and what it should hold."""
    from cpcsam.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {what} must be a JSON object")
    return obj
