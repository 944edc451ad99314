"""Pipeline step `export`: the trained CPC-SAM to ONNX, parity-checked in onnxruntime.

    python -m components.export [--params params.yaml] [--model artifacts/train/model.pt] [--out artifacts/export]

Merges LoRA, exports `image_encoder.onnx` and `decoder_capl.onnx` (CaPL + prompt encoder + mask
decoder, dynamic entities and points; see `cpcsam.export.onnx`), then runs both graphs and
PyTorch on evaluation images with their ground-truth boxes and writes `parity.json`. A parity
failure fails the stage (exit 1) with the numbers; bad input exits 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from components.cli import configure_logging, stage_parser
from cpcsam.config import load_params, section
from cpcsam.errors import ConfigError, CpcSamError

log = logging.getLogger("components.export")

EXPORT_KEYS = {"opset", "device", "parity_splits", "parity_images", "parity_max_entities", "max_abs_logit_diff",
               "min_mask_iou"}
ENCODER = "image_encoder.onnx"
DECODER = "decoder_capl.onnx"
PARITY = "parity.json"


def parity_cases(images, image_size: int, max_entities: int):
    """One case per image: its entities' exact boxes (ground truth), in the model frame."""
    import numpy as np

    from cpcsam.data import read_image
    from cpcsam.export.parity import ParityCase
    from cpcsam.modeling.transforms import coords_to_model
    from cpcsam.prompts.perturb import mask_box

    cases = []
    for im in images:
        ents = im.entities[:max_entities]
        if not ents:
            continue
        pixels = np.array(read_image(im.uri))  # writable copy for torch
        boxes = [mask_box(e.mask).reshape(2, 2) for e in ents]
        coords = coords_to_model(np.stack(boxes), pixels.shape[:2], image_size).numpy()
        labels = np.tile(np.array([[2.0, 3.0]], np.float32), (len(ents), 1))
        cases.append(ParityCase(im.image_id, pixels, coords, labels))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("export", __doc__)
    parser.add_argument("--model", default="artifacts/train/model.pt")
    parser.add_argument("--manifest", default="data/ingest/manifest.parquet")
    parser.add_argument("--out", default="artifacts/export")
    args = parser.parse_args(argv)
    configure_logging()
    out = Path(args.out)
    try:
        from cpcsam.data import load_manifest
        from cpcsam.evaluation.protocols import image_records
        from cpcsam.export.onnx import describe_graph, export_decoder, export_image_encoder, prepare_for_export
        from cpcsam.export.parity import check_parity
        from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
        from cpcsam.modeling import load_cpcsam

        params = load_params(args.params, args.overrides)
        cfg = section(params, "export")
        unknown = sorted(set(cfg) - EXPORT_KEYS)
        if unknown:
            raise ConfigError(f"params export: unknown keys {unknown}; known keys are {sorted(EXPORT_KEYS)}")
        opset = int(cfg.get("opset", 17))
        model = prepare_for_export(load_cpcsam(args.model))
        export_image_encoder(model, out / ENCODER, opset)
        export_decoder(model, out / DECODER, opset)
        device = str(cfg.get("device", "cpu"))
        encoder, decoder = OnnxImageEncoder(out / ENCODER, device), OnnxDecoder(out / DECODER, device)
        images = image_records(load_manifest(args.manifest), cfg.get("parity_splits", ["test"]),
                               int(cfg.get("parity_images", 8)), int(params.get("seed", 0)))
        cases = parity_cases(images, model.image_size, int(cfg.get("parity_max_entities", 16)))
        report = check_parity(model, encoder, decoder, cases,
                              float(cfg.get("max_abs_logit_diff", 1e-4)), float(cfg.get("min_mask_iou", 0.999)))
        report["graphs"] = {ENCODER: describe_graph(out / ENCODER), DECODER: describe_graph(out / DECODER)}
        report["model"] = args.model
        (out / PARITY).write_text(json.dumps(report, indent=2) + "\n")

        from components.tracking import stage_run

        with stage_run("export", params) as run:
            run.log_metrics({k: float(report[k]) for k in
                             ("max_abs_logit_diff", "min_mask_iou", "decoder_only_max_abs_logit_diff",
                              "max_abs_embedding_diff")} | {"parity_passed": float(report["passed"])})
            run.log_artifact(str(out / PARITY), "export")
    except CpcSamError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    numbers = (f"max |Δlogit| {report['max_abs_logit_diff']:.2e} (≤ {report['max_abs_logit_diff_threshold']:.0e}), "
               f"min mask IoU {report['min_mask_iou']:.5f} (≥ {report['min_mask_iou_threshold']}) "
               f"on {len(report['cases'])} images")
    if not report["passed"]:
        print(f"export: ONNX PARITY FAILED: {numbers}; details in {out / PARITY}", file=sys.stderr)
        return 1
    print(f"export: {out / ENCODER}, {out / DECODER}; parity ok: {numbers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
