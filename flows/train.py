"""Prefect flow `train`: the DVC pipeline as tasks, one MLflow run, gated registration.

    prefect deployment run train/oceancoco --param profile=tiny --param 'overrides=["train.steps=5"]'
    python -m flows.train --profile tiny train.steps=5          # same flow, no server needed

1. params: `data.profile=<profile>` + `overrides` validated as one typed tree before anything runs;
2. preflight: tracking store (and the DVC remote when `push`) must answer, before any training;
3. the run gets its own git worktree of the commit (`flows.workspace`), sharing the DVC cache,
   with the overrides written into *its* params.yaml: the user's checkout is never written, and
   runs of different profiles share a worker without touching each other;
4. one task per DVC stage, in the order DVC gives (`dvc dag --dot`), each a
   `dvc repro --single-item <stage>` with retries and a timeout. DVC decides what re-runs;
   Prefect's result caching is off;
5. the stages log into nested MLflow runs under this flow's pipeline run; the registry's champion
   enters the graph as the param `gate.champion`;
6. when the graph produced `artifacts/eval/gate.json`, `operations.registry` registers the
   exported model and moves `champion` only if the gate passed.
Returns a summary dict (also logged on the MLflow run as `summary.json`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from operations import registry as register
from cpcsam.config import Params, load_config
from cpcsam.errors import ConfigError
from flows import stages
from flows.workspace import isolated_workspace
from operations import preflight, tracking
from operations.lineage import lineage_tags

_ROOT = Path(__file__).resolve().parents[1]

# Report files of the stage contracts (docs/CONTRACTS.md) also kept on the pipeline run,
# so one run page shows the whole story; stages log the rest on their nested runs.
REPORT_FILES = [
    "data/ingest/summary.json",
    "data/ingest/quarantine.json",
    "data/validate/report.json",
    "artifacts/train",
    "artifacts/eval/metrics.json",
    "artifacts/eval/table.md",
    "artifacts/eval/plots",
    "artifacts/eval/overlays",
    "artifacts/eval/gate.json",
    "artifacts/export/parity.json",
]


def project_root() -> Path:
    """The DVC project the flow runs: `CPCSAM_PROJECT_DIR`, else the repo holding this file."""
    return Path(os.environ.get("CPCSAM_PROJECT_DIR") or _ROOT).resolve()


def flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:
        return None


@task(name="preflight", cache_policy=NO_CACHE, persist_result=False)
def preflight_task(params: Params, s3: list[tuple[str | None, str | None]]) -> list[str]:
    done = preflight.preflight(params, s3_endpoints=s3)
    get_run_logger().info("preflight ok: %s", "; ".join(done) or "tracking off")
    return done


@task(name="stage-graph", cache_policy=NO_CACHE, persist_result=False)
def stage_graph_task(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    order, edges = stages.stage_graph(Path(root))
    get_run_logger().info("DVC stages in order: %s", " -> ".join(order) or "(none)")
    return order, edges


def retry_unless_refused(task, task_run, state) -> bool:
    """Prefect retry condition: retry a crash or an outage, never a stage that refused its input
    or failed a deterministic check (the same inputs would fail the same way)."""
    try:
        state.result()
    except stages.StageRefused:
        return False
    except Exception:
        return True
    return True


@task(name="dvc-repro", cache_policy=NO_CACHE, persist_result=False)
def repro_task(root: str, stage: str, env: dict[str, str], timeout_s: float, pull: bool = False) -> dict[str, Any]:
    """One DVC stage. A failure raises, and Prefect retries it per the task's policy."""
    result = stages.repro_stage(Path(root), stage, env=env, timeout=timeout_s, pull=pull)
    verb = "ran" if result["ran"] else ("restored from run cache" if result["restored_from_run_cache"] else "up to date")
    get_run_logger().info("stage %s: %s in %.1f s", stage, verb, result["seconds"])
    return result


