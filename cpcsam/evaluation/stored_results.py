"""Evaluation results kept in a file between two stages: the `references` stage scores the
prompt-only rows once, `evaluate` adds them to its table.

The prompt-only rows (`cpcsam.evaluation.references`) depend on the data and the prompt protocols
only, never on a model, and GrabCut costs as much as all the models together: computed in a stage
of their own, DVC runs them once per data version and protocol set, beside the trainings, instead
of in every evaluation of new weights. The file says what it was computed for (`scope`: the
manifest's bytes, the seed, the images, the protocols, the overlays), and reading it for another
scope is an error that names the difference, never a table that silently mixes two runs.

Masks (the overlay panels) are stored as compressed RLE, so the file is plain, byte-reproducible JSON.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from cpcsam.errors import DataError
from cpcsam.evaluation.protocols import EvalConfig, ImageRecord, ModelResult

FORMAT = "cpcsam.stored-results/1"


def result_scope(manifest_path: str | Path, images: Sequence[ImageRecord], cfg: EvalConfig,
                 references: bool) -> dict[str, Any]:
    """What a stored result holds for: the same scope, the same numbers (every input of `evaluate_model`
    but the model: the prompts are a pure function of seed, image, entity and protocol)."""
    return {
        "manifest_md5": hashlib.md5(Path(manifest_path).read_bytes()).hexdigest(),
        "seed": cfg.seed,
        "images": [im.image_id for im in images],
        "protocols": [p.name for p in cfg.protocols],
        "num_positive": cfg.num_positive,
        "num_negative": cfg.num_negative,
        "overlay_protocol": cfg.overlay_protocol,
        "overlay_images": cfg.overlay_images,
        "references": references,
    }


def write_results(path: str | Path, results: Mapping[str, ModelResult], scope: Mapping[str, Any]) -> None:
    from cpcsam.data.masks import encode_mask
    from cpcsam.files import write_json_atomic

    models = {}
    for name, result in results.items():
        overlays = {image_id: {"size": list(masks[0].shape) if masks else [0, 0],
                               "masks": [encode_mask(m) for m in masks]}
                    for image_id, masks in result.overlays.items()}
        models[name] = {"protocols": result.protocols, "overlays": overlays, "auto_missing": result.auto_missing}
    write_json_atomic(path, {"format": FORMAT, "scope": dict(scope), "models": models})


def read_results(path: str | Path, scope: Mapping[str, Any], stage: str) -> dict[str, ModelResult]:
    """The stored results of `path` for `scope`; DataError naming the file and what differs
    (`stage`: the stage that writes it, for the hint)."""
    from cpcsam.data.masks import decode_mask
    from cpcsam.files import read_json_object

    stored = read_json_object(path, f"the results of the {stage} stage")
    if stored.get("format") != FORMAT or not isinstance(stored.get("models"), dict):
        raise DataError(f"{path}: not a stored-results file ({FORMAT}); run `dvc repro {stage}`")
    theirs = stored.get("scope") or {}
    differ = sorted(k for k in set(scope) | set(theirs) if scope.get(k) != theirs.get(k))
    if differ:
        raise DataError(f"{path}: computed for other inputs than this evaluation ({', '.join(differ)} differ); "
                        f"run `dvc repro {stage}` with the same params and manifest")
    out = {}
    try:
        for name, entry in stored["models"].items():
            overlays = {image_id: [decode_mask(c, *o["size"]) for c in o["masks"]]
                        for image_id, o in entry["overlays"].items()}
            out[name] = ModelResult(entry["protocols"], overlays, list(entry["auto_missing"]))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: a malformed model entry ({type(err).__name__}: {err}); run `dvc repro {stage}`") from None
    return out
