"""Writing files so that nobody ever reads half of one, hashing them, and reading the untrusted ones.

Every output of the pipeline goes through `atomic_path`: the content is written to a temporary
file in the same folder, flushed to disk, then renamed over the final name (`os.replace` is
atomic on POSIX). A process killed mid-write, or a full disk, leaves the previous file or none,
never a truncated out that DVC would cache; the temporary file is removed on any error.

Files from users are read defensively: JSON (`read_json`, `parse_json`) within a size and a
nesting limit, torch files (`torch_load_weights`) with `weights_only=True`, so a pickle that
would run code is refused with a message instead of being executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # e.g. ENOSPC from fsync: name the out
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
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


# ---- untrusted JSON --------------------------------------------------------------------------

# Limits for JSON written by people or other programs (prompts files, support sets, serving
# requests); larger or deeper input is refused with a DataError before it is parsed.
# 64 MiB holds the prompts of ~80,000 images with 10 entities each; Python's objects take several
# times the text's size, so the limit keeps a parse well under a few GB of memory.
MAX_JSON_BYTES = 64 * 1024 * 1024
# Our documents nest 6 levels at most (object > image list > entity > points > [x, y]; COCO
# polygons: 5). Python's parser recurses per level and fails with a RecursionError (a crash
# with a traceback, not a message) near 1000: deeper input is hostile or broken.
MAX_JSON_DEPTH = 64

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a string literal, escapes included


def json_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in JSON `text`, without parsing (brackets in strings
    do not count). Linear time and no recursion, so it is safe on any input."""
    import numpy as np

    step = np.zeros(256, np.int8)  # per byte: +1 opens an array/object, -1 closes one
    step[[ord("["), ord("{")]], step[[ord("]"), ord("}")]] = 1, -1
    codes = np.frombuffer(_JSON_STRING.sub('""', text).encode("utf-8", "surrogatepass"), np.uint8)
    steps = step[codes]
    return int(np.cumsum(steps[steps != 0], dtype=np.int64).max(initial=0))


def parse_json(text: str, where: str, what: str, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads(text)` within the size and nesting limits; DataError naming `where` and `what`."""
    from cpcsam.errors import DataError

    if len(text) > max_bytes:
        raise DataError(f"{where}: {what} is {len(text)} characters, over the limit of {max_bytes}")
    depth = json_depth(text)
    if depth > max_depth:
        raise DataError(f"{where}: {what} nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: {what} is not valid JSON: {exc}") from exc


def _size_or_none(uri: str) -> int | None:
    """The size of a local file or an S3 object without reading it (None when it cannot be told)."""
    from cpcsam.data import storage

    try:
        if storage.is_s3(uri):
            bucket, key = storage.split_s3(uri)
            return int(storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        return os.stat(uri).st_size
    except Exception:  # missing or unreadable: the read that follows says so, naming the file
        return None


def read_json(uri: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from a local file or `s3://` URI, within the limits (a file over the size limit is not
    read at all); DataError naming the file and `what` it should hold."""
    from cpcsam.data import storage
    from cpcsam.errors import DataError

    where = str(uri)
    size = _size_or_none(where)
    if size is not None and size > max_bytes:
        raise DataError(f"{where}: {what} is {size} bytes, over the limit of {max_bytes}")
    return parse_json(storage.read_text(where), where, what, max_bytes, max_depth)


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from a file, with a DataError naming the file and what it should hold."""
    from cpcsam.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {what} must be a JSON object")
    return obj


# ---- untrusted torch files ---------------------------------------------------------------------


def torch_load_weights(source: str | os.PathLike | bytes, where: str | os.PathLike, what: str = "checkpoint") -> Any:
    """`torch.load(weights_only=True)` of a path or the file's bytes, onto the CPU.

    Only tensors and plain values load: a pickle that names any other callable (the way a
    malicious file runs code while it is read) is refused before anything of it runs, with a
    `CheckpointError` that names the file and what it tried to load, instead of torch's advice
    to retry with `weights_only=False`. Any other unreadable file is a `CheckpointError` too.
    """
    import io
    import pickle

    import torch

    from cpcsam.errors import CheckpointError

    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CheckpointError(f"{where}: not a loadable {what} (weights_only=True): {exc}") from exc
        reason = _unpickler_reason(str(exc))
        if "GLOBAL" not in reason:  # not a pickle of objects: a truncated or foreign file
            raise CheckpointError(f"{where}: not a loadable {what} (weights_only=True): {reason}") from None
        raise CheckpointError(f"{where}: refused: the {what} holds pickled Python objects, not only weights "
                              f"({reason}); it was not loaded (weights_only=True). Use files written by this "
                              "pipeline, or re-save the state dict of a trusted source with torch.save") from None
    except Exception as exc:  # zip/format errors name a BytesIO, not the file
        from cpcsam.data.storage import name_the_file

        raise CheckpointError(f"{where}: not a loadable {what} (weights_only=True): "
                              f"{name_the_file(str(exc), where)}") from exc


def _unpickler_reason(message: str) -> str:
    """The sentence of torch's weights-only error that says what was refused (`Unsupported
    global: GLOBAL posix.system ...`), without its advice on how to load the file anyway."""
    for line in (ln.strip() for ln in message.splitlines()):
        if re.search(r"unsupported|global|blocked", line, re.I) and "weights_only" not in line:
            line = line.removeprefix("WeightsUnpickler error:").strip()
            return re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]
    return "an unsupported pickle instruction"


class LockBusy(RuntimeError):
    """Another process holds the lock (`holder`: what it wrote into the lock file, may be {})."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def lock_holder(path: str | Path) -> dict[str, Any]:
    """What the current (or last) holder of the lock file wrote into it; {} when unreadable."""
    try:
        obj = json.loads(Path(path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, wait_s: float = 0.0, poll_s: float = 0.2, what: str = "", on_wait: Any = None
) -> Iterator[dict[str, Any]]:
    """Hold an exclusive `flock` on `path` (created if needed) while the block runs.

    Waits up to `wait_s` seconds (polling every `poll_s`; `on_wait(holder)` is called once when
    it has to wait), then raises `LockBusy` naming the holder. The holder's pid, host, time and
    `what` are written into the file (for that message); the file itself is never deleted, so
    two processes can never lock two different files of one name.

    A killed holder cannot leave a stale lock: the kernel releases an flock when the last
    descriptor of it is closed, which process death does. flock is advisory and local to a
    host (on NFS it is either emulated or unsupported): it guards work on a local folder.
    Two `open()`s, even in one process, are two lock owners, so threads exclude each other too.
    """
    import fcntl
    import socket
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, wait_s)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = lock_holder(path)
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"{path}: held by pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                        f"{holder.get('since', '?')}{' (' + holder['what'] + ')' if holder.get('what') else ''}; "
                        f"waited {wait_s:.0f} s", holder
                    ) from None
                if not waited and on_wait is not None:
                    on_wait(holder)
                waited = True
                time.sleep(poll_s)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield me
    finally:
        os.close(fd)  # releases the lock
