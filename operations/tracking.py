"""The one MLflow interface of the pipeline: every component logs through `stage_run`.

    from operations.tracking import stage_run

    with stage_run("train", params) as run:      # params: the typed tree (cpcsam.config.Params)
        run.log_metrics({"loss": 0.3}, step=10)
        run.log_artifact("artifacts/train/cpcsam/curve.csv")

Design
- One MLflow run per pipeline run. The Prefect flow opens a *pipeline run* and exports its id
  in `CPCSAM_MLFLOW_PARENT_RUN_ID`; each stage (a `dvc repro` child process) then opens a
  nested run under it (tag `mlflow.parentRunId`) and mirrors its metrics onto the parent as
  `<stage>/<metric>`, so pipeline runs compare side by side in the UI.
  Without a parent (plain `dvc repro` / `make run`) a stage makes its own run in experiment
  `tracking.experiment`.
- Tracking URI: `MLFLOW_TRACKING_URI`, else `tracking.uri`, else `sqlite:///mlflow.db` with
  local artifacts under `tracking.artifact_location` (the embedded default: no server).
- Lineage tags on every run: git commit + dirty flag, the `dvc.lock` hash and the hash of
  the data stages' outs, the Prefect flow-run id when there is one, the dataset profile.
- `tracking.enabled: false` (or `CPCSAM_TRACKING=off`) gives a no-op logger.
- Logging never breaks a stage: each call is retried, then downgraded to a warning (the
  stage's real outputs are DVC outs on disk, so nothing trained is lost). After repeated
  failures the logger stops trying for the rest of the stage.
- Lineage tags come from `operations.lineage`; the fail-fast check a flow calls before any
  training is `operations.preflight`.
- No secret reaches the store or the log: every param, tag and logged dict, and every message
  that names the tracking URI, goes through `cpcsam.redact` (URI passwords, AWS keys, the
  values of secret environment variables become `***`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from cpcsam.config import Params, TrackingConfig, load_config
from cpcsam.redact import redact, redact_obj
from operations.lineage import FLOW_RUN_ENV, PREFECT_FLOW_RUN_ENV, lineage_tags  # noqa: F401 (the flows read the env names here)

logger = logging.getLogger(__name__)

T = TypeVar("T")

PARENT_RUN_ENV = "CPCSAM_MLFLOW_PARENT_RUN_ID"
TRACKING_SWITCH_ENV = "CPCSAM_TRACKING"


# MLflow's own HTTP client retries 7 times with exponential back-off (minutes when a server
# is gone); our retry loop is the policy, so keep MLflow's short. Users may override.
_MLFLOW_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


# --------------------------------------------------------------------------- configuration


def tracking_config(params: Params | Mapping[str, Any] | None) -> TrackingConfig:
    """The `tracking:` section (defaults without params), with the `CPCSAM_TRACKING` switch applied.

    `params` is the typed tree, or, for a stage script outside this project's params (any DVC
    stage may log through `stage_run`), a plain mapping whose `tracking:` section is validated.
    """
    if isinstance(params, Mapping):
        cfg = TrackingConfig.from_params(params.get("tracking"))
    else:
        cfg = params.tracking if params is not None else TrackingConfig()
    switch = os.environ.get(TRACKING_SWITCH_ENV, "").strip().lower()
    if switch in {"0", "off", "false", "no"}:
        cfg = cfg.model_copy(update={"enabled": False})
    elif switch in {"1", "on", "true", "yes"}:
        cfg = cfg.model_copy(update={"enabled": True})
    return cfg


def param_value(params: Params | Mapping[str, Any] | None, *path: str) -> Any:
    """A value of the typed tree or of a plain mapping (None when absent)."""
    node: Any = params
    for key in path:
        if node is None:
            return None
        node = node.get(key) if isinstance(node, Mapping) else getattr(node, key, None)
    return node


def resolve_tracking_uri(params: Params | Mapping[str, Any] | None) -> str:
    """`MLFLOW_TRACKING_URI` wins over `tracking.uri`, which wins over the sqlite default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or str(tracking_config(params).uri)


