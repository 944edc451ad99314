"""ONNX export of a trained CPC-SAM: the image encoder, and CaPL + prompt encoder + mask decoder.

Two graphs, as in SAM's deployment: the heavy image encoder runs once per image, the light
decoder graph once per image for all of its entities.

`DecoderOnnxModel` follows the style of segment-anything's `utils/onnx.py` (`SamOnnxModel`):
points padded with label −1, box corners as labels 2/3, an optional low-resolution mask input
with a `has_mask_input` flag. It differs where CPC-SAM needs it
or where the official export is wrong:

- CaPL is inside: the task causal module calibrates the sparse tokens (K = 1 group at inference)
  and the entity causal module biases the decoder's cross attention (`CPCSAM.decode`).
- The entity gates' softmax(logits + log σ(s)) is exported exactly, without a Log and with σ on
  |s| only (`cpcsam.modeling.decoder._softmax_for_onnxruntime`): saturated gates (s ≪ 0) must keep
  their differences, which decide the attention where all of a row's gates are saturated.
- LoRA is merged into the base weights before export (`prepare_for_export`): no adapter ops.
- Both the number of entities N and the number of point slots P are dynamic axes; one graph
  serves every N and P.
- Full-size masks are right for any image size: the official export computes the crop with
  `int(tensor)`, which the tracer freezes to the example's numbers (STACK.md). Here the crop
  bounds stay tensors (`orig_im_size`-driven arithmetic), so the tracer records them as graph
  computations; the export tests compare several aspect ratios against PyTorch.
- The entity module's image-side keys are per-image work, so the encoder graph computes them
  beside the embedding (output `entity_keys`) and the decoder graph takes them as an input:
  a decoder call projects no image position for CaPL, at any N. The two graphs of a model
  without the entity module (CaPL modes other than `causal` and `entity`) have no `entity_keys`.
- The mask prompt enters where SAM adds it, the decoder's image tokens: an entity with a mask
  prompt gets an image of its own (`_images_with_mask_prompts`), so the entities without one
  still share the first block's image-side work. The entity keys read the image embedding alone,
  as in training (which has no mask prompts).
- A call without any mask prompt runs a graph without them: the module is traced twice, with
  mask prompts and without (`mask_prompts=False`: one image, which every entity reads by
  broadcasting), and the two traces are the branches of an `If` on `has_mask_input`
  (`cpcsam.export.branches`). The traced mask-prompt path selects every first-block image-side
  tensor per entity, also when all entities read image 0.
- Single-mask output (mask token 0), as CPC-SAM is trained; no multimask selection.
- The two bilinear resizes to full size are one matrix per axis, applied as products
  (`cpcsam.export.mask_resize`): onnxruntime's `Resize` runs on one thread.

Decoder inputs (float32 unless said): `image_embeddings` [1, C, h, w]; `point_coords` [N, P, 2] in
the model-input frame (x, y); `point_labels` [N, P] (−1, 0, 1, 2, 3); `mask_input` [N, 1, 4h, 4w];
`has_mask_input` [N]; `orig_im_size` [2] (H, W); `entity_keys` [1, S·H, r, hw] (modes `causal`, `entity`). Outputs: `masks` [N, 1, H, W] full-size logits,
`iou_predictions` [N, 1], `low_res_masks` [N, 1, m, m] (m = 4h, ×2 per mask refinement stage).

Each graph carries the metadata property `cpcsam_graph` (`image_encoder` / `decoder_capl`), which
`cpcsam.export.runtime` requires together with these names before it runs a file. The decoder also
carries `cpcsam_crop`, the model's focus crops (`model.crop`, JSON): the graphs answer one frame,
and the `Predictor` that `onnx_predictor` builds cuts the frames as the model was trained.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cpcsam.export.attention import chunked_global_attention
from cpcsam.export.mask_resize import postprocess_masks_as_products
from cpcsam.export.runtime import CROP_PROPERTY, DECODER_GRAPH, ENCODER_GRAPH, GRAPH_MARKER
from cpcsam.files import atomic_path
from cpcsam.modeling import CPCSAM, has_lora, merge_lora
from cpcsam.modeling.transforms import postprocess_masks_interpolated

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def prepare_for_export(model: CPCSAM) -> CPCSAM:
    """A copy of `model` in eval mode with LoRA merged into the base weights (the original is untouched)."""
    model = copy.deepcopy(model).cpu().eval()
    if has_lora(model):
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepadded_size(orig_im_size: Tensor, image_size: int) -> Tensor:
    """(h, w) of the image inside the square model frame, as int64 tensors (traceable).

    Same rounding as `cpcsam.modeling.transforms.resized_shape`: int(x·scale + 0.5).
    """
    size = orig_im_size.to(torch.float32)
    scale = image_size / torch.max(size)
    return torch.floor(size * scale + 0.5).to(torch.int64)


def postprocess_masks_traceable(low_res: Tensor, orig_im_size: Tensor, image_size: int) -> Tensor:
    """`transforms.postprocess_masks` with the sizes as tensors, so the traced graph stays exact:
    `transforms.postprocess_masks_interpolated` in PyTorch, and traced for export the same function
    as matrix products (`mask_resize.postprocess_masks_as_products`): onnxruntime's `Resize` runs on
    one thread."""
    inner = prepadded_size(orig_im_size, image_size)
    if torch.onnx.is_in_onnx_export():
        return postprocess_masks_as_products(low_res, inner, orig_im_size, image_size)
    return postprocess_masks_interpolated(low_res, inner, orig_im_size, image_size)


class DecoderOnnxModel(nn.Module):
    """CaPL + prompt encoder + mask decoder (+ mask postprocessing) of one image, N entities."""

    def __init__(self, model: CPCSAM, mask_prompts: bool = True) -> None:
        """`mask_prompts=False`: the form for calls without any (`mask_input` and `has_mask_input`
        are not read), which `export_decoder` traces as the `If`'s other branch."""
        super().__init__()
        self.model = model
        self.image_size = int(model.image_size)
        self.mask_prompts = mask_prompts

    def _images_with_mask_prompts(self, image_embeddings: Tensor, mask_input: Tensor,
                                  has_mask_input: Tensor) -> tuple[Tensor, Tensor]:
        """(images [1 + M, C, h, w], image_index [N]) for N entities of which M have a mask prompt.

        SAM adds an entity's mask prompt to the image tokens (mask_downscaling(mask) in place of
        `no_mask_embed`). `decode` shares the first block's image-side work between the entities
        of an image, so an entity with a mask prompt gets an image of its own: the embedding plus
        mask_downscaling(mask) − no_mask_embed; entities without one all read image 0. The masked
        entities are picked with NonZero in the graph, so no unmasked entity runs the mask
        downscaling; a call without any mask prompt runs the other branch of the exported `If`.
        """
        pe = self.model.sam.prompt_encoder
        flag = (has_mask_input > 0).to(torch.int64)  # N
        masked = torch.nonzero(flag).flatten()  # M
        delta = pe.mask_downscaling(mask_input[masked]) - pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        images = torch.cat([image_embeddings, image_embeddings + delta], dim=0)
        return images, flag * torch.cumsum(flag, dim=0)  # the k-th masked entity reads image k

    def forward(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor,
        entity_keys: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`entity_keys`: the encoder graph's output, for a model with the entity module (one
        image's keys, [1, S·H, r, hw]: they serve every entity, masked or not)."""
        labels = point_labels.to(torch.int64)
        sparse = self.model.embed_prompts(point_coords, labels)  # N x P x C
        one_image = torch.zeros_like(labels[:, 0])  # the plain image: a mask prompt does not move the prompt's features
        sparse = self.model.calibrate_prompts(sparse.unsqueeze(1), labels.unsqueeze(1), point_coords.unsqueeze(1),
                                              image_embeddings, one_image).squeeze(1)
        images, image_index = image_embeddings, one_image
        if self.mask_prompts:
            images, image_index = self._images_with_mask_prompts(image_embeddings, mask_input, has_mask_input)
        if entity_keys is None:  # eager use: the keys of the (unmasked) image, as the encoder graph computes them
            entity_keys = self.model.entity_keys(image_embeddings)
        out = self.model.decode(images, image_index, sparse, entity_keys=entity_keys)
        masks = postprocess_masks_traceable(out.low_res_logits, orig_im_size, self.image_size)
        return masks, out.iou_pred, out.low_res_logits


class ImageEncoderOnnxModel(nn.Module):
    """The (LoRA-merged) image encoder: preprocessed [1, 3, S, S] → embedding [1, C, h, w], and
    the entity module's keys [1, S·H, r, hw] if the model has one."""

    def __init__(self, model: CPCSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        embedding = self.model.encode_images(image)
        keys = self.model.entity_keys(embedding)
        # contiguous: the decoder graph reads them as a plain [1, S·H, r, hw] input
        return embedding if keys is None else (embedding, keys.contiguous())


def decoder_example_inputs(model: CPCSAM, num_entities: int = 2, num_points: int = 3) -> tuple[Tensor, ...]:
    """Example inputs for tracing (any values: nothing in the graph depends on them); they end
    with `entity_keys` when the model has the entity module."""
    c = model.sam.prompt_encoder.embed_dim
    h, w = model.embedding_size
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand(num_entities, num_points, 2, generator=gen) * model.image_size
    labels = torch.tensor([[2, 3, 1][i % 3] for i in range(num_points)], dtype=torch.float32).repeat(num_entities, 1)
    embedding = torch.randn(1, c, h, w, generator=gen)
    inputs = (
        embedding,
        coords,
        labels,
        torch.randn(num_entities, 1, 4 * h, 4 * w, generator=gen),
        torch.ones(num_entities),
        torch.tensor([float(model.image_size) * 0.75, float(model.image_size)]),
    )
    keys = model.entity_keys(embedding)
    return inputs if keys is None else (*inputs, keys.contiguous())


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, input_names: list[str],
            output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int,
            role: str | None = None, props: dict[str, str] | None = None) -> None:
    """Trace `module` to `path`; `role`: the `GRAPH_MARKER` value to write (None: no marker);
    `props`: more metadata properties."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _export_traced(module, args, path, input_names, output_names, dynamic_axes, opset)
    if role is not None:
        _mark(path, {GRAPH_MARKER: role, **(props or {})})
    import onnx

    onnx.checker.check_model(str(path))


def _mark(path: Path, props: dict[str, str]) -> None:
    """Write metadata properties (`GRAPH_MARKER`: the graph's role, ...) into the exported file.

    External weights (models over 2 GB) stay where the exporter put them: only the graph proto,
    with its references to them, is rewritten."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    _set_metadata(graph, props)
    with atomic_path(path) as tmp:  # same folder: relative references to external weights still hold
        onnx.save(graph, str(tmp))


def _set_metadata(model: Any, props: dict[str, str]) -> None:
    """Set metadata properties of an `onnx.ModelProto`, replacing those of the same keys."""
    for prop in [p for p in model.metadata_props if p.key in props]:
        model.metadata_props.remove(prop)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def _export_traced(module: nn.Module, args: tuple[Tensor, ...], path: Path, input_names: list[str],
                   output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated (but it is the one that handles SAM; STACK.md).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def export_decoder(model: CPCSAM, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export `DecoderOnnxModel(model)` (call `prepare_for_export` first) with dynamic N and P:
    traced with mask prompts and without, the two joined by an `If` on `has_mask_input`."""
    import onnx

    from cpcsam.export.branches import join_on_any_positive

    if opset < 17:
        raise ValueError(f"opset {opset} < 17")
    path = Path(path)
    dynamic = {
        "point_coords": {0: "num_entities", 1: "num_points"},
        "point_labels": {0: "num_entities", 1: "num_points"},
        "mask_input": {0: "num_entities"},
        "has_mask_input": {0: "num_entities"},
        "masks": {0: "num_entities", 2: "height", 3: "width"},
        "iou_predictions": {0: "num_entities"},
        "low_res_masks": {0: "num_entities"},
    }
    inputs, outputs = DECODER_GRAPH.names(model.capl.entity is not None)
    traces = []
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for mask_prompts in (True, False):
            trace = Path(tmp) / f"mask_prompts_{mask_prompts}.onnx"
            _export_traced(DecoderOnnxModel(model, mask_prompts).eval(), decoder_example_inputs(model), trace,
                           list(inputs), list(outputs), dynamic, opset)
            traces.append(onnx.load(str(trace)))
    joined = join_on_any_positive("has_mask_input", *traces, "mask_prompts", "no_mask_prompt")
    _set_metadata(joined, {GRAPH_MARKER: DECODER_GRAPH.role, CROP_PROPERTY: model.crop.model_dump_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as out:
        onnx.save(joined, str(out))
    onnx.checker.check_model(str(path))
    logger.info("exported decoder + CaPL to %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def export_image_encoder(model: CPCSAM, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export the image encoder (and the entity module's keys) for one preprocessed image [1, 3, S, S]."""
    path = Path(path)
    example = torch.zeros(1, 3, model.image_size, model.image_size)
    with torch.no_grad(), chunked_global_attention(model.sam.image_encoder) as chunked:
        if chunked:
            logger.info("image encoder: %d global-attention blocks exported in query bands (memory)", chunked)
        inputs, outputs = ENCODER_GRAPH.names(model.capl.entity is not None)
        _export(ImageEncoderOnnxModel(model).eval(), (example,), path, list(inputs), list(outputs), {}, opset,
                ENCODER_GRAPH.role)
    logger.info("exported image encoder to %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def describe_graph(path: str | Path) -> dict[str, Any]:
    """Inputs/outputs with their (symbolic) shapes and the opset: for parity.json and the README."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)

    def shape(value) -> list[Any]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": {i.name: shape(i) for i in graph.graph.input},
        "outputs": {o.name: shape(o) for o in graph.graph.output},
    }
