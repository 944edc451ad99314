"""The retrain tick under faults, with real processes: a moto_server of its own that the test
stops, pauses and restarts, a real git + DVC repository with an S3 remote on it, real `dvc add`
/ `dvc push`, and (for the concurrency tests) ticks in separate Python processes.

What the tests run is the tick's own code without Prefect: `flows.retrain.pick_up_new_data`
(listing, reading, validating, merging, seen marks, `dvc add`/`push`: the data path) and
`flows.retrain.train_if_needed` (the training decision), which the `retrain` flow calls with
its tasks. The training trigger (`run_deployment` in the flow) is stubbed: these tests isolate
the data path and the state, not training (tests/orchestration/test_end_to_end.py runs that).

The session's moto_server (`s3_endpoint`) is never touched: stopping it would break other tests.
Restarting a moto_server loses its (in-memory) objects, so "the server is back" means a new
moto_server on the same port with the same objects uploaded again: same bytes, same ETags.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from flows import retrain, s3_watch, stages
from orchestration_helpers import ROOT, dvc, free_port

pytestmark = pytest.mark.slow

INCOMING = "cpcsam-incoming"
REMOTE = "cpcsam-dvc"
PREFIX = "deepsea/"
DATASET = "datasets/deepsea"


class MotoServer:
    """A moto_server process on a fixed port, which a test can stop, pause and start again."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.paused = False

    def start(self) -> None:
        exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {self.url}: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        """The endpoint goes away: connections are refused (and its objects are gone)."""
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """The endpoint hangs: connections are accepted by the kernel, nothing answers (timeouts)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False


@pytest.fixture
def moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An own moto_server; this process and its children (dvc, tick processes) use it.

    Short retry settings keep an outage's failure quick: 3 attempts from 0.05 s, 2 s timeouts
    (`cpcsam.data.storage`), and 2 attempts for dvc's own S3 client (AWS_MAX_ATTEMPTS).
    """
    server = MotoServer(tmp_path / "moto.log")
    server.start()
    for key, value in {
        "AWS_ENDPOINT_URL": server.url, "AWS_ENDPOINT_URL_S3": server.url, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2",
        "CPCSAM_S3_ATTEMPTS": "3", "CPCSAM_S3_BACKOFF_S": "0.05", "CPCSAM_S3_TIMEOUT_S": "2",
    }.items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()


def _png(seed: int, width: int = 32, height: int = 24) -> bytes:
    arr = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_batch(name: str, n_images: int, seed: int = 0) -> dict[str, bytes]:
    """A COCO batch (key under the prefix -> bytes): `n_images` good images, one box-shaped polygon each."""
    files: dict[str, bytes] = {}
    images, annotations = [], []
    for i in range(n_images):
        file_name = f"dive{seed:02d}_frame{i:03d}.png"
        files[f"{PREFIX}{name}/images/{file_name}"] = _png(seed * 100 + i)
        images.append({"id": i + 1, "file_name": file_name, "width": 32, "height": 24})
        x = 2 + i % 10
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, 3, 10, 8],
                            "segmentation": [[x, 3, x + 10, 3, x + 10, 11, x, 11]], "area": 80, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "crab"}]}
    files[f"{PREFIX}{name}/annotations.json"] = json.dumps(coco).encode()
    return files


def upload(objects: dict[str, bytes]) -> None:
    import boto3

    client = boto3.client("s3")
    for bucket in (INCOMING, REMOTE):
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
    for key, body in objects.items():
        client.put_object(Bucket=INCOMING, Key=key, Body=body)


def remote_keys() -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=REMOTE)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def project(tmp_path: Path, moto: MotoServer) -> Path:
    """A git + DVC repository whose default remote is s3://cpcsam-dvc on the test's moto_server."""
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "remote", "add", "-d", "s3", f"s3://{REMOTE}")
    dvc(root, "remote", "modify", "--local", "s3", "endpointurl", moto.url)
    return root


