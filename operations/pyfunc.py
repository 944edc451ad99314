"""The registered CPC-SAM as an MLflow model: `mlflow.pyfunc` around the exported ONNX graphs.

    import mlflow
    from operations.pyfunc import request_frame
    model = mlflow.pyfunc.load_model("models:/cpcsam-oceancoco@champion")
    out = model.predict(request_frame([open("dive.jpg", "rb").read()],
                                      [[{"class": "crab", "box": [10, 20, 200, 180]}]]))

    make serve PROFILE=oceancoco     # mlflow models serve -m models:/cpcsam-oceancoco@champion
                                     #   --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d @request.json

Every registration (`operations.registry.register_candidate`) logs this model with `log_model`:
an MLflow 3 *logged model* of the pipeline run (an output of the run); the registered version's
source is that logged model's artifact location.

Input (the signature's input schema): a pandas DataFrame, one row per image, both columns required:
- `image` (string): the image file's bytes (JPEG, PNG, ... anything PIL decodes) in base64;
  a `data:image/...;base64,` prefix is accepted.
- `prompts` (string): a JSON list of that image's entities, each as in `cpcsam predict`'s prompts
  JSON: `{"class": str, "box": [x0, y0, x1, y1]?, "points": [[x, y], ...]?, "labels": [1 | 0, ...]?}`
  in original image pixels (labels default to positive). Every entity needs a box and/or points:
  automatic mode (class only) needs a support set and is not served.
Over HTTP: `{"dataframe_split": {"columns": ["image", "prompts"], "data": [[<base64>, <JSON>], ...]}}`
(`serving_json` builds it; `serving_input_example.json` in the model folder is an example).

Output: a DataFrame, one row per entity, in request order (HTTP: `{"predictions": [row, ...]}`):
- `image` (long): the request row; `entity` (long): the entity's index in that row's prompts;
- `class` (string); `score` (double): the predicted IoU;
- `segmentation` (object): COCO compressed RLE `{"size": [H, W], "counts": str}` — the same
  encoding `cpcsam predict` writes to predictions.json (`cpcsam.predict.rle_annotation`);
- `area` (long, pixels) and `bbox` (array of double, COCO [x, y, w, h]).

Bad input raises `MlflowException` with INVALID_PARAMETER_VALUE, which the scoring server answers
with HTTP 400 and the reason in `message` (it names the row and entity): an empty, non-base64
or undecodable image, an image over `max_pixels`, prompts that are not a JSON list of entities, an
entity without geometry, a malformed entity, a prompt outside the image, a class not in the
model's class table, a `prompts` cell over `MAX_PROMPTS_CHARS` or nested deeper than
`cpcsam.files.MAX_JSON_DEPTH` (refused before it is parsed: no RecursionError, no memory
blow-up). A request without the `image` or `prompts` column is refused by MLflow's
schema check (HTTP 400). The whole request is refused when one row is bad.

Artifacts: `export` — the export stage's folder (`image_encoder.onnx`, `decoder_capl.onnx`,
`parity.json`, any external weights), run by `cpcsam.export.runtime.onnx_predictor` (CUDA when onnxruntime
has it, see `cpcsam.export.runtime`); `classes` (optional) — the ingest stage's `classes.json`.
Without a class table any class name is accepted (the graphs do not take the class).

Model config (`model_config`; override per load with `load_model(uri, model_config={...})`; for
`mlflow models serve` use the environment variables, which win): `device` auto|cpu|cuda
(`CPCSAM_SERVE_DEVICE`), `threads` onnxruntime intra-op threads per graph, 0 = all cores
(`CPCSAM_SERVE_THREADS`), `threshold` on the mask logits (0.0, as `cpcsam predict`), `max_pixels`.

Code: the model pickles `CpcSamModel` by reference and calls `cpcsam.predict`, so the process that
loads it needs this project installed (`pip install -e .`); serve with `--env-manager local`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd

from cpcsam.errors import CpcSamError, DataError

logger = logging.getLogger(__name__)

ENCODER = "image_encoder.onnx"
DECODER = "decoder_capl.onnx"
MODEL_NAME = "model"
INPUT_COLUMNS = ("image", "prompts")
OUTPUT_COLUMNS = ("image", "entity", "class", "score", "segmentation", "area", "bbox")
DEFAULT_CONFIG: dict[str, Any] = {"device": "auto", "threads": 0, "threshold": 0.0, "max_pixels": 100_000_000}
CONFIG_ENV = {"device": "CPCSAM_SERVE_DEVICE", "threads": "CPCSAM_SERVE_THREADS"}
_REQUIREMENTS = ("mlflow", "numpy", "pandas", "pillow", "pycocotools", "torch")
# One image's entity list: 1000 entities with a box and 10 points each take ~150 KB of JSON.
MAX_PROMPTS_CHARS = 1024 * 1024


# ---- requests ----------------------------------------------------------------------------------


def encode_image(data: bytes) -> str:
    """Image file bytes → the base64 text of the `image` column."""
    return base64.b64encode(data).decode("ascii")


def request_frame(images: Sequence[bytes], prompts: Sequence[Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    """The model input for `images` (file bytes) and their entities (lists of prompt dicts)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompt lists")
    return pd.DataFrame({"image": [encode_image(b) for b in images],
                         "prompts": [json.dumps(list(p)) for p in prompts]}, columns=list(INPUT_COLUMNS))


