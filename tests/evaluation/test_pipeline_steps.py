"""The evaluate → export → gate steps end to end on a tiny synthetic dataset (real files, real models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from export_helpers import SMALL_CFG, calibrated_small_model  # noqa: E402

from components import evaluate as evaluate_step  # noqa: E402
from components import export as export_step  # noqa: E402
from components import gate as gate_step  # noqa: E402
from components import ingest as ingest_step  # noqa: E402
from components import references as references_step  # noqa: E402
from cpcsam.modeling import build_sam, save_cpcsam  # noqa: E402

FAST = [
    "-S", "evaluate.max_images=5", "-S", "evaluate.kinds=[box]", "-S", "evaluate.sigmas=[0.0, 0.2]",
    "-S", "evaluate.tta.k=2", "-S", "evaluate.tta.protocols=[box@0.2]", "-S", "evaluate.overlays=2",
    "-S", "evaluate.support_fraction=0.34", "-S", "evaluate.headline.protocol=box@0",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, project_root):
    """Tiny ingest output, a starting SAM checkpoint and a trained-looking CPC-SAM file."""
    root = tmp_path_factory.mktemp("pipeline")
    params = str(project_root / "params.yaml")
    mp = pytest.MonkeyPatch()
    mp.setenv("CPCSAM_TRACKING", "off")
    assert ingest_step.main(["--params", params, "-S", "data.profile=tiny", "--out", str(root / "ingest")]) == 0
    torch.manual_seed(0)
    torch.save(build_sam({"type": "small"}).state_dict(), root / "sam.pth")
    save_cpcsam(root / "trained" / "cpcsam" / "model.pt", calibrated_small_model(), SMALL_CFG)
    yield root, params
    mp.undo()


def _common(root: Path, params: str) -> list[str]:
    return ["--params", params, "--sam", str(root / "sam.pth"), "--trained", str(root / "trained"),
            "-S", "variants=[cpcsam]", "-S", "evaluate.splits=[val, test]"]


def test_evaluate_export_gate(workspace, capsys, monkeypatch):
    monkeypatch.setenv("CPCSAM_TRACKING", "off")
    root, params = workspace
    ev, ex, refs = root / "eval", root / "export", root / "references"
    data = ["--manifest", str(root / "ingest/manifest.parquet"), "--classes", str(root / "ingest/classes.json")]
    assert references_step.main(_common(root, params)[:2] + ["-S", "evaluate.splits=[val, test]"] + FAST + data +
                                ["--out", str(refs)]) == 0
    args = _common(root, params) + FAST + data + ["--references", str(refs / "results.json"), "--out", str(ev)]
    assert evaluate_step.main(args) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert set(metrics["models"]) == {"sam", "cpcsam", "filled_box", "grabcut"}
    assert set(metrics["protocols"]) == {"box@0", "box@0.2", "box@0.2+tta2", "auto"}
    # prompt-only references answer plain box protocols only
    assert set(metrics["models"]["filled_box"]["protocols"]) == {"box@0", "box@0.2"}
    head = metrics["headline"]
    assert set(head["references"]) == {"filled_box", "grabcut"}
    assert head["model"] == "cpcsam" and head["protocol"] == "box@0" and 0.0 <= head["target_dice"] <= 1.0
    support = metrics["images"]["auto_support"]
    assert support and metrics["images"]["auto_queries"] == 5 - len(support)
    compact = json.loads((ev / "scores.json").read_text())
    assert compact["cpcsam"]["box@0"]["target_dice"] == metrics["models"]["cpcsam"]["protocols"]["box@0"]["target"]["dice"]
    for name in ("table.md", "dice_vs_noise.csv", "plots/class_dice.png", "plots/dice_vs_noise.png"):
        assert (ev / name).stat().st_size > 0
    assert len(list((ev / "overlays").glob("*.png"))) == 2
    assert "| cpcsam | box@0.2+tta2 |" in (ev / "table.md").read_text()
    assert (ev / "dice_vs_noise.csv").read_text().splitlines()[0].startswith("sigma,")

    assert export_step.main(["--params", params, "--model", str(root / "trained/cpcsam/model.pt"), "--manifest",
                             str(root / "ingest/manifest.parquet"), "--out", str(ex), "-S", "export.parity_images=2",
                             "-S", "export.parity_splits=[val, test]"]) == 0
    parity = json.loads((ex / "parity.json").read_text())
    assert parity["passed"] and len(parity["cases"]) == 2
    assert (ex / "image_encoder.onnx").is_file() and (ex / "decoder_capl.onnx").is_file()

    gate_args = ["--params", params, "--metrics", str(ev / "metrics.json"), "--parity", str(ex / "parity.json")]
    relaxed = ["-S", "gate.min_target_dice=0.0", "-S", "gate.beat_reference=null"]
    assert gate_step.main(gate_args + ["--out", str(root / "gate_ok.json"), *relaxed]) == 0
    ok = json.loads((root / "gate_ok.json").read_text())
    assert ok["passed"] is True and ok["champion_source"] == "none"
    # A champion far better on base classes: the regression check rejects (exit 0: a verdict, not an error).
    champion = '{target_dice: 0.9, base_dice: 0.95, version: "3"}'
    assert gate_step.main(gate_args + ["--out", str(root / "gate_bad.json"), *relaxed, "-S", f"gate.champion={champion}"]) == 0
    bad = json.loads((root / "gate_bad.json").read_text())
    assert bad["passed"] is False and bad["champion_source"] == "registry version 3"
    assert [r["check"] for r in bad["reasons"] if not r["passed"]] == ["max_base_regression"]
    # The untrained test model loses to the box it is prompted with: the default gate refuses it.
    assert gate_step.main(gate_args + ["--out", str(root / "gate_box.json"), "-S", "gate.min_target_dice=0.0"]) == 0
    box = json.loads((root / "gate_box.json").read_text())
    assert [r["check"] for r in box["reasons"] if not r["passed"]] == ["beats_reference"]
    assert "REJECTED" in capsys.readouterr().out


def test_bad_inputs_exit_2_with_one_line(workspace, capsys, monkeypatch):
    monkeypatch.setenv("CPCSAM_TRACKING", "off")
    root, params = workspace
    missing = root / "nope.pt"
    args = _common(root, params) + ["--trained", str(missing), "--manifest", str(root / "ingest/manifest.parquet"),
                                    "--classes", str(root / "ingest/classes.json"), "--out", str(root / "e2")]
    assert evaluate_step.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing / "cpcsam" / "model.pt") in err[0]
    assert gate_step.main(["--params", params, "--metrics", str(root / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
    typo = _common(root, params) + ["-S", "evaluate.sigma=[0.3]", "--manifest", str(root / "ingest/manifest.parquet"),
                                    "--classes", str(root / "ingest/classes.json"), "--out", str(root / "e3")]
    assert evaluate_step.main(typo) == 2
    assert "unknown key 'evaluate.sigma'; did you mean 'evaluate.sigmas'" in capsys.readouterr().err


def test_threshold_auto_scores_each_model_at_its_own_validation_threshold(workspace, capsys, monkeypatch):
    """`evaluate.threshold: auto` picks each model's threshold on the val split and scores the test
    split with it: the numbers are those of a run at that fixed threshold, model by model."""
    monkeypatch.setenv("CPCSAM_TRACKING", "off")
    root, params = workspace
    data = ["--manifest", str(root / "ingest/manifest.parquet"), "--classes", str(root / "ingest/classes.json"),
            "-S", "evaluate.references=false", "-S", "evaluate.auto.enabled=false", "-S", "evaluate.tta.k=1"]
    common = _common(root, params) + FAST + data + ["-S", "evaluate.splits=[test]"]
    grid = "[-40.0, -2.0, 0.0, 40.0]"  # ±40: (almost) the whole frame / nothing, never the best
    assert evaluate_step.main(common + ["-S", "evaluate.threshold=auto", "-S", f"evaluate.calibration.grid={grid}",
                                        "--out", str(root / "eval_auto")]) == 0
    metrics = json.loads((root / "eval_auto" / "metrics.json").read_text())
    chosen = {name: entry["threshold"] for name, entry in metrics["calibration"]["models"].items()}
    assert set(chosen) == {"sam", "cpcsam"} and metrics["calibration"]["split"] == "val"
    assert all(t in (-2.0, 0.0) for t in chosen.values()), chosen
    assert metrics["headline"]["threshold"] == chosen["cpcsam"]
    assert "Mask thresholds (`evaluate.threshold: auto`" in (root / "eval_auto" / "table.md").read_text()
    for name, threshold in chosen.items():
        assert metrics["models"][name]["threshold"] == threshold
        out = root / f"eval_fixed_{name}"
        assert evaluate_step.main(common + ["-S", f"evaluate.threshold={threshold}", "--out", str(out)]) == 0
        fixed = json.loads((out / "metrics.json").read_text())
        assert fixed["models"][name]["protocols"] == metrics["models"][name]["protocols"]
        assert "threshold" not in fixed["models"][name] and "calibration" not in fixed

    # calibrating on a split that is also evaluated is refused before any work
    args = common + ["-S", "evaluate.threshold=auto", "-S", "evaluate.splits=[val, test]", "--out", str(root / "x")]
    assert evaluate_step.main(args) == 2
    assert "a threshold chosen on the images it is judged on is tuned on test" in capsys.readouterr().err


def test_stored_references_are_the_rows_evaluate_would_compute(workspace, capsys, monkeypatch):
    """The `references` stage's file, read back for the same scope, holds exactly what scoring the
    prompt-only engines in the evaluate process gives (numbers and overlay masks); read for another
    scope, or missing, it stops evaluate with one line naming the file."""
    import numpy as np

    from cpcsam.config import load_config
    from cpcsam.data import load_classes, load_manifest, read_image
    from cpcsam.evaluation.protocols import EvalConfig, image_records, score_models
    from cpcsam.evaluation.references import reference_engines
    from cpcsam.evaluation.stored_results import read_results, result_scope

    monkeypatch.setenv("CPCSAM_TRACKING", "off")
    root, params = workspace
    manifest, out = root / "ingest/manifest.parquet", root / "refs_contract"
    data = ["--manifest", str(manifest), "--classes", str(root / "ingest/classes.json")]
    overrides = [*FAST, "-S", "evaluate.splits=[test]", "-S", "evaluate.kinds=[box, box+points, points]"]
    assert references_step.main(["--params", params, *overrides, *data, "--out", str(out)]) == 0

    p = load_config(params, [o for o in overrides if o != "-S"])
    cfg = EvalConfig.from_section(p.evaluate, p.stage_seed("evaluate"))
    images = image_records(load_manifest(manifest), p.evaluate.splits, p.evaluate.max_images, cfg.seed)
    classes = load_classes(root / "ingest/classes.json")
    here = score_models(reference_engines(), images, classes["base"], classes["target"], cfg,
                        lambda im: np.array(read_image(im.uri)))
    stored = read_results(out / "results.json", result_scope(manifest, images, cfg, True), "references")
    assert list(stored) == ["filled_box", "grabcut"]
    assert "box+points@0" in stored["grabcut"].protocols and "points@0" not in stored["grabcut"].protocols
    for name, result in here.items():
        assert stored[name].protocols == result.protocols
        assert stored[name].overlays.keys() == result.overlays.keys() and result.overlays
        for image_id, masks in result.overlays.items():
            assert all(np.array_equal(a, b) for a, b in zip(stored[name].overlays[image_id], masks, strict=True))

    evaluate = _common(root, params) + data + ["--references", str(out / "results.json"), "--out", str(root / "e4")]
    capsys.readouterr()  # the progress bars above
    assert evaluate_step.main(evaluate + overrides + ["-S", "evaluate.sigmas=[0.0, 0.2, 0.5]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refs_contract/results.json" in err[0] and "(protocols differ)" in err[0], err
    assert "dvc repro references" in err[0]
    missing = [a if a != str(out / "results.json") else str(root / "none.json") for a in evaluate]
    assert evaluate_step.main(missing + overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.json" in err[0] and "not found" in err[0], err
    # evaluate.references false: the stage writes no row and evaluate reads no file
    assert references_step.main(["--params", params, *overrides, *data, "--out", str(root / "no_refs"),
                                 "-S", "evaluate.references=false"]) == 0
    assert json.loads((root / "no_refs" / "results.json").read_text())["models"] == {}
    assert evaluate_step.main(missing + overrides + ["-S", "evaluate.references=false"]) == 0
    assert set(json.loads((root / "e4" / "metrics.json").read_text())["models"]) == {"sam", "cpcsam"}


def test_forked_workers_score_what_this_process_scores(workspace):
    """The same numbers and overlay masks from the two forked workers (one torch thread) as from
    this process (two): the results cross the process boundary whole, each under its own name."""
    import numpy as np

    from cpcsam.config import load_config
    from cpcsam.data import load_classes, load_manifest, read_image
    from cpcsam.evaluation.protocols import EvalConfig, image_records, score_models
    from cpcsam.evaluation.references import reference_engines

    root, params = workspace
    p = load_config(params, [o for o in FAST if o != "-S"])
    cfg = EvalConfig.from_section(p.evaluate, p.stage_seed("evaluate"))
    images = image_records(load_manifest(root / "ingest/manifest.parquet"), p.evaluate.splits, 3, cfg.seed)
    classes = load_classes(root / "ingest/classes.json")
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = score_models(reference_engines(), images, classes["base"], classes["target"], cfg,
                                            lambda im: np.array(read_image(im.uri)))
    finally:
        torch.set_num_threads(before)
    forked, here = results[1], results[2]
    assert list(forked) == list(here) == ["filled_box", "grabcut"]
    assert forked["filled_box"].protocols != forked["grabcut"].protocols  # a swap would show
    for name in here:
        assert forked[name].protocols == here[name].protocols
        assert forked[name].overlays.keys() == here[name].overlays.keys() and here[name].overlays
        for image_id, masks in here[name].overlays.items():
            assert all(np.array_equal(a, b) for a, b in zip(forked[name].overlays[image_id], masks, strict=True))


def _small_model_eval(workspace, overrides: list[str]):
    """(engine of the trained-looking CPC-SAM, images, classes, EvalConfig) of the tiny workspace."""
    import numpy as np

    from cpcsam.config import load_config
    from cpcsam.data import load_classes, load_manifest, read_image
    from cpcsam.evaluation.protocols import EvalConfig, image_records
    from cpcsam.inference import Predictor
    from cpcsam.modeling import load_cpcsam

    root, params = workspace
    p = load_config(params, overrides)
    cfg = EvalConfig.from_section(p.evaluate, p.stage_seed("evaluate"))
    images = image_records(load_manifest(root / "ingest/manifest.parquet"), p.evaluate.splits, 4, cfg.seed)
    engine = Predictor.from_model(load_cpcsam(str(root / "trained/cpcsam/model.pt"), fold_lora=True))
    return engine, images, load_classes(root / "ingest/classes.json"), cfg, lambda im: np.array(read_image(im.uri))


MIXED = ["evaluate.kinds=[box, points]", "evaluate.sigmas=[0.0, 0.1, 0.2]", "evaluate.tta.k=2",
         "evaluate.tta.protocols=[box@0.1, box@0.2]", "evaluate.auto.enabled=false", "evaluate.overlays=4",
         "evaluate.overlay_protocol=points@0.1"]


def test_protocols_decoded_together_score_as_each_decoded_alone(workspace):
    """One decoder call for several protocols of an image gives each protocol the numbers and
    masks of its own call (`batch_entities=1`: one protocol per call), boxes, points and TTA mixed."""
    from dataclasses import replace

    import numpy as np

    from cpcsam.evaluation.protocols import evaluate_model

    engine, images, classes, cfg, load = _small_model_eval(workspace, MIXED)
    assert len(cfg.protocols) == 8 and sum(len(im.entities) for im in images) >= 8
    together = evaluate_model(engine, images, classes["base"], classes["target"], [], cfg, load)
    alone = evaluate_model(engine, images, classes["base"], classes["target"], [], replace(cfg, batch_entities=1), load)
    # To float32 rounding: a product over more rows may round differently (`_prompt_batches`).
    numbers = _numbers(together.protocols)
    assert len(numbers) > 100 and numbers == pytest.approx(_numbers(alone.protocols), rel=1e-4, abs=1e-6, nan_ok=True)
    assert together.overlays.keys() == alone.overlays.keys() and together.overlays
    for image_id, masks in together.overlays.items():
        assert all(np.mean(a != b) < 1e-3 for a, b in zip(alone.overlays[image_id], masks, strict=True))


def _numbers(tree, path: str = "") -> dict[str, float]:
    """The numbers of nested dicts and lists by path, None as NaN (for `pytest.approx`)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {} if isinstance(tree, str) else {path: float("nan") if tree is None else float(tree)}
    return {p: v for key, sub in items for p, v in _numbers(sub, f"{path}/{key}").items()}