def tick(root: Path, push: bool = True, **kwargs):
    return retrain.pick_up_new_data(root, INCOMING, PREFIX, DATASET, r"^(.+?)_frame", 10_000_000, push, **kwargs)


def state_of(root: Path) -> s3_watch.SeenState:
    return s3_watch.SeenState.load(retrain.state_path_of(root, DATASET))


def dataset_files(root: Path) -> list[str]:
    coco = json.loads((root / DATASET / "annotations.json").read_text())
    names = [i["file_name"] for i in coco["images"]]
    assert len(names) == len(set(names)), f"an image is in the dataset twice: {names}"
    return sorted(names)


def images_of(objects: dict[str, bytes]) -> list[str]:
    return sorted(k[len(PREFIX):].replace("/images/", "/") for k in objects if "/images/" in k)


def no_staging_left(root: Path) -> bool:
    return not list((root / DATASET).parent.glob(f".{Path(DATASET).name}.staging-*"))


# --------------------------------------------------------------------------- S3 outage while reading


def test_s3_stopped_mid_read_fails_the_tick_quarantines_nothing_and_the_next_tick_ingests_all(
        project: Path, moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from cpcsam.data import storage

    first, second = make_batch("batch-001", 4, seed=1), make_batch("batch-002", 5, seed=2)
    upload({**first, **second})

    # Stop the server after the 2nd image of batch-002 was read (its annotations long read).
    real_read = storage.read_bytes
    reads: list[str] = []

    def read_then_stop(uri):
        data = real_read(uri)
        reads.append(str(uri))
        if sum("batch-002/images/" in u for u in reads) == 2 and moto.proc.poll() is None:
            moto.stop()
        return data

    monkeypatch.setattr(storage, "read_bytes", read_then_stop)
    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailable) as failed:
        tick(project)
    message = str(failed.value)
    assert "batch-002/images/" in message and moto.url in message and "not bad data" in message
    assert time.monotonic() - start < 60

    # batch-001 was merged before the outage: in the dataset, seen, waiting to be versioned
    state = state_of(project)
    assert set(state.seen) == set(first), "only the batch that was ingested is seen"
    assert state.extra.get("pending_version") is True and "data_version" not in state.extra
    assert dataset_files(project) == images_of(first)
    # nothing of batch-002 was quarantined, written or marked
    quarantine = project / DATASET / "quarantine"
    assert json.loads((quarantine / "batch-001.json").read_text())["n_quarantined"] == 0
    assert not (quarantine / "batch-002.json").exists()
    assert not (project / DATASET / "images" / "batch-002").exists() and no_staging_left(project)

    # the server is back (same objects, same ETags): the next tick ingests batch-002 whole and pushes
    monkeypatch.setattr(storage, "read_bytes", real_read)
    moto.start()
    upload({**first, **second})
    summary = tick(project)
    assert [b["batch"] for b in summary["batches"]] == ["batch-002"]
    (report,) = summary["batches"]
    assert report["images_accepted"] == 5 and report["quarantined"] == 0 and report["reasons"] == {}
    assert dataset_files(project) == images_of({**first, **second})
    state = state_of(project)
    assert set(state.seen) == set(first) | set(second) and "pending_version" not in state.extra
    assert summary["data_version"] == state.extra["data_version"] == retrain.dvc_data_version(project, DATASET)
    assert any(summary["data_version"].removesuffix(".dir")[2:] in k for k in remote_keys()), "pushed"
    assert tick(project)["batches"] == [], "nothing is read twice"


