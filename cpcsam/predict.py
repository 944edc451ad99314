"""Prediction: images + prompts (or a support set) → per-entity masks, a COCO RLE JSON, overlays.

    from cpcsam.predict import predict
    summary = predict("photos/", "out/", prompts="prompts.json")             # user prompts
    summary = predict("s3://bucket/dive7/", "out/", support="support.json",  # automatic prompts
                      classes=["crab"])

Images: a file, a folder (recursively), a glob (`dives/**/*.jpg`) or an `s3://` prefix/key.

Prompts JSON: `{"<image>": [entity, ...], ...}` where `<image>` is the image's file name, its
path/URI as listed, or its name without extension; an entity is
`{"class": str, "box": [x0, y0, x1, y1]?, "points": [[x, y], ...]?, "labels": [1 | 0, ...]?}`
in original image pixels (labels default to positive). An entity with a class and no geometry
asks for an automatic prompt (needs `support`).

Support set (automatic mode): a COCO instances JSON whose image `file_name`s are relative to the
JSON's folder (or its `images/` subfolder); each class's prototype is pooled from at most
`support_per_class` of its instances (docs/METHOD.md §5). `classes` = the classes to find in every
image (default: none; per-image classes come from the prompts JSON).

Outputs under `out_dir`: `masks/<image>/<k>_<class>.png` (0/255), `predictions.json` (COCO:
images, categories, annotations with compressed RLE `segmentation` and `score` = predicted IoU),
`overlays/<image>.png`, `summary.json` (processed images and failures).

Backends (`cpcsam.inference`): `onnx` (default; `image_encoder.onnx` + `decoder_capl.onnx` from the
export stage) or `torch` (the trained `model.pt`, LoRA merged: the path the evaluation scores).

Bad input fails only its image, with a message that names it: an unreadable image, a prompt
outside the image, a malformed entity, a class without support (automatic mode). Problems with the
inputs as a whole (no image matched, prompts file not JSON, unknown `classes`) raise `DataError`.

Hostile input: the prompts JSON and the support set are read within `cpcsam.files`' size and
nesting limits; a support image's `file_name` must stay under the support set's folder (`../`
and absolute paths are refused, as in the data sources); every file written is named from the
image's and the class's names made safe (`_safe_name`: `[A-Za-z0-9._-]`, never `.`/`..`, at
most `MAX_NAME_BYTES`) and checked to lie under `out_dir` (`_output_path`), so no prompt, class
or image name can place a file anywhere else. The ONNX graphs must be ours
(`cpcsam.export.runtime.check_graph`), the `model.pt` a weights-only file.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cpcsam.errors import ConfigError, CpcSamError, DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BACKENDS = ("onnx", "torch")
# A support set may be a whole COCO annotation file (COCO 2017 train: 448 MB), which is read to
# pick a few instances per class; prompts files get the general `cpcsam.files.MAX_JSON_BYTES`.
MAX_SUPPORT_JSON_BYTES = 1024 * 1024 * 1024
# Longest file-name part made from an image or class name, in UTF-8 bytes: with the entity index
# and ".png" it stays far below the 255 bytes a file name may have on common file systems.
MAX_NAME_BYTES = 120


# ---- inputs ------------------------------------------------------------------------------------


def expand_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """File, folder, glob or `s3://` prefix (or a list of them) → sorted image paths/URIs."""
    from cpcsam.data import storage

    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for item in spec:
            out += [u for u in expand_images(item) if u not in out]
        return out
    text = str(spec)
    if storage.is_s3(text):
        if text.lower().endswith(IMAGE_SUFFIXES) and storage.exists(text):
            return [text]
        found = storage.list_files(text, IMAGE_SUFFIXES)
    elif any(ch in text for ch in "*?["):
        found = sorted(p for p in glob.glob(text, recursive=True) if p.lower().endswith(IMAGE_SUFFIXES))
    elif Path(text).is_dir():
        found = storage.list_files(text, IMAGE_SUFFIXES)
    elif Path(text).is_file():
        found = [text]
    else:
        raise DataError(f"{text}: no such image file, folder, glob or s3:// prefix")
    if not found:
        raise DataError(f"{text}: no images ({', '.join(IMAGE_SUFFIXES)}) found there")
    return found


@dataclass
class EntityPrompt:
    """One entity to segment: class and geometry in original pixels (no geometry = automatic)."""

    class_name: str
    coords: np.ndarray  # [P, 2]
    labels: np.ndarray  # [P]
    source: str = "user"  # user | auto

    @property
    def automatic(self) -> bool:
        return len(self.labels) == 0


def load_prompts(path_or_obj: str | os.PathLike | Mapping[str, Any]) -> dict[str, list[Any]]:
    """The prompts JSON as {image key: [raw entity, ...]}; DataError naming the file when malformed."""
    if isinstance(path_or_obj, Mapping):
        obj, where = dict(path_or_obj), "prompts"
    else:
        from cpcsam.files import read_json

        where = str(path_or_obj)
        obj = read_json(where, "prompts file")  # size and nesting limits: DataError naming the file
    if not isinstance(obj, dict) or not all(isinstance(v, list) for v in obj.values()):
        raise DataError(f"{where}: expected a JSON object {{image: [entity, ...]}}")
    return obj


def _number_pairs(value: Any, what: str, image: str, index: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{image}: entity {index}: {what} is not numeric: {value!r}") from exc
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.all(np.isfinite(arr)):
        raise DataError(f"{image}: entity {index}: {what} must be a list of [x, y] pairs, got {value!r}")
    return arr


def parse_entity(raw: Any, image: str, index: int, width: int, height: int) -> EntityPrompt:
    """One raw JSON entity → `EntityPrompt`, checked against the image size (DataError names both)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("class"), str) or not raw["class"]:
        raise DataError(f"{image}: entity {index}: expected an object with a non-empty 'class', got {raw!r}")
    unknown = sorted(set(raw) - {"class", "box", "points", "labels"})
    if unknown:
        raise DataError(f"{image}: entity {index}: unknown keys {unknown}")
    coords, labels = [], []
    if raw.get("box") is not None:
        try:
            box = np.asarray(raw["box"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            box = np.zeros(0)
        if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise DataError(f"{image}: entity {index}: box must be [x0, y0, x1, y1] with x1 > x0, y1 > y0, "
                            f"got {raw['box']!r}")
        coords.append(box.reshape(2, 2))
        labels += [2, 3]
    if raw.get("points") is not None:
        pts = _number_pairs(raw["points"], "points", image, index)
        point_labels = raw.get("labels", [1] * len(pts))
        if not isinstance(point_labels, list) or len(point_labels) != len(pts) or any(v not in (0, 1) for v in point_labels):
            raise DataError(f"{image}: entity {index}: labels must be one 1 (positive) or 0 (negative) per point")
        coords.append(pts)
        labels += [int(v) for v in point_labels]
    coords_arr = np.concatenate(coords) if coords else np.zeros((0, 2))
    outside = (coords_arr[:, 0] < 0) | (coords_arr[:, 0] > width) | (coords_arr[:, 1] < 0) | (coords_arr[:, 1] > height)
    if outside.any():
        raise DataError(f"{image}: entity {index} ({raw['class']}): prompt {coords_arr[outside][0].tolist()} "
                        f"lies outside the {width}x{height} image")
    return EntityPrompt(raw["class"], coords_arr.astype(np.float32), np.asarray(labels, np.int64))


def _prompt_key(uri: str, prompts: Mapping[str, Any]) -> str | None:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    for key in (uri, name, os.path.splitext(name)[0]):
        if key in prompts:
            return key
    return None


# ---- backends ----------------------------------------------------------------------------------


def configure_predict_process(backend: str) -> None:
    """Settings for a process that only predicts with `backend`, called by its entry point (which
    owns the process): the PyTorch backend runs without gradients, so its large blocks come from a
    heap that is kept whole (`keep_freed_memory`; ViT-B 28–32 → 15–16 s per image). onnxruntime
    keeps its own arena: nothing to set."""
    if backend == "torch":
        from cpcsam.training.device import keep_freed_memory

        keep_freed_memory(large_blocks_from_heap=True)


def make_backend(backend: str, onnx_dir: str | os.PathLike, model_path: str | os.PathLike, device: str,
                 threads: int | None = None):
    """A `cpcsam.inference.Predictor` over the exported graphs (`onnx`) or the trained model (`torch`)."""
    from cpcsam.export.runtime import onnx_predictor
    from cpcsam.inference import Predictor, TorchBackend

    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend == "onnx":
        return onnx_predictor(onnx_dir, device, threads)
    torch_backend = TorchBackend.from_file(model_path, device)
    return Predictor(torch_backend, torch_backend.model.crop)  # the focus crops it was trained with


def segment_image(
    engine,
    pixels: np.ndarray,
    entities: Sequence[EntityPrompt],
    prototypes: Mapping[str, torch.Tensor] | None = None,
    auto=None,
    threshold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's entities through a backend: boolean masks [N, H, W] and predicted IoUs [N].

    `pixels`: the RGB image [H, W, 3] uint8; `entities`: its prompts in original pixels (see
    `parse_entity`). A user entity's geometry is mapped to the model frame; an automatic one
    (no geometry) gets its prompt from `prototypes[class]` (`cpcsam.prompts.auto.auto_prompt`,
    settings `auto`: an `AutoConfig`, the defaults when None). Entities with different numbers
    of prompt points are padded with `LABEL_PAD`. Masks are the full-size logits > `threshold`.
    """
    from cpcsam.config import AutoConfig
    from cpcsam.modeling.transforms import coords_to_model
    from cpcsam.prompts.auto import auto_prompt
    from cpcsam.prompts.perturb import pad_points

    auto = auto if auto is not None else AutoConfig.from_params(None, "auto prompts")
    h, w = pixels.shape[:2]
    encoded = engine.encode(pixels)
    rows_c, rows_l = [], []
    for ent in entities:
        if ent.automatic:
            ap = auto_prompt(encoded.embedding[0], (prototypes or {})[ent.class_name], engine.image_size,
                             encoded.input_size, auto)
            rows_c.append(ap.coords)
            rows_l.append(ap.labels)
        else:
            rows_c.append(coords_to_model(ent.coords, (h, w), engine.image_size).numpy())
            rows_l.append(ent.labels)
    coords, labels = pad_points(rows_c, rows_l)
    out = engine.decode(encoded, torch.from_numpy(coords)[:, None], torch.from_numpy(labels)[:, None])
    return out.masks > threshold, out.iou_predictions


def rle_annotation(mask: np.ndarray) -> dict[str, Any]:
    """A boolean mask [H, W] as the COCO fields `predict` writes: `segmentation` (compressed RLE,
    `{"size": [H, W], "counts": str}`), `area` (pixels) and `bbox` ([x, y, w, h])."""
    from pycocotools import mask as mask_utils

    h, w = mask.shape
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


# ---- support set (automatic mode) ---------------------------------------------------------------


def support_prototypes(backend, support_json: str | os.PathLike, per_class: int = 5,
                       wanted: set[str] | None = None, required: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Class prototypes from a COCO support set, pooled with this backend's image encoder.

    Only the `wanted` classes are encoded (all when None); a `required` class the support set does
    not have raises DataError before any image is encoded.
    """
    from cpcsam.data import decode_mask, read_image, storage
    from cpcsam.data.masks import rle_counts_str, rle_from_annotation
    from cpcsam.files import read_json
    from cpcsam.prompts.auto import class_prototypes, mask_to_grid, masked_average

    where = str(support_json)
    coco = read_json(where, "support set", max_bytes=MAX_SUPPORT_JSON_BYTES)
    try:
        cats = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        imgs = {int(i["id"]): i for i in coco["images"]}
        anns = sorted(coco["annotations"], key=lambda a: (int(a["image_id"]), int(a.get("id", 0))))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: not a COCO instances file (images, annotations, categories): {exc}") from exc
    unknown = sorted(set(required) - set(cats.values()))
    if unknown:
        raise DataError(f"unknown class(es) {unknown} in automatic mode: the support set {where} has "
                        f"{sorted(cats.values())}")
    base = where.rsplit("/", 1)[0] if "/" in where else "."
    chosen: dict[str, list[dict]] = {}
    for ann in anns:
        name = cats.get(int(ann["category_id"]))
        if name is not None and (wanted is None or name in wanted) and len(chosen.setdefault(name, [])) < per_class:
            chosen[name].append(ann)
    by_image: dict[int, list[dict]] = {}
    for ann_list in chosen.values():
        for ann in ann_list:
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    feats: dict[str, list[torch.Tensor]] = {}
    for image_id in tqdm(sorted(by_image), desc="support", leave=False):
        info = imgs[image_id]
        uri = None
        for folder in (base, storage.join(base, "images")):
            try:  # `../` or an absolute path would read a file outside the support set's folder
                cand = storage.resolve_under(folder, str(info["file_name"]), follow_symlinks=True)
            except DataError as exc:
                raise DataError(f"{where}: support image {exc}") from exc
            if storage.exists(cand):
                uri = cand
                break
        if uri is None:
            raise DataError(f"{where}: support image {info['file_name']!r} not found next to it or in images/")
        encoded = backend.encode(read_image(uri))
        emb = encoded.embedding[0].cpu()
        grid = (int(emb.shape[-2]), int(emb.shape[-1]))
        for ann in by_image[image_id]:
            rle = rle_from_annotation(ann["segmentation"], int(info["height"]), int(info["width"]))
            mask = decode_mask(rle_counts_str(rle), int(info["height"]), int(info["width"]))
            feat = masked_average(emb, mask_to_grid(mask, encoded.input_size, backend.image_size, grid))
            if feat is not None:
                feats.setdefault(cats[int(ann["category_id"])], []).append(feat)
    return class_prototypes(feats)


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class PredictSummary:
    out_dir: str
    processed: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    num_masks: int = 0
    providers: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "processed": self.processed, "failures": self.failures,
                "num_masks": self.num_masks, "providers": self.providers}

    def report(self) -> str:
        lines = [f"predict: {len(self.processed)} image(s) done, {self.num_masks} mask(s) -> {self.out_dir}"]
        if self.failures:
            lines.append(f"predict: {len(self.failures)} image(s) FAILED:")
            lines += [f"  {f['error']}" for f in self.failures]  # each message names its image
        return "\n".join(lines)


def _safe_name(text: str) -> str:
    """A file-name part from user text (an image or class name): letters, digits and `-_.` only
    (no separator), never empty, `.` or `..`, at most `MAX_NAME_BYTES` bytes of UTF-8."""
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text)[:MAX_NAME_BYTES])
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:  # multi-byte letters
        name = name[:-1]
    return name if name.strip(".") else "_" * max(1, len(name))