def test_a_decoder_call_takes_protocols_of_one_prompt_shape_up_to_batch_entities(workspace):
    from dataclasses import replace

    from cpcsam.evaluation.protocols import _prompt_batches

    _, images, _, cfg, _ = _small_model_eval(workspace, MIXED)
    image = max(images, key=lambda im: len(im.entities))
    n = len(image.entities)
    names = lambda batches: [[p.name for p, _ in batch] for batch in batches]  # noqa: E731
    # boxes (K' 1, P 2), points (1, 1), boxes under TTA (2, 2): one call per shape
    assert names(_prompt_batches(cfg.protocols, image, replace(cfg, batch_entities=8 * n))) == [
        ["box@0", "box@0.1", "box@0.2"], ["points@0", "points@0.1", "points@0.2"], ["box@0.1+tta2", "box@0.2+tta2"]]
    # at most batch_entities entities per call; a protocol with more than that is a call of its own
    assert names(_prompt_batches(cfg.protocols, image, replace(cfg, batch_entities=2 * n))) == [
        ["box@0", "box@0.1"], ["box@0.2"], ["points@0", "points@0.1"], ["points@0.2"], ["box@0.1+tta2", "box@0.2+tta2"]]
    assert len(_prompt_batches(cfg.protocols, image, replace(cfg, batch_entities=1))) == 8
    for batch in _prompt_batches(cfg.protocols, image, cfg):
        assert all(len(prompts) == n for _, prompts in batch)  # every entity of the image, per protocol