def test_s3_stopped_while_a_batch_is_copied_leaves_the_dataset_untouched(
        project: Path, moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image validated, then the outage during the copy into the dataset (the second read)."""
    from cpcsam.data import storage

    batch = make_batch("batch-001", 4, seed=13)
    upload(batch)
    real_read = storage.read_bytes
    image_reads: list[str] = []

    def read_then_stop(uri):
        data = real_read(uri)
        if "/images/" in str(uri):
            image_reads.append(str(uri))
        if len(image_reads) == 4 + 2 and moto.proc.poll() is None:  # 4 validated, 2 copied
            moto.stop()
        return data

    monkeypatch.setattr(storage, "read_bytes", read_then_stop)
    with pytest.raises(storage.StorageUnavailable):
        tick(project, push=False)
    assert not (project / DATASET / "images").exists() and not (project / DATASET / "annotations.json").exists()
    assert not (project / DATASET / "quarantine").exists() and no_staging_left(project)
    assert state_of(project).seen == {}

    monkeypatch.setattr(storage, "read_bytes", real_read)
    moto.start()
    upload(batch)
    assert tick(project, push=False)["batches"][0]["images_accepted"] == 4
    assert dataset_files(project) == images_of(batch)


def test_s3_hanging_mid_read_is_an_outage_not_bad_data(project: Path, moto: MotoServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A paused server (accepts connections, never answers): timeouts, retried, then the tick fails."""
    from cpcsam.data import storage

    batch = make_batch("batch-001", 3, seed=3)
    upload(batch)
    real_read = storage.read_bytes

    def read_then_hang(uri):
        data = real_read(uri)
        if str(uri).endswith("annotations.json"):
            moto.pause()
        return data

    monkeypatch.setattr(storage, "read_bytes", read_then_hang)
    with pytest.raises(storage.StorageUnavailable, match="after 3 attempt"):
        tick(project, push=False)
    assert state_of(project).seen == {} and not (project / DATASET).exists() and no_staging_left(project)

    moto.resume()  # the same server, objects intact
    monkeypatch.setattr(storage, "read_bytes", real_read)
    summary = tick(project, push=False)
    assert summary["batches"][0]["images_accepted"] == 3 and summary["batches"][0]["quarantined"] == 0
    assert set(state_of(project).seen) == set(batch)


def test_a_really_missing_image_is_still_quarantined(project: Path, moto: MotoServer) -> None:
    """The other side of the line: a 404 is bad data (missing_image), and the tick goes on."""
    import boto3

    batch = make_batch("batch-001", 3, seed=4)
    upload(batch)
    gone = next(k for k in batch if k.endswith("frame001.png"))
    boto3.client("s3").delete_object(Bucket=INCOMING, Key=gone)
    summary = tick(project, push=False)
    (report,) = summary["batches"]
    assert report["images_accepted"] == 2 and report["reasons"] == {"missing_image": 1}
    assert set(state_of(project).seen) == set(batch) - {gone}


# --------------------------------------------------------------------------- S3 outage during dvc push


def test_s3_stopped_during_dvc_push_fails_the_tick_and_the_next_tick_pushes(
        project: Path, moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch("batch-001", 4, seed=5)
    upload(batch)
    real_push = stages.push

    def stop_then_push(*args, **kwargs):
        moto.stop()
        return real_push(*args, **kwargs)

    monkeypatch.setattr(stages, "push", stop_then_push)
    with pytest.raises(stages.StageFailed, match="push"):
        tick(project)
    state = state_of(project)
    assert set(state.seen) == set(batch), "the batch is in the dataset: seen, not to be read again"
    assert state.extra.get("pending_version") is True and "data_version" not in state.extra

    monkeypatch.setattr(stages, "push", real_push)
    moto.start()
    upload(batch)  # the server is back with its objects (same ETags): nothing new to read
    summary = tick(project)
    assert summary["new_objects"] == 0 and summary["batches"] == []
    version = summary["data_version"]
    assert version and state_of(project).extra["data_version"] == version
    assert "pending_version" not in state_of(project).extra
    assert any(version.removesuffix(".dir")[2:] in k for k in remote_keys()), "the dataset version is on the remote"
    assert "in sync" in dvc(project, "status", "-c", f"{DATASET}.dvc"), "cache and remote agree"
    assert dataset_files(project) == images_of(batch)


# --------------------------------------------------------------------------- two ticks at once

DRIVER = r"""
import json, logging, os, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
sys.path.insert(0, args["repo"])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(process)d %(name)s %(levelname)s %(message)s")
from flows import retrain

real_ingest = retrain.ingest_batch

def ingest(*a):
    with open(args["events"], "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "batch": a[4]}) + "\n")
    time.sleep(args["slow_s"])  # a long critical section: the other tick surely comes while it runs
    return real_ingest(*a)

Path(args["ready"]).touch()
while not Path(args["go"]).exists():
    time.sleep(0.02)
summary = retrain.pick_up_new_data(Path(args["root"]), args["bucket"], args["prefix"], args["dataset"],
                                   r"^(.+?)_frame", 10_000_000, False, lock_wait_s=args["lock_wait_s"], ingest=ingest)
print(json.dumps(summary))
"""


@pytest.fixture
def children():
    """Processes a test starts; whatever still runs at its end (a failed assertion) is killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def _start_tick(root: Path, tmp: Path, name: str, lock_wait_s: float, slow_s: float,
                children: list[subprocess.Popen]) -> subprocess.Popen:
    args = {"repo": str(ROOT), "root": str(root), "bucket": INCOMING, "prefix": PREFIX, "dataset": DATASET,
            "lock_wait_s": lock_wait_s, "slow_s": slow_s, "events": str(tmp / "events.jsonl"),
            "ready": str(tmp / f"ready-{name}"), "go": str(tmp / f"go-{name}")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children.append(proc)
    return proc


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a tick process ended early: {p.communicate()}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"tick process failed:\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1]), err


def test_two_ticks_at_once_ingest_every_batch_exactly_once(project: Path, moto: MotoServer, tmp_path: Path,
                                                          children: list) -> None:
    """Two tick processes released at the same instant: one ingests, the other waits, then finds nothing new."""
    batches = {**make_batch("batch-001", 3, seed=6), **make_batch("batch-002", 3, seed=7)}
    upload(batches)
    procs = [_start_tick(project, tmp_path, name, lock_wait_s=60, slow_s=1.0, children=children) for name in ("a", "b")]
    for name in ("a", "b"):
        _wait_for(tmp_path / f"ready-{name}", procs)
    for name in ("a", "b"):
        (tmp_path / f"go-{name}").touch()
    results = [_finish(p) for p in procs]

    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sorted(e["batch"] for e in events) == ["batch-001", "batch-002"], f"a batch ingested twice or lost: {events}"
    assert len({e["pid"] for e in events}) == 1, "one tick did all the ingesting"
    summaries = [s for s, _ in results]
    assert sorted(len(s["batches"]) for s in summaries) == [0, 2]
    waiter_log = next(err for s, err in results if not s["batches"])
    assert "another retrain tick holds" in waiter_log and "waiting up to 60 s" in waiter_log
    assert dataset_files(project) == images_of(batches)
    assert set(state_of(project).seen) == set(batches)


def test_a_second_tick_that_cannot_wait_skips_cleanly(project: Path, moto: MotoServer, tmp_path: Path,
                                                      children: list) -> None:
    batch = make_batch("batch-001", 2, seed=8)
    upload(batch)
    first = _start_tick(project, tmp_path, "a", lock_wait_s=0, slow_s=4.0, children=children)
    _wait_for(tmp_path / "ready-a", [first])
    (tmp_path / "go-a").touch()
    _wait_for(tmp_path / "events.jsonl", [first])  # the first tick is inside its critical section
    second = _start_tick(project, tmp_path, "b", lock_wait_s=0, slow_s=0, children=children)
    _wait_for(tmp_path / "ready-b", [second])
    (tmp_path / "go-b").touch()
    skipped, log = _finish(second)
    done, _ = _finish(first)
    assert skipped["skipped"] and skipped["batches"] == [] and skipped["listed"] == 0
    assert f"another retrain tick is still running (pid {first.pid}" in log and "skipping this tick" in log
    assert [b["batch"] for b in done["batches"]] == ["batch-001"]
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 1


def test_a_killed_tick_leaves_no_stale_lock(project: Path, moto: MotoServer, children: list) -> None:
    lock = retrain.lock_path_of(project, DATASET)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); from cpcsam.files import "
         "exclusive_lock\nwith exclusive_lock(sys.argv[2], what='doomed tick'):\n print('locked', flush=True); "
         "time.sleep(600)", str(ROOT), str(lock)], stdout=subprocess.PIPE, text=True)
    children.append(holder)
    assert holder.stdout.readline().strip() == "locked"
    assert tick(project, push=False, lock_wait_s=0)["skipped"], "held while the holder lives"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    upload(make_batch("batch-001", 1, seed=9))
    summary = tick(project, push=False, lock_wait_s=0)
    assert summary["skipped"] is None and summary["batches"][0]["images_accepted"] == 1
    assert json.loads(lock.read_text())["what"].startswith("retrain tick"), "the lock file is reused, not deleted"


def _finished_run(name: str) -> SimpleNamespace:
    state = SimpleNamespace(is_completed=lambda: True, type=SimpleNamespace(value="COMPLETED"))
    return SimpleNamespace(id=name, state=state)


def test_training_in_progress_is_not_triggered_again_and_its_end_keeps_newer_data(
        project: Path, moto: MotoServer) -> None:
    """Tick A trains v1 (stubbed `run_deployment`, held open); meanwhile tick B must not train v1
    again, and may ingest a new batch (v2); A's end must not overwrite B's seen marks and version."""
    first, second = make_batch("batch-001", 2, seed=10), make_batch("batch-002", 2, seed=11)
    upload(first)
    v1 = tick(project, push=False)["data_version"]
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_training(version: str):
        calls.append(version)
        started.set()
        assert release.wait(60)
        return _finished_run("run-a")

    result: dict = {}
    a = threading.Thread(target=lambda: result.update(a=retrain.train_if_needed(project, DATASET, slow_training,
                                                                                 claim_s=600)))
    a.start()
    try:
        assert started.wait(30)
        again, run = retrain.train_if_needed(project, DATASET, slow_training, claim_s=600)
        assert run is None and not again["triggered"] and again["training_elsewhere"]["data_version"] == v1
        upload({**first, **second})
        v2 = tick(project, push=False)["data_version"]
        assert v2 != v1
    finally:
        release.set()
        a.join(60)
    assert result["a"][0]["triggered"] and calls == [v1]
    state = state_of(project)
    assert set(state.seen) == set(first) | set(second), "A's end kept B's seen marks"
    assert state.extra["data_version"] == v2 and state.extra["trained_data_version"] == v1
    assert "training" not in state.extra
    out, run = retrain.train_if_needed(project, DATASET, lambda v: calls.append(v) or _finished_run("run-b"),
                                       claim_s=600)
    assert out["triggered"] and calls == [v1, v2] and state_of(project).extra["trained_data_version"] == v2


def test_an_expired_training_claim_is_taken_over(project: Path, moto: MotoServer) -> None:
    """A tick killed while training leaves its claim in the state: it blocks only until it expires."""
    upload(make_batch("batch-001", 1, seed=12))
    version = tick(project, push=False)["data_version"]
    path = retrain.state_path_of(project, DATASET)
    state = state_of(project)
    state.extra["training"] = {"data_version": version, "holder": "dead-host:1:x", "expires_at": time.time() - 1}
    state.save(path)
    out, run = retrain.train_if_needed(project, DATASET, lambda v: _finished_run("run"), claim_s=600)
    assert out["triggered"] and state_of(project).extra["trained_data_version"] == version