def _output_path(out: Path, source: str, *parts: str) -> Path:
    """`out/<parts>`, or a DataError naming the image `source` when the parts would lead outside
    `out` (a last check: the parts are `_safe_name`s already)."""
    path = out.joinpath(*parts)
    root = os.path.normpath(os.path.abspath(out))
    if os.path.commonpath([root, os.path.normpath(os.path.abspath(path))]) != root or path.name in ("", ".", ".."):
        raise DataError(f"{source}: output file {'/'.join(parts)!r} would lie outside {out}: not written")
    return path


def predict(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    prompts: str | os.PathLike | Mapping[str, Any] | None = None,
    support: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    backend: str = "onnx",
    onnx_dir: str | os.PathLike = "artifacts/export",
    model_path: str | os.PathLike = "artifacts/train/cpcsam/model.pt",
    device: str = "auto",
    threshold: float = 0.0,
    overlays: bool = True,
    support_per_class: int = 5,
    auto_cfg: Mapping[str, Any] | None = None,
) -> PredictSummary:
    """Segment every image; see the module docstring for the inputs and the files written."""
    from cpcsam.data import read_image
    from cpcsam.evaluation.report import overlay_masks, save_png
    from cpcsam.config import AutoConfig

    if prompts is None and support is None:
        raise ConfigError("predict: give prompts (a JSON of boxes/points per image) or a support set (automatic mode)")
    uris = expand_images(images)
    table = load_prompts(prompts) if prompts is not None else {}
    engine = make_backend(backend, onnx_dir, model_path, device)
    prototypes: dict[str, torch.Tensor] = {}
    if support is not None:
        # Only the classes asked for: the global list and the class-only entities of the prompts.
        wanted = set(classes or []) | {e.get("class") for v in table.values() for e in v
                                       if isinstance(e, Mapping) and isinstance(e.get("class"), str)
                                       and e.get("box") is None and e.get("points") is None}
        prototypes = support_prototypes(engine, support, support_per_class, wanted, set(classes or []))
    unknown = sorted(set(classes or []) - set(prototypes))
    if unknown:
        raise DataError(f"unknown class(es) {unknown} in automatic mode: the support set {support} has "
                        f"no usable instance of them (have {sorted(prototypes) or 'none'})")
    auto = AutoConfig.from_params(auto_cfg, "auto prompts")

    out = Path(out_dir)
    summary = PredictSummary(str(out), providers=engine.providers)
    coco: dict[str, Any] = {"images": [], "categories": [], "annotations": []}
    category_ids: dict[str, int] = {}
    used_names: set[str] = set()
    for image_index, uri in enumerate(tqdm(uris, desc="predict")):
        try:
            pixels = read_image(uri)
            h, w = pixels.shape[:2]
            key = _prompt_key(uri, table)
            raw = table.get(key, []) if key is not None else []
            entities = [parse_entity(r, uri, i, w, h) for i, r in enumerate(raw)]
            entities += [EntityPrompt(c, np.zeros((0, 2), np.float32), np.zeros(0, np.int64)) for c in classes or []]
            if not entities:
                raise DataError(f"{uri}: no prompts for this image (key {os.path.basename(uri)!r} not in the prompts JSON)")
            for ent in entities:
                if ent.automatic and ent.class_name not in prototypes:
                    raise DataError(f"{uri}: class {ent.class_name!r} has no geometry and no support prototype "
                                    f"(automatic mode needs it in the support set; have {sorted(prototypes) or 'none'})")
            masks, scores = segment_image(engine, pixels, entities, prototypes, auto, threshold)
            stem = _safe_name(os.path.splitext(os.path.basename(uri))[0])
            name = stem if stem not in used_names else f"{stem}_{image_index}"
            mask_paths = [_output_path(out, uri, "masks", name, f"{k}_{_safe_name(ent.class_name)}.png")
                          for k, ent in enumerate(entities)]
            overlay_path = _output_path(out, uri, "overlays", f"{name}.png")
        except CpcSamError as exc:
            logger.warning("predict: %s", exc)
            summary.failures.append({"image": uri, "error": str(exc)})
            continue

        used_names.add(name)
        coco["images"].append({"id": image_index + 1, "file_name": os.path.basename(uri), "uri": uri,
                               "height": h, "width": w})
        for k, (ent, mask, score, path) in enumerate(zip(entities, masks, scores, mask_paths)):
            cid = category_ids.setdefault(ent.class_name, len(category_ids) + 1)
            save_png((mask.astype(np.uint8) * 255), path)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_index + 1, "category_id": cid,
                **rle_annotation(mask), "score": float(score), "prompt": "auto" if ent.automatic else "user",
            })
        if overlays:
            save_png(overlay_masks(pixels, list(masks), [e.class_name for e in entities]),
                     overlay_path)
        summary.processed.append(uri)
        summary.num_masks += len(entities)

    coco["categories"] = [{"id": i, "name": n} for n, i in category_ids.items()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(coco) + "\n")
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary
