"""onnxruntime sessions for the exported graphs, with honest execution-provider selection.

`onnxruntime-gpu` on a machine without a usable CUDA lists `CUDAExecutionProvider` in
`get_available_providers()` and then silently runs on the CPU. So a session is asked for CUDA
only when CUDA is listed, and what it *really* got is read back from `session.get_providers()`;
a fallback is logged as a warning that says so. `cpu` never asks for CUDA; `cuda` insists and
raises when CUDA does not load.

`OnnxImageEncoder` and `OnnxDecoder` run only graphs that `cpcsam.export.onnx` wrote: the input
and output names must be ours and the model must carry the metadata property `cpcsam_graph`
(`GRAPH_MARKER`) naming its role; any other ONNX file (another model, the two graphs swapped, an
export from before the marker) is refused with a `CheckpointError` that lists what was expected.
The graphs of a model with CaPL's entity module carry its per-image keys (`ENTITY_KEYS`) from the
encoder to the decoder; `check_pair` refuses an encoder and a decoder that disagree on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpcsam.config import CropConfig
from cpcsam.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

GRAPH_MARKER = "cpcsam_graph"  # metadata_props key `cpcsam.export.onnx` writes: the graph's role
CROP_PROPERTY = "cpcsam_crop"  # the decoder's metadata: the model's focus crops (`model.crop`, JSON)


@dataclass(frozen=True)
class GraphSpec:
    """What one of our exported graphs looks like from outside: its role (the `GRAPH_MARKER`
    value) and its input and output names, in order. `entity_inputs` / `entity_outputs` follow
    them in the graphs of a model with an entity causal module (CaPL modes `causal` and `entity`) and only there."""

    role: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    entity_inputs: tuple[str, ...] = ()
    entity_outputs: tuple[str, ...] = ()

    def names(self, entity_module: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(input names, output names) of the graph of a model with or without the entity module."""
        if entity_module:
            return self.inputs + self.entity_inputs, self.outputs + self.entity_outputs
        return self.inputs, self.outputs

    def accepts(self, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> bool:
        return (inputs, outputs) in {self.names(False), self.names(True)}


# The entity causal module's keys, [1, S·H, r, HW]: per-image work, so the encoder graph computes
# them and the decoder graph takes them (`cpcsam.modeling.capl.EntityCausalModule.image_keys`).
ENTITY_KEYS = "entity_keys"
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]
ENCODER_GRAPH = GraphSpec("image_encoder", ("image",), ("image_embeddings",), entity_outputs=(ENTITY_KEYS,))
DECODER_GRAPH = GraphSpec("decoder_capl", tuple(DECODER_INPUTS), tuple(DECODER_OUTPUTS), entity_inputs=(ENTITY_KEYS,))


@dataclass
class SessionInfo:
    path: str
    requested: list[str]
    providers: list[str]  # what the session really runs on, best first

    @property
    def on_cuda(self) -> bool:
        return bool(self.providers) and self.providers[0] == CUDA

    @property
    def fell_back(self) -> bool:
        return CUDA in self.requested and not self.on_cuda


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # neither onnxruntime nor onnxruntime-gpu installed
        raise ConfigError("onnxruntime is not installed: pip install 'cpcsam[cpu]' (or '[gpu]')") from exc
    return ort


def requested_providers(device: str, available: list[str]) -> list[str]:
    """The provider list to ask for: CUDA first when it is wanted and listed, CPU always last."""
    if device not in DEVICES:
        raise ConfigError(f"ONNX device {device!r} is not one of {DEVICES}")
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise ConfigError(f"device 'cuda': onnxruntime has no {CUDA} here (available: {available})")
    return [CPU]


# CUDA provider options. `use_tf32: 0`: onnxruntime's CUDA provider computes float32 convolutions
# and matmuls in TF32 on Ampere and newer GPUs by default (10-bit mantissa, relative errors ~1e-3),
# which would fail the export stage's parity check (1e-4 + 1e-3·|logit|) and serve numbers other
# than the ones it checked. float32 it is, as in PyTorch (whose TF32 matmul default is off).
CUDA_OPTIONS = {"use_tf32": "0"}


def provider_specs(requested: list[str]) -> list:
    """The `providers` argument of `InferenceSession`: names, with `CUDA_OPTIONS` for CUDA."""
    return [(name, dict(CUDA_OPTIONS)) if name == CUDA else name for name in requested]


