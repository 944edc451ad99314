"""The registered version is an MLflow model: loaded back by alias in a fresh process, served by
`mlflow models serve`, it answers what `cpcsam predict` answers (real sqlite registry, real ONNX)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from operations import pyfunc
from operations import registry as register
from operations import tracking

from orchestration_helpers import free_port, register_small_champion

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CPCSAM_SHARED_DIR", ROOT.parent / "shared"))
TRASHCAN = SHARED / "data" / "trashcan"
MODEL = "cpcsam-oceancoco"
URI = f"models:/{MODEL}@champion"
QUIET = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CPCSAM_SERVE_THREADS": "1", "CPCSAM_SERVE_DEVICE": "cpu",
         "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _real_image(folder: Path) -> tuple[Path, list[dict]]:
    """A TrashCan image (copied) with its ground-truth boxes as prompts, or — without the shared
    data — a synthetic JPEG with made-up boxes. One entity also gets points (positive + negative)."""
    coco_path = TRASHCAN / "annotations.json"
    if coco_path.is_file():
        coco = json.loads(coco_path.read_text())
        anns: dict[int, list] = {}
        for ann in coco["annotations"]:
            anns.setdefault(ann["image_id"], []).append(ann)
        image = next(im for im in coco["images"] if len(anns.get(im["id"], [])) >= 3)
        path = folder / image["file_name"]
        path.write_bytes((TRASHCAN / "images" / image["file_name"]).read_bytes())
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in anns[image["id"]][:3]]
    else:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 255, (360, 480, 3), dtype=np.uint8)
        pixels[100:220, 150:330] = [200, 80, 40]
        path = folder / "synthetic.jpg"
        Image.fromarray(pixels).save(path, quality=92)
        boxes = [[150, 100, 330, 220], [20, 30, 120, 140], [300, 240, 460, 350]]
    names = ["crab", "rov", "trash_bag"]
    entities = [{"class": names[k], "box": box} for k, box in enumerate(boxes)]
    (x0, y0, x1, y1) = boxes[0]
    entities[0]["points"], entities[0]["labels"] = [[(x0 + x1) / 2, (y0 + y1) / 2], [x0, y0]], [1, 0]
    return path, entities


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A small calibrated CPC-SAM exported to ONNX and registered (gate passed) with its class table."""
    root = tmp_path_factory.mktemp("pyfunc")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv(tracking.TRACKING_SWITCH_ENV, raising=False)
    info = register_small_champion(root)
    assert info["version"] == "1"
    mp.setenv("MLFLOW_TRACKING_URI", info["db"])  # for `models:/` URIs in this process (load_model, download)
    image, entities = _real_image(root)
    yield {"root": root, **info, "image": image, "entities": entities}
    mp.undo()