def is_remote_uri(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in {"http", "https"}


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def database_problem(uri: str, timeout: float) -> str | None:
    """Why the database of a `postgresql://` (mysql, mssql; `+driver` allowed) store URI cannot be
    reached over TCP within `timeout`, or None (reachable, not a database URI, or a Unix socket).

    MLflow retries creating its database engine ten times with exponential back-off: a store that
    is down costs ~100 s before it gives up. A TCP connect answers "down" in milliseconds.
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in DATABASE_PORTS or not parsed.hostname:
        return None
    address = (parsed.hostname, parsed.port or DATABASE_PORTS[scheme])
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError as exc:
        return f"{address[0]}:{address[1]}: {exc.strerror or exc}"
    return None


def _load_params_file(path: str | Path = "params.yaml") -> Params | None:
    """params.yaml of the working directory, or None (tracking works with defaults)."""
    return load_config(path) if Path(path).is_file() else None


def _resolved(params: Params | Mapping[str, Any] | None) -> tuple[Any, TrackingConfig]:
    """The params (read from the working directory when None) and their tracking section."""
    params = params if params is not None else _load_params_file()
    return params, tracking_config(params)


def _configure_mlflow_env() -> None:
    for key, value in _MLFLOW_HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


def sqlite_database(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store URI (relative to the working directory, or
    `sqlite:////absolute`), or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def make_client(params: Params | None = None, uri: str | None = None):
    """An `MlflowClient` on the resolved URI (tracking and registry on the same store).

    On a sqlite store the client opens its stores at once, one process at a time (an exclusive
    lock on `<database>.lock`). MLflow creates and migrates a new database in the first process
    that opens it; two doing so together (the first two stages `make run` starts on a fresh
    clone) break it for good: of three such pairs of processes, one left it half-migrated, and
    every later process failed on it ("table _alembic_tmp_experiments already exists"), so every
    stage ran untracked. The lock is held for the opening only (milliseconds once it exists).
    """
    _configure_mlflow_env()
    from mlflow import MlflowClient

    uri = uri or resolve_tracking_uri(params)
    database = sqlite_database(uri)
    if database is None:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the tracking store
        client.search_registered_models(max_results=1)  # the registry's store opens on first use
    return client


def get_or_create_experiment(client, name: str, artifact_location: str | None, uri: str) -> str:
    """Experiment id by name; local stores get an explicit artifact root (servers choose their own)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_location and not is_remote_uri(uri):
        # one folder per experiment under the configured root
        loc = str(artifact_location).rstrip("/")
        location = f"{loc}/{name}" if "://" in loc else (Path(loc) / name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Another stage or process created it between the lookup and the create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def safe_key(name: str) -> str:
    """An MLflow-legal param/metric name: alphanumerics, `_ - . : /` and spaces (e.g. `box+points` -> `box_points`)."""
    return _INVALID_KEY_CHARS.sub("_", str(name))[:250]


def clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as MLflow takes them: legal keys, string values of at most 5000 characters, secrets masked."""
    return {safe_key(k): str(v)[:5000] for k, v in redact_obj(dict(tags)).items()}


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys with string values (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{safe_key(key)}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)
            flat[name] = text[:6000]  # MLflow's param value limit
    return flat


# --------------------------------------------------------------------------- the loggers


class NullRun:
    """The logger when tracking is off: accepts every call, logs nothing."""

    run_id: str | None = None
    parent_run_id: str | None = None
    failures = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, obj: Any, name: str) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_dataset(self, df: Any, name: str, source: str | None = None, context: str = "training") -> None: ...


@dataclass
class StageRun:
    """An open MLflow run of one stage. Every method swallows (after retries) logging errors."""

    client: Any
    run_id: str
    parent_run_id: str | None = None
    stage: str = ""
    retries: int = 3
    retry_wait_s: float = 0.5
    max_consecutive_failures: int = 5
    failures: int = 0
    _consecutive: int = field(default=0, repr=False)
    _gave_up: bool = field(default=False, repr=False)

    # -- retry policy
    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        if self._gave_up:
            return None
        # Once a call has failed for good, later calls get one attempt each until one succeeds:
        # a lost server then costs seconds, not minutes of retries, before logging stops.
        attempts = 1 if self._consecutive else self.retries
        for attempt in range(1, attempts + 1):
            try:
                result = fn(*args, **kwargs)
                self._consecutive = 0
                return result
            except Exception as exc:  # any logging failure: network, store, bad value
                if attempt < attempts:
                    logger.info("MLflow %s failed (attempt %d/%d): %s", what, attempt, attempts, redact(exc))
                    time.sleep(self.retry_wait_s * attempt)
                    continue
                self.failures += 1
                self._consecutive += 1
                logger.warning(
                    "MLflow %s failed after %d attempts, continuing without it (outputs stay on disk): %s",
                    what, attempts, redact(exc),
                )
                if self._consecutive >= self.max_consecutive_failures:
                    self._gave_up = True
                    logger.warning(
                        "MLflow logging for stage %r stopped after %d consecutive failures", self.stage, self._consecutive
                    )
        return None

    # -- public API (matches cpcsam.training.metric_logger.MetricLogger)
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Numeric metrics on the stage run, mirrored on the pipeline run as `<stage>/<key>`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = {safe_key(k): float(v) for k, v in metrics.items() if v is not None and not _is_nan(v)}
        if not clean:
            return
        own = [Metric(k, v, now, step or 0) for k, v in clean.items()]
        self._call("log_metrics", self.client.log_batch, self.run_id, metrics=own)
        if self.parent_run_id:
            mirrored = [Metric(f"{self.stage}/{k}", v, now, step or 0) for k, v in clean.items()]
            self._call("log_metrics(parent)", self.client.log_batch, self.parent_run_id, metrics=mirrored)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(redact_obj(dict(params)))
        items = [Param(k, v) for k, v in flat.items()]
        # log_batch takes at most 100 params per call
        for i in range(0, len(items), 100):
            self._call("log_params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a whole directory (its contents under `artifact_path`)."""
        path = Path(path)
        if path.is_dir():
            self._call("log_artifacts", self.client.log_artifacts, self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._call("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)
        else:
            logger.warning("MLflow log_artifact: %s does not exist, not logged", path)

    def log_dict(self, obj: Any, name: str) -> None:
        """`obj` as JSON (or YAML for .yaml/.yml names) at artifact path `name` (secrets masked)."""
        self._call("log_dict", self.client.log_dict, self.run_id, redact_obj(obj), name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in clean_tags(tags).items()]
        if items:
            self._call("set_tags", self.client.log_batch, self.run_id, tags=items)

    def log_dataset(self, df: Any, name: str, source: str | None = None, context: str = "training") -> None:
        """Dataset lineage (`mlflow.log_input`): schema, digest and source of a pandas frame."""

        def _log() -> None:
            import warnings

            import mlflow.data
            from mlflow.entities import DatasetInput, InputTag

            with warnings.catch_warnings():  # schema-inference hints about int columns
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_pandas(df, source=redact(source) if source else source, name=name)
            entity = dataset._to_mlflow_entity()
            tag = InputTag(key="mlflow.data.context", value=context)
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=entity, tags=[tag])])

        self._call("log_input", _log)


def _is_nan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


# --------------------------------------------------------------------------- entry points


@contextlib.contextmanager
def stage_run(stage: str, params: Params | Mapping[str, Any] | None = None, run_name: str | None = None) -> Iterator[StageRun | NullRun]:
    """Open the MLflow run of one pipeline stage; close it FINISHED or FAILED.

    `params` is the typed params tree (read from the working directory when None):
    its `tracking:` section configures the logger, and `seed` + the stage's own section are
    logged as the run's params. If MLflow cannot be reached, the stage runs untracked (a
    warning says so); the fail-fast check belongs to `preflight`, called by the flows.
    """
    params, cfg = _resolved(params)
    if not cfg.enabled:
        yield NullRun()
        return

    uri = resolve_tracking_uri(params)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    run = _open_stage_run(stage, params, cfg, uri, parent, run_name or stage)
    if run is None:
        yield NullRun()
        return
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run._gave_up = False  # always try to close the run
        run._call("set_terminated", run.client.set_terminated, run.run_id, status)


def _open_stage_run(
    stage: str, params: Params | Mapping[str, Any] | None, cfg: TrackingConfig, uri: str, parent: str | None,
    run_name: str,
) -> StageRun | None:
    retries = int(cfg.retries)
    wait = float(cfg.retry_wait_s)

    def _create():
        problem = database_problem(uri, float(cfg.preflight_timeout_s))
        if problem:  # before MLflow's own ~100 s of engine retries
            raise ConnectionError(f"database unreachable ({problem})")
        client = make_client(uri=uri)
        if parent:
            experiment_id = client.get_run(parent).info.experiment_id
        else:
            experiment_id = get_or_create_experiment(client, str(cfg.experiment), cfg.artifact_location, uri)
        tags = {
            "cpcsam.stage": stage,
            **lineage_tags(".", list(cfg.data_stages)),
        }
        profile = param_value(params, "data", "profile")
        if profile:
            tags["cpcsam.profile"] = str(profile)
        if parent:
            tags["mlflow.parentRunId"] = parent
        created = client.create_run(experiment_id, tags=clean_tags(tags), run_name=run_name)
        return client, created.info.run_id

    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            client, run_id = _create()
            break
        except Exception as exc:
            last = exc
            if attempt < retries:
                time.sleep(wait * attempt)
    else:
        logger.warning("MLflow at %s unavailable, stage %r runs untracked: %s", redact(uri), stage, redact(last))
        return None

    run = StageRun(
        client=client,
        run_id=run_id,
        parent_run_id=parent,
        stage=stage,
        retries=retries,
        retry_wait_s=wait,
        max_consecutive_failures=int(cfg.max_consecutive_failures),
    )
    logged: dict[str, Any] = {}
    if params is not None:
        logged["seed"] = param_value(params, "seed")
        section = param_value(params, stage)
        if section is not None:
            logged[stage] = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    if logged:
        run.log_params(logged)
    return run


@contextlib.contextmanager
def pipeline_run(
    params: Params | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    root: str | Path = ".",
) -> Iterator[StageRun | NullRun]:
    """The parent run of a whole pipeline run (opened by a flow).

    While open, `CPCSAM_MLFLOW_PARENT_RUN_ID` is set in this process's environment, so the
    stages it starts (`dvc repro` children) nest under it. Unlike `stage_run`, failing to
    create it raises: the flow must have called `preflight` first.
    """
    params, cfg = _resolved(params)
    if not cfg.enabled:
        yield NullRun()
        return
    uri = resolve_tracking_uri(params)
    client = make_client(uri=uri)
    experiment_id = get_or_create_experiment(client, str(cfg.experiment), cfg.artifact_location, uri)
    all_tags = {"cpcsam.stage": "pipeline", **lineage_tags(root, list(cfg.data_stages)), **(tags or {})}
    created = client.create_run(experiment_id, tags=clean_tags(all_tags), run_name=run_name)
    run = StageRun(
        client=client,
        run_id=created.info.run_id,
        stage="pipeline",
        retries=int(cfg.retries),
        retry_wait_s=float(cfg.retry_wait_s),
        max_consecutive_failures=int(cfg.max_consecutive_failures),
    )
    saved = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run.run_id
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if saved is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = saved
        run._gave_up = False
        run._call("set_terminated", client.set_terminated, run.run_id, status)