@task(name="register", cache_policy=NO_CACHE, persist_result=False)
def register_task(root: str, run_id: str, params: Params, profile: str) -> dict[str, Any]:
    base = Path(root)
    classes = base / "data/ingest/classes.json"  # the class table the served model checks names against
    result = register.register_candidate(
        run_id, params, base / register.GATE_PATH, base / register.EXPORT_DIR, profile=profile,
        classes=classes if classes.is_file() else None,
    ).as_dict()
    logger = get_run_logger()
    if result["promoted"]:
        logger.info("gate PASSED: %s version %s is now champion", result["model_name"], result["version"])
        emit_promotion(result["model_name"], str(result["version"]), profile)
    else:
        logger.warning(
            "gate REJECTED %s version %s (champion stays %s): %s",
            result["model_name"], result["version"], result["champion_version"], "; ".join(result["reasons"]),
        )
    return result


PROMOTED_EVENT = "cpcsam.champion.promoted"


def emit_promotion(model_name: str, version: str, profile: str) -> None:
    """A Prefect event for a new champion: `predict/deepsea`'s trigger (infra/prefect.yaml) matches
    it, so batch inference follows a successful retrain without this flow knowing who listens."""
    from prefect.events import emit_event

    emit_event(event=PROMOTED_EVENT,
               resource={"prefect.resource.id": f"cpcsam.model.{model_name}", "cpcsam.model.version": version},
               payload={"profile": profile, "version": version})