def _load_cuda_libraries(ort) -> None:
    """Make the CUDA and cuDNN libraries findable before a CUDA session is created.

    pip's onnxruntime-gpu does not bundle them; in this project they come with torch's `nvidia-*`
    wheels, which onnxruntime only finds once they are loaded. `preload_dlls` (onnxruntime-gpu
    >= 1.21) loads torch's when torch is imported first, else the site-packages ones; without it a
    CUDA session silently falls back to the CPU ("CUDA is listed but did not load").
    """
    try:
        import torch  # noqa: F401  (loads its CUDA libraries into the process)
    except ImportError:
        pass
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # best effort: the fallback check below reports what really loaded
        logger.debug("onnxruntime.preload_dlls failed: %s", exc)


def create_session(path: str | Path, device: str = "auto", threads: int | None = None, *,
                   profile_prefix: str | None = None):
    """An `InferenceSession` for `path` and a `SessionInfo` of the providers it really uses;
    with `profile_prefix`, onnxruntime profiles every run into `<prefix>_<date>.json`
    (`session.end_profiling()`; benchmarks/roofline.py reads it).

    The intra-op threads busy-wait for the next operator during a run and stop at its end
    (`session.force_spinning_stop`). A session here always alternates with other work: the encoder
    graph with the decoder graph (two thread pools), both with the predictor's Python pre- and
    post-processing, the batch and serving loops with I/O. Measured on the ViT-B-size decoder + CaPL
    graph (benchmarks/bench_decoder.py sizes), 2 threads, onnxruntime 1.31:

    - right after another graph's run (the entity keys, as the encoder graph precedes the decoder),
      the decoder took 33.3 / 117 ms at 1 / 4 entities against 62.6 / 151 ms when every pool kept
      spinning after its run (onnxruntime's default), taking the cores from the next one;
    - back to back, 34.0 / 109 / 463 ms at 1 / 4 / 16 entities, against 32.7 / 107 / 446 ms
      spinning throughout and 42.7 / 123 / 507 ms never spinning (each operator then waits for its
      threads to wake).
    """
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model not found (run the export stage)")
    requested = requested_providers(device, list(ort.get_available_providers()))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The memory pattern pre-plans one buffer for every intermediate tensor of a run: for the ViT-B
    # encoder (12 heads × 4096² global attention) the process peaked at 6.9 GB with it and 3.8 GB
    # without, and ran faster without (5.8 s vs 7.2 s, 1 thread). Turning the arena off as well
    # saved 0.2 GB more but cost 18 % of the time (benchmarks/bench_memory.py).
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = int(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # onnxruntime's own provider warnings: we report the outcome ourselves
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if CUDA in requested:
        _load_cuda_libraries(ort)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=provider_specs(requested))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CheckpointError(f"{path}: onnxruntime cannot load this model: {exc}") from exc
    info = SessionInfo(str(path), requested, list(session.get_providers()))
    if info.fell_back:
        if device == "cuda":
            raise ConfigError(f"{path}: CUDA was requested but did not load; session runs on {info.providers}")
        logger.warning("%s: CUDA is listed by onnxruntime but did not load; FELL BACK TO CPU (%s)", path.name,
                       info.providers)
    else:
        logger.info("%s: onnxruntime session on %s", path.name, info.providers[0])
    return session, info


def check_graph(session: Any, path: str | Path, spec: GraphSpec) -> None:
    """Raise `CheckpointError` unless `session`'s model is our `spec` graph (names and marker)."""
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    marker = session.get_modelmeta().custom_metadata_map.get(GRAPH_MARKER)
    if not spec.accepts(inputs, outputs) or marker != spec.role:
        parts = [f"{kind} {list(names)}" for kind, names in (("inputs", spec.entity_inputs),
                                                              ("outputs", spec.entity_outputs)) if names]
        extra = f" (+ {' and '.join(parts)} with CaPL's entity module)" if parts else ""
        raise CheckpointError(
            f"{path}: not a CPC-SAM {spec.role} graph exported by cpcsam.export: expected inputs {list(spec.inputs)}, "
            f"outputs {list(spec.outputs)}{extra} and metadata {GRAPH_MARKER}={spec.role!r}; this file has inputs "
            f"{list(inputs)}, outputs {list(outputs)}, {GRAPH_MARKER}={marker!r}. Use the export stage's "
            "image_encoder.onnx / decoder_capl.onnx (re-export with `dvc repro export` if they predate the marker)"
        )


