"""The deployment and scale-out templates in infra/ are consistent and complete (parsed, not applied)."""

from __future__ import annotations

import ast
import configparser
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
NAMESPACED = {"ConfigMap", "Secret", "Deployment", "StatefulSet", "Service", "ServiceAccount", "Role", "RoleBinding"}


def _manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "prefect.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind(kind: str) -> list[dict]:
    return [d for d in _manifests() if d["kind"] == kind]


def _containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def test_every_manifest_is_well_formed_and_namespaced() -> None:
    docs = _manifests()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Service", "Role", "RoleBinding"} <= kinds
    for doc in docs:
        assert doc.get("apiVersion") and doc["metadata"].get("name"), doc
        if doc["kind"] in NAMESPACED:
            assert doc["metadata"].get("namespace") == "cpcsam", doc["metadata"]


def test_workloads_select_their_pods_and_reference_only_defined_config() -> None:
    config_maps = {d["metadata"]["name"]: set(d["data"]) for d in _by_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in _by_kind("Secret")}
    accounts = {d["metadata"]["name"] for d in _by_kind("ServiceAccount")}
    for workload in _by_kind("Deployment") + _by_kind("StatefulSet"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        account = workload["spec"]["template"]["spec"].get("serviceAccountName")
        assert account is None or account in accounts
        for container in _containers(workload):
            assert container["name"] and container["image"]
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]]
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in config_maps[ref["configMapKeyRef"]["name"]]
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
            # the $(VAR) references of the args must be defined for the container
            defined = {e["name"] for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                defined |= secrets.get(source.get("secretRef", {}).get("name"), set())
                defined |= config_maps.get(source.get("configMapRef", {}).get("name"), set())
            for arg in container.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in defined, f"{workload['metadata']['name']}: $({var}) is not defined"


def test_services_reach_a_workload_port() -> None:
    workloads = _by_kind("Deployment") + _by_kind("StatefulSet")
    for service in _by_kind("Service"):
        selector = service["spec"]["selector"]
        targets = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"service {service['metadata']['name']} selects no workload"
        ports = {p["containerPort"] for w in targets for c in _containers(w) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports


def test_mlflow_runs_on_postgres_and_s3_with_the_known_memory_settings() -> None:
    (mlflow,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = _containers(mlflow)
    args = " ".join(container["args"])
    assert "--workers=1" in args and "--artifacts-destination=s3://" in args and "--allowed-hosts=" in args
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    (secret,) = _by_kind("Secret")
    assert secret["stringData"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert secret["stringData"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # a template never carries real credentials
    assert all("CHANGE_ME" in v for v in secret["stringData"].values())


def test_the_kubernetes_job_template_declares_every_variable_it_uses() -> None:
    template = json.loads((K8S / "work-pool-base-job-template.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, f"undeclared: {used - declared}"
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "{{ image }}" and container["args"] == "{{ command }}"
    accounts = {d["metadata"]["name"] for d in _by_kind("ServiceAccount")}
    assert template["variables"]["properties"]["service_account_name"]["default"] in accounts
    assert container["workingDir"] == "/opt/cpcsam"
    assert "WORKDIR /opt/cpcsam" in (ROOT / "infra" / "Dockerfile").read_text()


def _flow_signature(entrypoint: str) -> tuple[str, set[str]]:
    """(flow name, parameter names) of `path.py:function`, read from the source."""
    path, func = entrypoint.split(":")
    tree = ast.parse((ROOT / path).read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
    (deco,) = [d for d in fn.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "flow"]
    name = next(k.value.value for k in deco.keywords if k.arg == "name")
    return name, {a.arg for a in fn.args.args}


@pytest.mark.parametrize("prefect_yaml", ["infra/prefect.yaml", "infra/k8s/prefect.yaml"])
def test_prefect_deployments_match_the_flows(prefect_yaml: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    doc = yaml.safe_load((ROOT / prefect_yaml).read_text())
    deployments = {d["name"]: d for d in doc["deployments"]}
    assert set(deployments) == {"oceancoco", "deepsea-watch", "deepsea"}
    flows = {}
    for dep in deployments.values():
        name, params = _flow_signature(dep["entrypoint"])
        flows[dep["name"]] = name
        assert set(dep["parameters"]) <= params, f"{dep['name']}: unknown parameters {set(dep['parameters']) - params}"
        assert dep["enforce_parameter_schema"] is True
        assert dep["work_pool"]["name"]
    # train/oceancoco, retrain/deepsea-watch, predict/deepsea
    assert flows == {"oceancoco": "train", "deepsea-watch": "retrain", "deepsea": "predict"}
    for name in ("deepsea-watch", "deepsea"):
        (schedule,) = deployments[name]["schedules"]
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron
    # Batch inference follows a promotion: its trigger expects the event the train flow emits.
    from flows.train import PROMOTED_EVENT
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    (trigger,) = deployments["deepsea"]["triggers"]
    trigger = DeploymentEventTrigger(**trigger)
    assert trigger.expect == {PROMOTED_EVENT}
    assert trigger.match.model_dump()["prefect.resource.id"] == "cpcsam.model.cpcsam-oceancoco"
    assert deployments["oceancoco"]["parameters"]["profile"] == "oceancoco"


def test_the_kubernetes_worker_polls_the_pool_the_deployments_use() -> None:
    doc = yaml.safe_load((K8S / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in doc["deployments"]}
    (worker,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "prefect-worker"]
    command = " ".join(_containers(worker)[0]["args"])
    assert pools == {m for m in re.findall(r"--pool (\S+)", command)}
    assert "--type kubernetes" in command
    assert doc["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/cpcsam"


def test_dvc_remote_templates() -> None:
    local = configparser.ConfigParser()
    local.read_string((ROOT / ".dvc" / "config").read_text())
    remote = local[local["core"]["remote"].join(["'remote \"", "\"'"])]
    assert remote["url"].startswith("s3://") and remote["endpointurl"].startswith("http://127.0.0.1:")
    assert "access_key_id" not in remote and "secret_access_key" not in remote  # only in config.local
    aws = configparser.ConfigParser()
    aws.read_string("\n".join(l for l in (ROOT / "infra/dvc/config.aws.example").read_text().splitlines()
                              if not l.startswith("#")))
    section = aws[aws["core"]["remote"].join(["'remote \"", "\"'"])]
    assert section["url"].startswith("s3://") and "endpointurl" not in section
    assert "/config.local" in (ROOT / ".dvc" / ".gitignore").read_text()
