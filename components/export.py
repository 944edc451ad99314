"""Pipeline step `export`: the trained CPC-SAM to ONNX, parity-checked in onnxruntime.

    python -m components.export [--params params.yaml] [--model artifacts/train/cpcsam/model.pt] [--out artifacts/export]

Merges LoRA, exports `image_encoder.onnx` and `decoder_capl.onnx` (CaPL + prompt encoder + mask
decoder, dynamic entities and points; see `cpcsam.export.onnx`), then runs both graphs and
PyTorch on evaluation images with their ground-truth boxes and writes `parity.json`. The checks
are `cpcsam.export.parity`'s, with the tolerances of params `export`: `max_abs_logit_diff` (the
absolute part of the logit tolerance), `logit_rtol`, `max_abs_prob_diff`, `min_mask_iou`.

Exit codes (`components.cli`; an orchestrator retries only what a retry can change):
- 0: exported, parity passed.
- 2: bad input (params, checkpoint, manifest): a retry fails the same way.
- 3: exported, but onnxruntime does not reproduce PyTorch. The one stderr line starts with
  `export: ONNX PARITY FAILED` (`PARITY_FAILED`) and lists the failed checks; parity.json has the
  numbers. Deterministic for a given model, data and params: DO NOT RETRY (fix the export or
  the model; a retry runs the same computation and fails the same way).
- anything else (1 from an uncaught exception, a signal): a crash, possibly transient.
"""

from __future__ import annotations

import sys
from pathlib import Path

from components.cli import EXIT_CHECK_FAILED, CheckFailed, stage_main

MODEL = "artifacts/train/cpcsam/model.pt"
MANIFEST = "data/ingest/manifest.parquet"
ENCODER = "image_encoder.onnx"
DECODER = "decoder_capl.onnx"
PARITY = "parity.json"
EXIT_PARITY_FAILED = EXIT_CHECK_FAILED  # 3
PARITY_FAILED = "export: ONNX PARITY FAILED"  # what stderr (and so DVC's output) says on exit 3


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


def tolerances(cfg):
    """The parity tolerances of params `export` (`logit_rtol` and `max_abs_prob_diff` default
    when the params schema does not list them)."""
    from cpcsam.export.parity import Tolerances

    return Tolerances(
        max_abs_logit_diff=float(cfg.max_abs_logit_diff),
        logit_rtol=float(cfg.logit_rtol),
        max_abs_prob_diff=float(cfg.max_abs_prob_diff),
        min_mask_iou=float(cfg.min_mask_iou),
    )


def summary(report) -> str:
    return (f"max |Δlogit| {report['max_abs_logit_diff']:.2e} = {report['max_logit_error_ratio']:.3g}× the tolerance "
            f"{report['max_abs_logit_diff_threshold']:.0e} + {report['logit_rtol']:.0e}·(entity's max |logit|) (≤ 1), "
            f"max |Δσ| {report['max_abs_prob_diff']:.2e} (≤ {report['max_abs_prob_diff_threshold']:.0e}), "
            f"min mask IoU {report['min_mask_iou']:.5f} (≥ {report['min_mask_iou_threshold']}) "
            f"on {len(report['cases'])} images")


def parity_failed_message(report, path: Path) -> str:
    """The CheckFailed text (`stage_main` prefixes "export: "): marker, numbers, the first failed checks.

    One line, kept short (at most 4 failures listed, the rest are in parity.json), so that the
    marker survives in the output tail an orchestrator keeps of a failed `dvc repro`.
    """
    listed = report["failures"][:4]
    more = len(report["failures"]) - len(listed)
    failed = "; ".join(listed) + (f"; {more} more" if more > 0 else "")
    return (f"{PARITY_FAILED.removeprefix('export: ')} (exit {EXIT_PARITY_FAILED}, deterministic: do not retry): "
            f"{summary(report)}; failed: {failed}; details in {path}")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--manifest", default=MANIFEST)
    parser.add_argument("--out", default="artifacts/export")


def work(params, args, run) -> str:
    from cpcsam.data import load_manifest
    from cpcsam.evaluation.protocols import image_records
    from cpcsam.export.checkpoints import write_sam_checkpoints
    from cpcsam.export.onnx import describe_graph, export_decoder, export_image_encoder, prepare_for_export
    from cpcsam.export.parity import check_parity
    from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
    from cpcsam.files import write_json_atomic
    from cpcsam.modeling import load_cpcsam
    from cpcsam.training.device import configure_process

    cfg = params.export
    # pinned, not the machine's: the parity report's float differences depend on the thread count
    configure_process(cfg.threads, large_blocks_from_heap=True)  # no gradients here
    tol = tolerances(cfg)  # bad values fail before the export
    out = Path(args.out)
    model = prepare_for_export(load_cpcsam(args.model, fold_lora=True))
    write_sam_checkpoints(model, out)  # for segment-anything's own loaders and SamPredictor
    export_image_encoder(model, out / ENCODER, cfg.opset)
    export_decoder(model, out / DECODER, cfg.opset)
    threads = cfg.threads or None
    encoder, decoder = OnnxImageEncoder(out / ENCODER, cfg.device, threads), OnnxDecoder(out / DECODER, cfg.device, threads)
    images = image_records(load_manifest(args.manifest), cfg.parity_splits, cfg.parity_images,
                           params.stage_seed("evaluate"))
    cases = parity_cases(images, model.image_size, cfg.parity_max_entities)
    report = check_parity(model, encoder, decoder, cases, max_abs_logit_diff=tol.max_abs_logit_diff,
                          min_mask_iou=tol.min_mask_iou, logit_rtol=tol.logit_rtol,
                          max_abs_prob_diff=tol.max_abs_prob_diff)
    report["graphs"] = {ENCODER: describe_graph(out / ENCODER), DECODER: describe_graph(out / DECODER)}
    report["model"] = args.model
    write_json_atomic(out / PARITY, report)
    run.log_metrics({k: float(report[k]) for k in
                     ("max_abs_logit_diff", "max_logit_error_ratio", "max_abs_prob_diff", "min_mask_iou",
                      "decoder_only_max_abs_logit_diff", "max_abs_embedding_diff")}
                    | {"parity_passed": float(report["passed"])})
    run.log_artifact(str(out / PARITY), "export")
    if not report["passed"]:
        raise CheckFailed(parity_failed_message(report, out / PARITY))
    return f"export: {out / ENCODER}, {out / DECODER}; parity ok: {summary(report)}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("export", __doc__, add_arguments, work, argv)


if __name__ == "__main__":
    sys.exit(main())
