"""Hostile input beyond data files: each test plants the attack and checks what stops it.

- prompts/class/image names that would lead `cpcsam predict` outside `--out`, support-set file
  names that would read outside the support folder;
- JSON too large or nested too deep (prompts file, support set, a serving request's prompts);
- a checkpoint that is a pickle with code (SAM checkpoint, model.pt, training checkpoint,
  embedding cache), and every `torch.load` of the code base is weights-only;
- an ONNX file that is not one of our graphs;
- `params.yaml` values of the wrong type, through a stage CLI.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "export"))
from export_helpers import export_small_model  # noqa: E402

from cpcsam.cli import main as cli_main  # noqa: E402
from cpcsam.errors import CheckpointError, DataError  # noqa: E402
from cpcsam.files import MAX_JSON_BYTES, MAX_JSON_DEPTH, json_depth, parse_json  # noqa: E402
from cpcsam.predict import MAX_NAME_BYTES, _safe_name, predict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOX = [4, 4, 40, 30]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """`onnx/` (the two exported graphs) and `model.pt` of one small CPC-SAM."""
    return export_small_model(tmp_path_factory.mktemp("hostile_models"))


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ---- 1. names that would lead outside --out --------------------------------------------------

DEEP_ESCAPE = "/".join([".."] * 8) + "/escaped"


def _predict_cli(models: Path, work: Path, prompts: dict, capsys) -> Path:
    """`cpcsam predict work/in --out work/out` with `prompts`; asserts exit 0, returns the out folder."""
    (work / "prompts.json").write_text(json.dumps(prompts))
    code = cli_main(["predict", str(work / "in"), "--out", str(work / "out"), "--prompts", str(work / "prompts.json"),
                     "--onnx-dir", str(models / "onnx"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err  # every image done: hostile names are made safe, not fatal
    return work / "out"


def test_prompt_and_class_names_never_write_outside_out(models: Path, tmp_path: Path, capsys) -> None:
    work = tmp_path / "a" / "b" / "c"
    _image(work / "in" / "img0.png", 0)
    _image(work / "in" / "img1.png", 1)
    prompts = {
        "img0": [{"class": DEEP_ESCAPE, "box": BOX},                    # ../../…/escaped
                 {"class": "/tmp/absolute_escape", "box": BOX},         # an absolute path
                 {"class": "..", "box": BOX}],
        "img1.png": [{"class": "crab", "box": BOX}],
        "../../img1": [{"class": "never_used", "box": BOX}],           # keys are lookups, not paths
        "/etc/img0.png": [{"class": "never_used", "box": BOX}],
    }
    before = _files(tmp_path)
    out = _predict_cli(models, work, prompts, capsys)
    new = _files(tmp_path) - before - {work / "prompts.json"}
    outside = [p for p in new if out.resolve() not in p.resolve().parents]
    assert not outside, f"written outside --out: {outside}"
    masks = sorted(p.name for p in (out / "masks" / "img0").iterdir())
    assert masks == ["0_" + DEEP_ESCAPE.replace("/", "_") + ".png", "1__tmp_absolute_escape.png", "2___.png"]
    assert [p.name for p in (out / "masks" / "img1").iterdir()] == ["0_crab.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == [] and len(summary["processed"]) == 2


def test_a_class_name_longer_than_a_file_name_is_shortened_not_fatal(models: Path, tmp_path: Path, capsys) -> None:
    _image(tmp_path / "in" / "img0.png")
    out = _predict_cli(models, tmp_path, {"img0": [{"class": "x" * 5000, "box": BOX}]}, capsys)
    assert [p.name for p in (out / "masks" / "img0").iterdir()] == [f"0_{'x' * MAX_NAME_BYTES}.png"]
    assert json.loads((out / "predictions.json").read_text())["categories"] == [{"id": 1, "name": "x" * 5000}]


@pytest.mark.parametrize("text", ["..", ".", "", "../../x", "/etc/passwd", "a/b\\c", "\x00", "é" * 200, "x" * 10_000])
def test_safe_names_are_one_plain_file_name_part(text: str) -> None:
    name = _safe_name(text)
    assert name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES


def _support_set(root: Path, file_name: str) -> Path:
    """A one-image COCO support set under root/support whose image is `file_name`."""
    coco = {"images": [{"id": 1, "file_name": file_name, "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "crab"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]], "area": 600, "bbox": [10, 10, 30, 20]}]}
    path = root / "support" / "support.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize("escape", ["../private.png", "ABSOLUTE"])
def test_support_set_file_names_cannot_read_outside_its_folder(models: Path, tmp_path: Path, escape: str) -> None:
    private = _image(tmp_path / "private.png", 3)  # exists, and is a valid image: only the path check stops it
    file_name = str(private) if escape == "ABSOLUTE" else escape
    support = _support_set(tmp_path, file_name)
    _image(tmp_path / "in" / "img0.png")
    with pytest.raises(DataError, match=r"support\.json: support image .*(escapes the data root|absolute path)"):
        predict(tmp_path / "in", tmp_path / "out", support=support, classes=["crab"],
                onnx_dir=models / "onnx", device="cpu")


# ---- 2. JSON too large or too deep ------------------------------------------------------------


def test_a_deeply_nested_prompts_file_is_one_line_not_a_recursion_error(models: Path, tmp_path: Path, capsys) -> None:
    _image(tmp_path / "in" / "img0.png")
    prompts = tmp_path / "deep.json"
    prompts.write_text('{"img0": ' + "[" * 200_000 + "]" * 200_000 + "}")
    code = cli_main(["predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--prompts", str(prompts),
                     "--onnx-dir", str(models / "onnx"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"cpcsam predict: {prompts}: prompts file nests 200001 levels deep, over the limit of {MAX_JSON_DEPTH}"


def test_a_huge_prompts_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    from cpcsam.data import storage

    prompts = tmp_path / "huge.json"
    with open(prompts, "wb") as handle:  # sparse: the size without the disk space or the time
        handle.truncate(MAX_JSON_BYTES + 1)
    monkeypatch.setattr(storage, "read_text", lambda uri: pytest.fail(f"{uri} was read"))
    _image(tmp_path / "in" / "img0.png")
    with pytest.raises(DataError, match=rf"huge\.json: prompts file is {MAX_JSON_BYTES + 1} bytes, over the limit"):
        predict(tmp_path / "in", tmp_path / "out", prompts=prompts, onnx_dir=tmp_path / "unused")


def test_a_serving_request_s_prompts_are_size_and_depth_limited() -> None:
    from operations.pyfunc import MAX_PROMPTS_CHARS, parse_prompts

    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(DataError, match=rf"row 0: prompts cell nests 100000 levels deep, over the limit of {MAX_JSON_DEPTH}"):
        parse_prompts(deep, "row 0", 64, 48)
    huge = json.dumps([{"class": "crab", "box": BOX}] * (MAX_PROMPTS_CHARS // 30))
    with pytest.raises(DataError, match=rf"row 1: prompts cell is {len(huge)} characters, over the limit of {MAX_PROMPTS_CHARS}"):
        parse_prompts(huge, "row 1", 64, 48)
    assert len(parse_prompts(json.dumps([{"class": "crab", "box": BOX}] * 100), "row 2", 64, 48)) == 100


def test_json_depth_ignores_brackets_in_strings_and_counts_without_recursion() -> None:
    assert json_depth(json.dumps({"a": "[[[{{", "b": [[1, {"c": "]]"}]]})) == 4
    assert json_depth("[" * 1_000_000) == 1_000_000
    assert parse_json('{"k": [[1]]}', "x.json", "test file") == {"k": [[1]]}


# ---- 3. pickles with code ---------------------------------------------------------------------


class _Payload:
    """Unpickling this runs `exec` (what a malicious checkpoint does): it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _malicious(path: Path, marker: Path, wrap=lambda payload: {"state_dict": payload}) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(_Payload(marker)), path)
    return path