def serving_json(frame) -> dict[str, Any]:
    """The `/invocations` body for a `request_frame`."""
    return {"dataframe_split": {"columns": list(frame.columns), "data": frame.values.tolist()}}


def decode_image(text: Any, where: str, max_pixels: int | None = None) -> np.ndarray:
    """The `image` cell (base64 of an image file) → RGB [H, W, 3] uint8; DataError naming `where`."""
    from cpcsam.data.storage import open_image

    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: no image (expected the image file's bytes as a base64 string)")
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{where}: image is not valid base64: {exc}") from exc
    return np.asarray(open_image(data, where, max_pixels).convert("RGB"), dtype=np.uint8)


def parse_prompts(text: Any, where: str, width: int, height: int, classes: Sequence[str] | None = None):
    """The `prompts` cell → `EntityPrompt`s checked against the image and the class table.

    Geometry is parsed and checked by `cpcsam.predict.parse_entity` (the `cpcsam predict` rules).
    """
    from cpcsam.files import parse_json
    from cpcsam.predict import parse_entity

    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: no prompts (expected a JSON list of entities)")
    raw = parse_json(text, where, "prompts cell", max_bytes=MAX_PROMPTS_CHARS)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: prompts must be a non-empty JSON list of entities, got {text[:200]!r}")
    entities = [parse_entity(r, where, i, width, height) for i, r in enumerate(raw)]
    for i, ent in enumerate(entities):
        if ent.automatic:
            raise DataError(f"{where}: entity {i} ({ent.class_name}): needs a box or points (automatic "
                            f"prompts from a class alone are not served)")
        if classes is not None and ent.class_name not in classes:
            raise DataError(f"{where}: entity {i}: unknown class {ent.class_name!r} (the model's classes: "
                            f"{sorted(classes)})")
    return entities


# ---- the model ---------------------------------------------------------------------------------


class CpcSamModel(mlflow.pyfunc.PythonModel):
    """CPC-SAM in onnxruntime behind the pyfunc interface (schemas in the module docstring)."""

    def load_context(self, context) -> None:
        from cpcsam.data import load_classes
        from cpcsam.export.runtime import onnx_predictor

        cfg = {**DEFAULT_CONFIG, **(context.model_config or {})}
        for key, env in CONFIG_ENV.items():
            if os.environ.get(env):
                cfg[key] = os.environ[env]
        self.config = cfg
        self.engine = onnx_predictor(context.artifacts["export"], str(cfg["device"]), int(cfg["threads"]) or None)
        path = context.artifacts.get("classes")
        self.classes = [c["name"] for c in load_classes(path)["classes"]] if path else None
        logger.info("CPC-SAM pyfunc on %s; classes: %s", self.engine.providers,
                    self.classes if self.classes is not None else "any")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # (pd.DataFrame: a hint MLflow infers no schema from; the logged signature is the schema)
        from mlflow.exceptions import MlflowException

        from cpcsam.predict import rle_annotation, segment_image

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
        if missing:
            raise MlflowException.invalid_parameter_value(
                f"input lacks column(s) {missing}: expected {list(INPUT_COLUMNS)} (see the model signature)")
        threshold = float(self.config["threshold"])
        max_pixels = int(self.config["max_pixels"]) or None
        rows: list[dict[str, Any]] = []
        for i, (image, prompts) in enumerate(zip(frame["image"], frame["prompts"])):
            where = f"row {i}"
            try:
                pixels = decode_image(image, where, max_pixels)
                h, w = pixels.shape[:2]
                entities = parse_prompts(prompts, where, w, h, self.classes)
            except CpcSamError as exc:
                raise MlflowException.invalid_parameter_value(str(exc)) from exc
            masks, scores = segment_image(self.engine, pixels, entities, threshold=threshold)
            for k, (ent, mask, score) in enumerate(zip(entities, masks, scores)):
                rows.append({"image": i, "entity": k, "class": ent.class_name, "score": float(score),
                             **rle_annotation(mask)})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


# ---- logging -----------------------------------------------------------------------------------


def signature():
    """The `ModelSignature`: the input and output schemas of the module docstring."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "prompts")])
    outputs = Schema([
        ColSpec("long", "image"), ColSpec("long", "entity"), ColSpec("string", "class"), ColSpec("double", "score"),
        ColSpec(Object([Property("size", Array("long")), Property("counts", "string")]), "segmentation"),
        ColSpec("long", "area"), ColSpec(Array("double"), "bbox"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(class_name: str = "object"):
    """A one-row request: a small synthetic 64×48 PNG and one box + point entity of `class_name`."""
    from PIL import Image

    yy, xx = np.mgrid[0:48, 0:64]
    pixels = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return request_frame([buf.getvalue()], [[{"class": class_name, "box": [8, 6, 40, 30], "points": [[24, 18]]}]])


def pip_requirements() -> list[str]:
    """The installed versions of what the model imports (onnxruntime or onnxruntime-gpu, whichever
    is installed). The `cpcsam` project itself is not on an index: serve with `--env-manager local`."""
    from importlib import metadata

    reqs = []
    for name in _REQUIREMENTS:
        reqs.append(f"{name}=={metadata.version(name)}")
    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
            break
        except metadata.PackageNotFoundError:
            continue
    return reqs


def log_model(
    client,
    run_id: str,
    export_dir: str | os.PathLike,
    classes: str | os.PathLike | None = None,
    name: str = MODEL_NAME,
    tags: Mapping[str, str] | None = None,
    threshold: float = 0.0,
):
    """Log the pyfunc model of `export_dir` as a logged model of run `run_id`, through `client`.

    All calls go through `client` (its tracking URI, not the process's global one): create the
    logged model in the run's experiment, save the model locally (signature, input example,
    config, pinned requirements; nothing is loaded or run), upload it, link it to the run as an
    output and mark it READY (FAILED when any step fails). `classes`: a `classes.json` to ship as
    the class table (checked here), or None to accept any class. Returns the `LoggedModel`;
    register it with `client.create_model_version(name, model.artifact_location, run_id, model_id=model.model_id)`.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from cpcsam.data import load_classes

    export_dir = Path(export_dir)
    for graph in (ENCODER, DECODER):
        if not (export_dir / graph).is_file():
            logger.warning("%s: no %s; the logged model will not load", export_dir, graph)
    artifacts = {"export": str(export_dir)}
    example_class = "object"
    if classes is not None:
        table = load_classes(classes)
        if not table["classes"]:
            raise DataError(f"{classes}: the class table lists no class")
        example_class = str((table["target"] or table["base"] or [table["classes"][0]["name"]])[0])
        artifacts["classes"] = str(classes)
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       tags=dict(tags or {}), model_type="cpcsam-onnx")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                local,
                python_model=CpcSamModel(),
                artifacts=artifacts,
                signature=signature(),
                input_example=input_example(example_class),
                pip_requirements=pip_requirements(),
                model_config={**DEFAULT_CONFIG, "threshold": float(threshold)},
                metadata={"class_table": "classes.json" if classes is not None else "none (any class)"},
                mlflow_model=Model(artifact_path=model.artifact_location, run_id=run_id,
                                   model_uuid=model.model_id, model_id=model.model_id),
            )
            client.log_model_artifacts(model.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        try:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        except Exception as exc:  # the original error is the one to report
            logger.warning("could not mark logged model %s FAILED: %s", model.model_id, exc)
        raise
