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
    workloads = _by_kind("Deployment") + _by_kind("StatefulSet") + _by_kind("Job")
    for service in _by_kind("Service"):
        selector = service["spec"]["selector"]
        targets = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"service {service['metadata']['name']} selects no workload"
        ports = {p["containerPort"] for w in targets for c in _containers(w) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports  # targetPort defaults to port


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
    gpu = {"oceancoco-gpu"} if "k8s" in prefect_yaml else set()  # the GPU pool exists on Kubernetes only
    assert set(deployments) == {"oceancoco", "deepsea-watch", "deepsea"} | gpu
    for name in gpu:
        flows_name, _ = _flow_signature(deployments[name]["entrypoint"])
        assert flows_name == "train"
        deployments.pop(name)
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


# ---- schema validation (kubernetes-validate: the Kubernetes OpenAPI schemas, offline) -------------

K8S_VERSION = "1.31.0"


def _validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # strict: unknown fields are errors


def test_every_manifest_passes_the_kubernetes_schema() -> None:
    import kubernetes_validate

    docs = _manifests()
    assert {"Job", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}
    for doc in docs:
        _validate(doc)
    # the check bites: a misspelt field and a wrong type are refused
    (job,) = _by_kind("Job")
    broken = json.loads(json.dumps(job))
    broken["spec"]["completion"] = broken["spec"].pop("completions")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)
    broken = json.loads(json.dumps(job))
    broken["spec"]["parallelism"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def _rendered_job(job_variables: dict) -> dict:
    """The flow-run Job the Kubernetes worker submits: the base job template rendered with Prefect's
    own templating (defaults, then the deployment's job variables), then the two rewrites the
    worker makes (prefect-kubernetes): `env` mapping → list of name/value, `command` string → args."""
    import shlex

    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "work-pool-base-job-template.json").read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(job_variables)
    values.update({"name": "train-oceancoco", "command": "prefect flow-run execute"})
    config = apply_values(template["job_configuration"], values)
    job = config["job_manifest"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = shlex.split(container["args"])
    return job


@pytest.mark.parametrize("deployment", ["oceancoco", "oceancoco-gpu"])
def test_the_work_pool_renders_each_deployment_to_a_valid_job(deployment: str) -> None:
    doc = yaml.safe_load((K8S / "prefect.yaml").read_text())
    (dep,) = [d for d in doc["deployments"] if d["name"] == deployment]
    job = _rendered_job(dep["work_pool"].get("job_variables", {}))
    _validate(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    overrides = dict(o.split("=", 1) for o in dep["parameters"]["overrides"])
    # one training process per GPU the pod gets
    assert gpus == int(overrides.get("train.distributed.nproc_per_node", 0))
    if gpus:
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert dep["work_pool"]["name"] == "cpcsam-k8s"
    else:
        assert pod["nodeSelector"] == {} and pod["tolerations"] == []
    shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"


def test_the_multinode_job_agrees_with_itself_and_with_the_train_stage() -> None:
    (job,) = _by_kind("Job")
    (service,) = [s for s in _by_kind("Service") if s["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"]]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = container["args"][0]
    lines = script.split("torchrun", 1)[1].split("\n")
    last = next(i for i, line in enumerate(lines) if not line.rstrip().endswith("\\"))  # continuation lines
    torchrun = " ".join(line.strip().rstrip("\\") for line in lines[: last + 1])
    flags = dict(re.findall(r"--([\w-]+)=(\S+)", torchrun))
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(flags["nnodes"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(flags["nproc-per-node"])
    assert flags["node-rank"] == '"${JOB_COMPLETION_INDEX}"'
    host, port = flags["rdzv-endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # pod 0 behind the headless Service
    assert service["spec"]["clusterIP"] == "None" and int(port) == service["spec"]["ports"][0]["port"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert flags["rdzv-backend"] == "c10d"
    # the training command is the train stage's, for the variant it pulls and pushes
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]["cmd"].replace("${item}", "cpcsam")
    assert stage.replace("python ", "", 1) in " ".join(torchrun.split())
    assert "dvc pull --with-deps train@cpcsam" in script and "dvc push train@cpcsam" in script
    claims = {c["metadata"]["name"] for c in _by_kind("PersistentVolumeClaim")}
    mounts = {v["name"]: v for v in pod["volumes"]}
    assert mounts["checkpoints"]["persistentVolumeClaim"]["claimName"] in claims
    (claim,) = _by_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node reads the checkpoint on resume