@task(name="dvc-push", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def push_task(root: str) -> None:
    stages.push(Path(root), run_cache=True)


def _gate_is_a_dvc_out(root: Path) -> bool:
    """True when DVC itself recorded the gate file as an out of a stage (in dvc.lock)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return False
    data = yaml.safe_load(lock.read_text()) or {}
    target = str(register.GATE_PATH)
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            path = str(out.get("path", ""))
            if path == target or target.startswith(path.rstrip("/") + "/"):
                return True
    return False


def absolute_tracking(params: Params, root: Path) -> Params:
    """`tracking.uri` / `artifact_location` made absolute against the user's checkout, so that a
    run in a worktree logs into the same local store as `make run` there (servers are unchanged)."""
    cfg = params.tracking
    uri = tracking.resolve_tracking_uri(params)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}"
    location = cfg.artifact_location
    if location and "://" not in location and not Path(location).is_absolute():
        location = str((root / location).resolve())
    return params.model_copy(update={"tracking": cfg.model_copy(update={"uri": uri, "artifact_location": location})})


def champion_override(params: Params, profile: str) -> list[str]:
    """`gate.champion=<headline of the registry's champion>`, or nothing without one."""
    try:
        head = register.champion_headline(params, profile)
    except Exception as exc:  # no registry yet, or tracking off: no champion to compare with
        get_run_logger().info("no champion from the registry (%s)", exc)
        return []
    if not head:
        return []
    keep = {k: head.get(k) for k in ("target_dice", "base_dice", "version")}
    return [f"gate.champion={json.dumps(keep, sort_keys=True)}"]


@flow(name="train", persist_result=False, log_prints=True)
def train(
    profile: str = "oceancoco", overrides: list[str] = [], push: bool = False, pull: bool = False  # noqa: B006
) -> dict[str, Any]:
    """Run the DVC pipeline for a dataset profile, track it in MLflow, register the model when gated in.

    `push`/`pull`: exchange DVC outputs (and the run cache) with the default remote, for
    workspaces that do not keep them (Kubernetes Jobs).
    """
    logger = get_run_logger()
    root = project_root()
    all_overrides = [f"data.profile={profile}", *overrides]
    params = absolute_tracking(load_config(root / "params.yaml", all_overrides), root)  # validated before any work
    flow_cfg = params.tracking.flow

    s3 = []
    if push or pull:
        name, endpoint, bucket = stages.remote_endpoint(root)
        if name is None:
            raise ConfigError(f"{root / '.dvc/config'}: push/pull requested but no default DVC remote (core.remote)")
        s3.append((endpoint, bucket))
    preflight_task(params, s3)  # fails fast: nothing below runs
    all_overrides += champion_override(params, profile)

    fr = flow_run_id()
    summary: dict[str, Any] = {"profile": profile, "overrides": list(overrides), "stages": [], "gate": None,
                               "registration": None, "pushed": False, "flow_run_id": fr}
    with isolated_workspace(root, all_overrides, label=f"train-{profile}") as ws, tracking.pipeline_run(
        params,
        run_name=f"train-{profile}",
        tags={"cpcsam.profile": profile, "cpcsam.overrides": json.dumps(list(overrides)),
              **({"cpcsam.prefect.flow_run_id": fr} if fr else {})},
        root=ws,
    ) as run:
        summary["mlflow_run_id"] = run.run_id
        summary["workspace"] = str(ws)
        run.log_params(params.model_dump(mode="json", exclude={"tracking"}))
        env = {"MLFLOW_TRACKING_URI": params.tracking.uri,
               **({tracking.FLOW_RUN_ENV: fr} if fr else {}),
               **({tracking.PARENT_RUN_ENV: run.run_id} if run.run_id else {})}
        order, edges = stage_graph_task(str(ws))

        def run_stage(stage: str) -> dict[str, Any]:
            # No Prefect `timeout_seconds`: the task runs in a worker thread, where Prefect cannot
            # interrupt it (and warns so on every stage); `run_dvc` kills the stage's process group.
            task_ = repro_task.with_options(
                name=f"dvc-repro-{stage}", retries=flow_cfg.stage_retries,
                retry_delay_seconds=flow_cfg.stage_retry_delay_s,
                retry_condition_fn=retry_unless_refused,
            )
            return task_(str(ws), stage, env, flow_cfg.stage_timeout_s, pull)

        jobs = stages.parallel_jobs(params)
        logger.info("up to %d stage(s) at once", jobs)
        summary["stages"] = stages.run_graph(order, edges, run_stage, jobs)

        run.set_tags(lineage_tags(ws, list(params.tracking.data_stages)))
        manifest = ws / "data/ingest/manifest.parquet"
        if manifest.is_file():  # dataset lineage (mlflow.log_input): schema, digest, source
            import pandas as pd

            run.log_dataset(pd.read_parquet(manifest), name=f"manifest-{profile}", source=str(manifest), context="training")
        run.log_artifact(ws / "params.yaml", "config")  # with this run's overrides applied
        run.log_artifact(ws / "dvc.lock", "config")
        for rel in REPORT_FILES:  # a folder's contents go under reports/<folder>
            path = ws / rel
            if path.exists():
                run.log_artifact(path, str(Path("reports") / (rel if path.is_dir() else Path(rel).parent)))

        if _gate_is_a_dvc_out(ws) and (ws / register.GATE_PATH).is_file():
            gate = register.read_gate(ws / register.GATE_PATH)
            summary["gate"] = {"passed": gate["passed"], "reasons": register.reason_lines(gate)}
            if run.run_id:
                summary["registration"] = register_task(str(ws), run.run_id, params, profile)
            else:
                logger.warning("tracking is off: gate %s, nothing registered", "passed" if gate["passed"] else "rejected")
        else:
            logger.warning("dvc.yaml has no stage producing %s yet: no gate, nothing registered", register.GATE_PATH)
        if push:
            push_task(str(ws))
            summary["pushed"] = True
        run.log_dict(summary, "summary.json")
    verdict = "no gate" if summary["gate"] is None else ("PASSED" if summary["gate"]["passed"] else "REJECTED")
    print(f"train/{profile}: {len(summary['stages'])} stages, gate {verdict}, MLflow run {summary.get('mlflow_run_id')}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.train", description="Run the train flow once, locally.")
    parser.add_argument("--profile", default="oceancoco")
    parser.add_argument("--push", action="store_true", help="dvc push the results to the default remote")
    parser.add_argument("--pull", action="store_true", help="fetch unchanged stages' outputs from the remote")
    parser.add_argument("overrides", nargs="*", help="params overrides key.sub=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        summary = train(profile=args.profile, overrides=args.overrides, push=args.push, pull=args.pull)
    except (ConfigError, preflight.PreflightError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