def check_pair(encoder: "OnnxImageEncoder", decoder: "OnnxDecoder") -> None:
    """Raise `CheckpointError` unless the two graphs come from the same kind of model: a decoder
    with an entity module needs the keys its encoder computes, and an encoder that computes them
    belongs to such a decoder."""
    if encoder.has_entity_keys != decoder.needs_entity_keys:
        has = "computes" if encoder.has_entity_keys else "does not compute"
        needs = "needs" if decoder.needs_entity_keys else "does not take"
        raise CheckpointError(
            f"{encoder.info.path} {has} {ENTITY_KEYS!r} but {decoder.info.path} {needs} them: the two graphs come "
            "from different exports (use one export stage's image_encoder.onnx and decoder_capl.onnx together)"
        )


def read_crop(session: Any, path: str | Path) -> CropConfig:
    """The focus crops a decoder graph's model was trained with (none in an export that predates them)."""
    text = session.get_modelmeta().custom_metadata_map.get(CROP_PROPERTY)
    if text is None:
        return CropConfig()
    try:
        return CropConfig.model_validate_json(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata {CROP_PROPERTY}={text!r} is not a crop setting: {exc}") from exc


def onnx_predictor(onnx_dir: str | Path, device: str = "auto", threads: int | None = None):
    """A `cpcsam.inference.Predictor` over the export stage's `image_encoder.onnx` + `decoder_capl.onnx`;
    `threads`: onnxruntime intra-op threads per session (None: its default, all cores)."""
    from cpcsam.inference import OnnxBackend, Predictor

    onnx_dir = Path(onnx_dir)
    encoder = OnnxImageEncoder(onnx_dir / "image_encoder.onnx", device, threads)
    decoder = OnnxDecoder(onnx_dir / "decoder_capl.onnx", device, threads)
    return Predictor(OnnxBackend(encoder, decoder), decoder.crop)  # the backend checks the pair


class OnnxImageEncoder:
    """The exported image encoder: preprocessed [1, 3, S, S] float32 → embedding [1, C, h, w], and
    the entity module's keys [1, S·H, r, HW] when the model has one (`has_entity_keys`)."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        self.session, self.info = create_session(path, device, threads)
        check_graph(self.session, path, ENCODER_GRAPH)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.has_entity_keys = ENTITY_KEYS in self.output_names
        self.image_size = int(self.session.get_inputs()[0].shape[-1])

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """{`image_embeddings`: [1, C, h, w], and `entity_keys` if the graph computes them}."""
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(image, dtype=np.float32)})
        return dict(zip(self.output_names, outputs))


class OnnxDecoder:
    """The exported CaPL + prompt encoder + mask decoder graph (see `cpcsam.export.onnx`)."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None, *,
                 profile_prefix: str | None = None) -> None:
        self.session, self.info = create_session(path, device, threads, profile_prefix=profile_prefix)
        check_graph(self.session, path, DECODER_GRAPH)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.needs_entity_keys = ENTITY_KEYS in self.input_names
        mask_input = next(i for i in self.session.get_inputs() if i.name == "mask_input")
        self.low_res_size = int(mask_input.shape[-1])
        self.crop = read_crop(self.session, path)

    def __call__(
        self,
        image_embeddings: np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        orig_im_size: tuple[int, int],
        mask_input: np.ndarray | None = None,
        entity_keys: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Run on one image's embedding [1, C, h, w] and N entities' prompts [N, P, 2] / [N, P];
        `entity_keys`: the image's keys from the encoder graph (required if `needs_entity_keys`).

        Coordinates are in the model-input frame. Returns `masks` [N, 1, H, W] (full-size logits),
        `iou_predictions` [N, 1] and `low_res_masks` [N, 1, m, m] (m = 4h, ×2 per mask refinement stage).
        """
        n = point_coords.shape[0]
        has_mask = mask_input is not None
        if mask_input is None:
            mask_input = np.zeros((n, 1, self.low_res_size, self.low_res_size), np.float32)
        feeds = {
            "image_embeddings": np.ascontiguousarray(image_embeddings, dtype=np.float32),
            "point_coords": np.ascontiguousarray(point_coords, dtype=np.float32),
            "point_labels": np.ascontiguousarray(point_labels, dtype=np.float32),
            "mask_input": np.ascontiguousarray(mask_input, dtype=np.float32),
            "has_mask_input": np.full((n,), 1.0 if has_mask else 0.0, np.float32),
            "orig_im_size": np.asarray(orig_im_size, dtype=np.float32),
        }
        if self.needs_entity_keys:
            if entity_keys is None:
                raise ConfigError(f"{self.info.path}: this decoder calibrates with CaPL's entity module and needs "
                                  f"the image's {ENTITY_KEYS!r} from the matching image_encoder.onnx")
            feeds[ENTITY_KEYS] = np.ascontiguousarray(entity_keys, dtype=np.float32)
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outputs))