@pytest.fixture(scope="module")
def expected(registered):
    """What `cpcsam predict` (ONNX backend, CPU) writes for the image and its prompts."""
    from cpcsam.predict import predict

    out = registered["root"] / "predict"
    summary = predict(str(registered["image"]), out, prompts={registered["image"].name: registered["entities"]},
                      onnx_dir=registered["export"], device="cpu", overlays=False)
    assert not summary.failures
    coco = json.loads((out / "predictions.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return [{**a, "class": names[a["category_id"]]} for a in coco["annotations"]]


def _assert_same_as_predict(rows: list[dict], expected: list[dict]) -> None:
    assert len(rows) == len(expected)
    for k, (row, ann) in enumerate(zip(rows, expected)):
        assert (row["image"], row["entity"], row["class"]) == (0, k, ann["class"])
        assert row["segmentation"] == ann["segmentation"], f"entity {k}: the RLE masks differ"
        assert row["area"] == ann["area"] and row["bbox"] == pytest.approx(ann["bbox"])
        assert row["score"] == pytest.approx(ann["score"], abs=1e-5)
    assert any(a["area"] > 0 for a in expected), "a model that segments nothing would compare trivially"


def test_registered_version_is_an_mlflow_model_with_signature_and_example(registered):
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    client = tracking.make_client(registered["params"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    model_id = version.tags["cpcsam.model_id"]
    logged = client.get_logged_model(model_id)
    assert version.source == logged.artifact_location and version.run_id == registered["run_id"]
    assert logged.source_run_id == registered["run_id"] and logged.status == LoggedModelStatus.READY
    run = client.get_run(registered["run_id"])
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    files = {a.path for a in client.list_logged_model_artifacts(model_id, "artifacts/export")}
    assert {"artifacts/export/image_encoder.onnx", "artifacts/export/decoder_capl.onnx",
            "artifacts/export/parity.json"} <= files

    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(URI, dst_path=str(registered["root"] / "dl")))
    meta = Model.load(str(local / "MLmodel"))
    assert meta.signature.inputs.input_names() == ["image", "prompts"]
    assert meta.signature.outputs.input_names() == list(pyfunc.OUTPUT_COLUMNS)
    example = meta.load_input_example(str(local))
    assert list(example.columns) == ["image", "prompts"] and json.loads(example["prompts"][0])[0]["class"] == "crab"
    assert json.loads((local / "serving_input_example.json").read_text())["dataframe_split"]["columns"] == ["image", "prompts"]
    assert (local / "artifacts" / "classes.json").is_file()


def test_load_by_alias_in_a_fresh_process_predicts_like_cpcsam_predict(registered, expected, tmp_path):
    request = pyfunc.request_frame([registered["image"].read_bytes()], [registered["entities"]])
    (tmp_path / "request.json").write_text(json.dumps(pyfunc.serving_json(request)))
    script = f"""
import json, mlflow, pandas as pd
model = mlflow.pyfunc.load_model({URI!r})
split = json.load(open({str(tmp_path / 'request.json')!r}))["dataframe_split"]
request = pd.DataFrame(split["data"], columns=split["columns"])
out = model.predict(request)
example = model.predict(model.input_example)
json.dump({{"rows": out.to_dict(orient="records"), "example": len(example)}}, open({str(tmp_path / 'out.json')!r}, "w"))
"""
    env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": registered["db"]}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    _assert_same_as_predict(out["rows"], expected)
    assert out["example"] == 1, "the logged input example runs"


@pytest.fixture(scope="module")
def loaded(registered):
    import mlflow

    return mlflow.pyfunc.load_model(URI, model_config={"device": "cpu", "threads": 1})


def _bad_requests(image: bytes, width: int, height: int) -> dict[str, tuple[dict, str]]:
    """name → (the `dataframe_split` body, a phrase the 400's message must contain)."""
    frame = pyfunc.request_frame
    ok_box = [1, 1, min(20, width - 1), min(20, height - 1)]

    def body(f):
        return pyfunc.serving_json(f)

    return {
        "no image": (body(frame([b""], [[{"class": "crab", "box": ok_box}]])), "row 0: no image"),
        "not base64": ({"dataframe_split": {"columns": ["image", "prompts"],
                                            "data": [["%%%", json.dumps([{"class": "crab", "box": ok_box}])]]}},
                       "not valid base64"),
        "not an image": (body(frame([b"hello, not an image"], [[{"class": "crab", "box": ok_box}]])),
                         "unreadable image"),
        "outside": (body(frame([image], [[{"class": "crab", "box": [0, 0, width + 50, 10]}]])),
                    f"lies outside the {width}x{height} image"),
        "unknown class": (body(frame([image], [[{"class": "sea_dragon", "box": ok_box}]])),
                          "unknown class 'sea_dragon'"),
        "class only": (body(frame([image], [[{"class": "crab"}]])), "needs a box or points"),
        "prompts not JSON": ({"dataframe_split": {"columns": ["image", "prompts"],
                                                  "data": [[pyfunc.encode_image(image), "{not json"]]}},
                             "prompts cell is not valid JSON"),
        "no prompts": (body(frame([image], [[]])), "non-empty JSON list"),
        "prompts nested too deep": ({"dataframe_split": {"columns": ["image", "prompts"], "data": [
            [pyfunc.encode_image(image), "[" * 100_000 + "]" * 100_000]]}}, "prompts cell nests 100000 levels deep"),
        "prompts too large": (body(frame([image], [[{"class": "crab", "box": ok_box}] * (pyfunc.MAX_PROMPTS_CHARS // 30)])),
                              f"over the limit of {pyfunc.MAX_PROMPTS_CHARS}"),
        "bad box": (body(frame([image], [[{"class": "crab", "box": [30, 30, 10, 10]}]])), "box must be"),
    }


def test_bad_inputs_raise_invalid_parameter_value(registered, loaded):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    image = registered["image"].read_bytes()
    width, height = Image.open(registered["image"]).size
    for name, (body, phrase) in _bad_requests(image, width, height).items():
        split = body["dataframe_split"]
        with pytest.raises(MlflowException) as info:
            loaded.predict(pd.DataFrame(split["data"], columns=split["columns"]))
        assert info.value.get_http_status_code() == 400, name
        assert phrase in info.value.message, (name, info.value.message)
    with pytest.raises(MlflowException) as info:  # the schema: both columns are required
        loaded.predict(pd.DataFrame({"prompts": ["[]"]}))
    assert info.value.get_http_status_code() == 400 and "image" in info.value.message


def test_a_batch_of_images_gives_rows_per_entity(registered, loaded, expected):
    image = registered["image"].read_bytes()
    entities = registered["entities"]
    out = loaded.predict(pyfunc.request_frame([image, image], [entities, entities[1:2]]))
    rows = out.to_dict(orient="records")
    _assert_same_as_predict(rows[: len(entities)], expected)
    (last,) = rows[len(entities):]
    assert (last["image"], last["entity"], last["class"]) == (1, 0, entities[1]["class"])


def test_without_a_class_table_any_class_is_accepted_and_a_missing_table_is_refused(registered):
    import mlflow

    from cpcsam.errors import DataError

    client = tracking.make_client(registered["params"])
    logged = pyfunc.log_model(client, registered["run_id"], registered["export"], classes=None, name="no-classes")
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}", model_config={"device": "cpu", "threads": 1})
    out = model.predict(pyfunc.request_frame([registered["image"].read_bytes()],
                                             [[{"class": "anything at all", "box": [2, 2, 40, 40]}]]))
    assert out["class"].tolist() == ["anything at all"] and model.metadata.metadata["class_table"].startswith("none")

    gate = registered["root"] / "gate.json"
    with pytest.raises(DataError, match="nope.json: class table not found"):
        register.register_candidate(registered["run_id"] + "x", registered["params"], gate, registered["export"],
                                    classes=registered["root"] / "nope.json")


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def server(registered):
    """`mlflow models serve -m models:/cpcsam-oceancoco@champion --env-manager local` on a free port."""
    port = free_port()
    log = registered["root"] / "serve.log"
    bin_dir = str(Path(sys.executable).parent)  # the server execs `uvicorn` from PATH: the venv's
    env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": registered["db"],
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", URI, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=registered["root"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not come up on {url}; log:\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (uvicorn worker included)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_cpcsam_predict_and_survives_bad_requests(registered, expected, server):
    image = registered["image"].read_bytes()
    good = pyfunc.serving_json(pyfunc.request_frame([image], [registered["entities"]]))
    status, answer = _post(server + "/invocations", good)
    assert status == 200, answer
    _assert_same_as_predict(answer["predictions"], expected)

    width, height = Image.open(registered["image"]).size
    for name, (body, phrase) in _bad_requests(image, width, height).items():
        status, answer = _post(server + "/invocations", body)
        assert status == 400, (name, status, answer)
        assert phrase in answer["message"], (name, answer["message"][:500])
    status, answer = _post(server + "/invocations", {"dataframe_split": {"columns": ["prompts"], "data": [["[]"]]}})
    assert 400 <= status < 500 and "image" in answer.get("message", ""), (status, answer)

    status, answer = _post(server + "/invocations", good)  # still serving, same answer
    assert status == 200
    _assert_same_as_predict(answer["predictions"], expected)


def test_the_logged_model_serves_with_the_threshold_it_was_logged_with(registered, expected):
    """`log_model(threshold=)` (the registry passes `evaluate.threshold`) is the served mask threshold."""
    import mlflow

    client = tracking.make_client(registered["params"])
    logged = pyfunc.log_model(client, registered["run_id"], registered["export"], classes=None, name="low-threshold",
                              threshold=-4.0)
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}", model_config={"device": "cpu", "threads": 1})
    assert model.model_config["threshold"] == -4.0
    rows = model.predict(pyfunc.request_frame([registered["image"].read_bytes()], [registered["entities"]]))
    areas = rows["area"].tolist()
    assert all(a >= e["area"] for a, e in zip(areas, expected)) and sum(areas) > sum(e["area"] for e in expected)