def test_the_malicious_pickle_really_runs_code_without_weights_only(tmp_path: Path) -> None:
    """The attack is real: a plain `torch.load` of the test file creates the marker."""
    marker = tmp_path / "pwned"
    torch.load(_malicious(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def _load_sam(path: Path) -> None:
    from cpcsam.modeling import build_sam

    build_sam({"type": "small", "checkpoint": str(path)})


def _load_model_pt(path: Path) -> None:
    from cpcsam.modeling import load_cpcsam

    load_cpcsam(path)


def _predict_torch(path: Path) -> None:
    _image(path.parent / "in" / "img0.png")
    predict(path.parent / "in", path.parent / "out", prompts={"img0": [{"class": "crab", "box": BOX}]},
            backend="torch", model_path=path, device="cpu")


def _load_training_checkpoint(path: Path) -> None:
    from cpcsam.training.checkpoint import load_checkpoint

    load_checkpoint(path)


def _load_cached_embedding(path: Path) -> None:
    from cpcsam.training.embeddings import INDEX, EmbeddingStore

    (path.parent / INDEX).write_text(json.dumps({"enabled": True, "fingerprint": "f", "shape": [1],
                                                 "images": {"img0": path.name}}))
    EmbeddingStore(path.parent).get("img0")


@pytest.mark.parametrize("load, error, clean", [
    (_load_sam, CheckpointError, True),                  # model.checkpoint (SAM weights)
    (_load_model_pt, CheckpointError, True),             # the trained model.pt (export, evaluate)
    (_predict_torch, CheckpointError, True),             # cpcsam predict --backend torch
    (_load_training_checkpoint, CheckpointError, False),  # a stage resuming from its checkpoints
    (_load_cached_embedding, DataError, False),          # the embed stage's cache
], ids=["sam-checkpoint", "model.pt", "predict-torch", "training-checkpoint", "embedding-cache"])
def test_a_checkpoint_with_code_is_refused_and_never_runs(tmp_path: Path, load, error, clean) -> None:
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "files" / "evil.pt", marker)
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert not marker.exists(), "the pickle's code ran"
    assert str(path) in message and "weights" in message.lower()
    if clean:  # the files the pipeline loads through cpcsam.files.torch_load_weights
        assert message.startswith(f"{path}: refused: the ") and "Unsupported global: GLOBAL exec was not an allowed global by default)" in message
        assert "weights_only=False" not in message and "\n" not in message


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def test_every_torch_load_in_the_code_base_is_weights_only() -> None:
    """Static: the code that loads files users hand it (tests load only files they wrote)."""
    checked, unsafe = 0, []
    for folder in ("cpcsam", "components", "operations", "flows", "infra", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for call in _torch_load_calls(ast.parse(path.read_text(), str(path))):
                checked += 1
                flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    # checked >= 1: the scan found the loader (one home: cpcsam.files.torch_load_weights)
    assert checked >= 1 and not unsafe, f"torch.load without weights_only=True: {unsafe}"
    code = "".join(p.read_text() for folder in ("cpcsam", "components", "operations") for p in (ROOT / folder).rglob("*.py"))
    assert "pickle.load" not in code and "allow_pickle=True" not in code


# ---- 4. ONNX files that are not ours -----------------------------------------------------------


def _foreign_onnx(path: Path, inputs=("x",), outputs=("y",), marker: str | None = None) -> Path:
    """A tiny valid ONNX graph (Identity per input) with the given names, optionally marked."""
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in inputs]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in outputs]
    nodes = [helper.make_node("Identity", [inputs[i % len(inputs)]], [o]) for i, o in enumerate(outputs)]
    model = helper.make_model(helper.make_graph(nodes, "foreign", ins, outs), opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)  # what onnxruntime reads (onnx writes a newer IR by default)
    if marker is not None:
        model.metadata_props.add(key="cpcsam_graph", value=marker)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_an_onnx_graph_that_is_not_ours_is_refused_listing_what_was_expected(models: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from cpcsam.export.runtime import DECODER_INPUTS, OnnxDecoder, OnnxImageEncoder

    foreign = _foreign_onnx(tmp_path / "other" / "model.onnx")
    with pytest.raises(CheckpointError) as info:
        OnnxImageEncoder(foreign, "cpu")
    assert str(info.value).startswith(f"{foreign}: not a CPC-SAM image_encoder graph exported by cpcsam.export: "
                                      "expected inputs ['image'], outputs ['image_embeddings'] (+ outputs "
                                      "['entity_keys'] with CaPL's entity module) and metadata "
                                      "cpcsam_graph='image_encoder'; this file has inputs ['x'], outputs ['y'], "
                                      "cpcsam_graph=None")
    # our names without our marker (a look-alike, or an export from before the marker): refused too
    lookalike = _foreign_onnx(tmp_path / "other" / "lookalike.onnx", tuple(DECODER_INPUTS),
                              ("masks", "iou_predictions", "low_res_masks"))
    with pytest.raises(CheckpointError, match="cpcsam_graph=None"):
        OnnxDecoder(lookalike, "cpu")
    # the two real graphs swapped
    with pytest.raises(CheckpointError, match="not a CPC-SAM decoder_capl graph"):
        OnnxDecoder(models / "onnx" / "image_encoder.onnx", "cpu")
    # through `cpcsam predict`: exit 2, one line naming the file and the expected names
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    shutil.copy(models / "onnx" / "image_encoder.onnx", onnx_dir / "image_encoder.onnx")
    shutil.copy(foreign, onnx_dir / "decoder_capl.onnx")
    _image(tmp_path / "in" / "img0.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"img0": [{"class": "crab", "box": BOX}]}))
    code = cli_main(["predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--prompts", str(prompts),
                     "--onnx-dir", str(onnx_dir), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"cpcsam predict: {onnx_dir / 'decoder_capl.onnx'}: not a CPC-SAM decoder_capl graph")
    assert "expected inputs ['image_embeddings', 'point_coords'" in err


def test_our_exported_graphs_carry_the_marker(models: Path) -> None:
    import onnx

    for name, role in (("image_encoder.onnx", "image_encoder"), ("decoder_capl.onnx", "decoder_capl")):
        meta = {p.key: p.value for p in onnx.load(str(models / "onnx" / name), load_external_data=False).metadata_props}
        assert meta["cpcsam_graph"] == role


# ---- 5. params.yaml of the wrong types, through a stage CLI -------------------------------------


@pytest.mark.parametrize("content, key", [
    ("train:\n  steps: many\n", "train.steps"),                  # a word where a number goes
    ("train: [1, 2]\n", "train"),                               # a list where a section goes
    ("evaluate:\n  sigmas: {a: 1}\n", "evaluate.sigmas"),       # a mapping where a list goes
    ("export:\n  device: [cpu]\n", "export.device"),            # a list where a string goes
    ("seed: 1.5\n", "seed"),                                    # a fraction where an integer goes
])
def test_params_of_the_wrong_type_fail_a_stage_with_one_line_and_exit_2(tmp_path: Path, capsys, monkeypatch,
                                                                        content: str, key: str) -> None:
    from components import validate

    monkeypatch.setenv("CPCSAM_TRACKING", "off")
    params = tmp_path / "params.yaml"
    params.write_text(content)
    code = validate.main(["--params", str(params), "--manifest", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2
    assert err.startswith(f"validate: {params}: {key}: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out and not (tmp_path / "o").exists()
