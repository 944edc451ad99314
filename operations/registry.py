"""Model registration and gated promotion in the MLflow model registry.

    python -m operations.registry [--run-id RUN] [--params params.yaml]

Reads the evaluation gate (`artifacts/eval/gate.json`: `passed` + `reasons`), logs the
exported model (`artifacts/export/`) and the gate on the pipeline run, and registers a new
version of `cpcsam-<profile>` (name pattern `tracking.registry.model_name`):

- gate passed   → the version gets alias `champion` (moved from the previous champion);
- gate rejected → the version is registered all the same, tagged `cpcsam.verdict=rejected` with
  the failed checks in `cpcsam.gate.reasons` and its description; no alias moves.

Registering the same run twice gives the same version (idempotent). The champion's gating
numbers are stored on its version (tag `cpcsam.headline`) so the next gate can compare
against it: `champion_headline(params)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cpcsam.config import Params, load_config
from cpcsam.errors import ConfigError, CpcSamError, DataError
from cpcsam.files import read_json_object

from operations import preflight, tracking

logger = logging.getLogger(__name__)

GATE_PATH = Path("artifacts/eval/gate.json")
EXPORT_DIR = Path("artifacts/export")
MODEL_ARTIFACT_PATH = "model"


@dataclass
class Registration:
    """What happened to one candidate model."""

    model_name: str
    version: str | None
    passed: bool
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    champion_version: str | None = None
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def registry_config(params: Params | Mapping[str, Any] | None) -> dict[str, str]:
    reg = tracking.tracking_config(params).registry
    return {"model_name": reg.model_name, "champion_alias": reg.champion_alias}


def profile_of(params: Params | Mapping[str, Any]) -> str:
    profile = tracking.param_value(params, "data", "profile")
    if not profile:
        raise ConfigError("params data.profile: not set (the registered model is named after the dataset profile)")
    return str(profile)


def model_name_for(params: Params | Mapping[str, Any], profile: str | None = None) -> str:
    return registry_config(params)["model_name"].format(profile=profile or profile_of(params))


def read_gate(path: str | Path = GATE_PATH) -> dict[str, Any]:
    """The gate decision; `reasons` normalised to one sentence per check (failed ones first)."""
    gate = read_json_object(path, "gate result")  # written by the gate stage (dvc repro gate)
    if not isinstance(gate.get("passed"), bool):
        raise DataError(f"{path}: expected an object with a boolean 'passed'")
    return gate


def reason_lines(gate: Mapping[str, Any]) -> list[str]:
    """Human-readable reasons: failed checks first, each as 'FAIL check: detail' / 'ok check: detail'."""
    lines: list[tuple[bool, str]] = []
    for reason in gate.get("reasons") or []:
        if isinstance(reason, Mapping):
            ok = bool(reason.get("passed"))
            name = reason.get("check", "check")
            lines.append((ok, f"{'ok' if ok else 'FAIL'} {name}: {reason.get('detail', '')}".strip()))
        else:
            lines.append((bool(gate.get("passed")), str(reason)))
    return [text for ok, text in sorted(lines, key=lambda item: item[0])]


def _existing_version(client, name: str, run_id: str):
    for version in client.search_model_versions(f"name='{name}'"):
        if version.run_id == run_id:
            return version
    return None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="CPC-SAM: LoRA-merged SAM + CaPL, exported to ONNX")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently


def register_candidate(
    run_id: str,
    params: Params | Mapping[str, Any],
    gate_path: str | Path = GATE_PATH,
    export_dir: str | Path = EXPORT_DIR,
    profile: str | None = None,
    client=None,
    classes: str | Path | None = None,
) -> Registration:
    """Log model + gate on `run_id`, register a version, move `champion` only if the gate passed.

    The model is an MLflow pyfunc model (`operations.pyfunc`: the export folder's ONNX graphs, and
    `classes` — the ingest stage's `classes.json` — as its class table when given; without it the
    model accepts any class name), logged as a logged model of the run (tag `cpcsam.model_id` on the
    version); the version's source is that model's artifacts, so
    `mlflow.pyfunc.load_model("models:/<name>@champion")` and `mlflow models serve` work on it.
    """
    gate = read_gate(gate_path)
    export_dir = Path(export_dir)
    model_files = sorted(export_dir.glob("*.onnx")) if export_dir.is_dir() else []
    if not model_files:
        raise DataError(f"{export_dir}: no exported *.onnx model to register (run the export stage first)")

    client = client or tracking.make_client(params)
    cfg = registry_config(params)
    profile = profile or profile_of(params)
    name = model_name_for(params, profile)
    passed = bool(gate["passed"])
    reasons = reason_lines(gate)

    version = _existing_version(client, name, run_id)
    if version is None:
        from operations import pyfunc

        if classes is not None and not Path(classes).is_file():
            raise DataError(f"{classes}: class table not found (the ingest stage writes data/ingest/classes.json)")
        client.log_dict(run_id, gate, "gate/gate.json")
        client.log_metric(run_id, "gate/passed", 1.0 if passed else 0.0)
        client.set_tag(run_id, "cpcsam.gate.passed", str(passed).lower())
        client.set_tag(run_id, "cpcsam.gate.reasons", "\n".join(reasons)[:5000])
        _ensure_registered_model(client, name)
        run = client.get_run(run_id)
        tags = {
            "cpcsam.profile": profile,
            "cpcsam.gate.passed": str(passed).lower(),
            "cpcsam.gate.reasons": "\n".join(reasons)[:5000],
            "cpcsam.verdict": "passed" if passed else "rejected",
            "cpcsam.headline": json.dumps(gate.get("candidate") or {}, sort_keys=True)[:5000],
        }
        for key in ("cpcsam.git.commit", "cpcsam.git.dirty", "cpcsam.dvc.lock_md5", "cpcsam.dvc.data_md5"):
            if key in run.data.tags:
                tags[key] = run.data.tags[key]
        # The model: a pyfunc around the whole export folder (ONNX graphs, external weights, parity report).
        # Served with the mask threshold it was evaluated with: its own under `evaluate.threshold:
        # auto` (the headline says which), else `evaluate.threshold`.
        threshold = (gate.get("candidate") or {}).get("threshold")
        if threshold is None:
            threshold = tracking.param_value(params, "evaluate", "threshold")
        model = pyfunc.log_model(client, run_id, export_dir, classes, name=MODEL_ARTIFACT_PATH,
                                 tags={k: v for k, v in tags.items() if k != "cpcsam.headline"},
                                 threshold=float(threshold) if isinstance(threshold, (int, float)) else 0.0)
        tags["cpcsam.model_id"] = model.model_id
        verdict = "passed the gate" if passed else "REJECTED by the gate"
        # The source is the logged model's artifact location: a `models:/<model_id>` source would be
        # resolved by a sqlite registry through the process's *global* tracking URI, not `client`'s.
        version = client.create_model_version(
            name,
            source=model.artifact_location,
            run_id=run_id,
            tags=tags,
            description=f"{verdict}:\n" + "\n".join(reasons),
            model_id=model.model_id,
        )
        logger.info("registered %s version %s (%s)", name, version.version, verdict)
    else:
        logger.info("run %s is already %s version %s", run_id, name, version.version)

    if passed:
        client.set_registered_model_alias(name, cfg["champion_alias"], version.version)
    champion = champion_version(client, name, cfg["champion_alias"])
    return Registration(
        model_name=name,
        version=str(version.version),
        passed=passed,
        promoted=passed,
        reasons=reasons,
        champion_version=champion,
        run_id=run_id,
    )


def champion_version(client, name: str, alias: str = "champion") -> str | None:
    """The version the alias points at, or None (no model / no champion yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_headline(params: Params | Mapping[str, Any], profile: str | None = None) -> dict[str, Any] | None:
    """The gating numbers (`target_dice`, `base_dice`, ...) of the current champion, or None.

    For the gate stage: compare a candidate with the champion. None when tracking is off,
    the store is unreachable, or there is no champion yet.
    """
    cfg = tracking.tracking_config(params)
    if not cfg.enabled:
        return None
    try:
        client = tracking.make_client(params)
        name = model_name_for(params, profile)
        alias = registry_config(params)["champion_alias"]
        version = client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # no registered model/alias, or no store: no champion to compare to
        logger.info("no champion found: %s", exc)
        return None
    raw = (version.tags or {}).get("cpcsam.headline")
    return {**json.loads(raw), "version": str(version.version)} if raw else None


def outcome_of_flow_run(params: Params | Mapping[str, Any], flow_run_id: str) -> dict[str, Any] | None:
    """What a `train` flow run produced, read back from MLflow: its pipeline run, gate, version.

    None when no pipeline run carries that Prefect flow-run id (e.g. tracking was off).
    """
    client = tracking.make_client(params)
    cfg = tracking.tracking_config(params)
    experiment = client.get_experiment_by_name(str(cfg.experiment))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`cpcsam.prefect.flow_run_id` = '{flow_run_id}' and tags.`cpcsam.stage` = 'pipeline'",
    )
    if not runs:
        return None
    run = runs[0]
    outcome: dict[str, Any] = {
        "mlflow_run_id": run.info.run_id,
        "gate_passed": {"true": True, "false": False}.get(run.data.tags.get("cpcsam.gate.passed", "")),
        "registration": None,
    }
    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    if versions:
        version = versions[0]
        passed = version.tags.get("cpcsam.gate.passed") == "true"
        outcome["registration"] = Registration(
            model_name=version.name,
            version=str(version.version),
            passed=passed,
            promoted=passed,
            reasons=[r for r in version.tags.get("cpcsam.gate.reasons", "").split("\n") if r],
            champion_version=champion_version(client, version.name, registry_config(params)["champion_alias"]),
            run_id=run.info.run_id,
        ).as_dict()
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m operations.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--run-id", help="the pipeline's MLflow run (default: a new 'register' run)")
    parser.add_argument("--gate", default=str(GATE_PATH))
    parser.add_argument("--export-dir", default=str(EXPORT_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_config(args.params)
        if not tracking.tracking_config(params).enabled:
            raise ConfigError(f"{args.params}: tracking.enabled is false; nothing to register into")
        preflight.preflight(params)
        if args.run_id:
            result = register_candidate(args.run_id, params, args.gate, args.export_dir)
        else:
            with tracking.stage_run("register", params) as run:
                result = register_candidate(run.run_id, params, args.gate, args.export_dir)
    except CpcSamError as exc:
        print(f"register: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
