"""The trained model as checkpoints the SAM ecosystem loads: merged SAM weights + CaPL apart.

- `sam_merged.pth`: SAM with the LoRA adapters folded into its weights, as a plain
  `Sam.state_dict()`: segment-anything's own `sam_model_registry[type](checkpoint=...)` loads it
  for the official sizes (our small sizes load into a `Sam` built from the same modules,
  `cpcsam.modeling.build.build_sam_from_arch`), and `SamPredictor` runs it. The calibrated
  cross attentions of CPC-SAM keep SAM's parameter names, so the keys are SAM's.
- `capl.pt`: the Causal Prompt Learner's weights and config, for those who want the calibration
  back on top (`cpcsam.modeling.CPCSAM(sam, capl_cfg)` + `model.capl.load_state_dict`).
Both are written with `torch_save_atomic` (same model, same bytes) and load with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

from cpcsam.files import torch_save_atomic
from cpcsam.modeling import CPCSAM, has_lora

SAM_CHECKPOINT = "sam_merged.pth"
CAPL_CHECKPOINT = "capl.pt"
CAPL_FORMAT = "cpcsam-capl/1"


def write_sam_checkpoints(model: CPCSAM, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `sam_merged.pth` and `capl.pt` of a model whose LoRA is already merged."""
    if has_lora(model):
        raise ValueError("write_sam_checkpoints: merge LoRA first (cpcsam.export.onnx.prepare_for_export)")
    out = Path(out_dir)
    sam_path, capl_path = out / SAM_CHECKPOINT, out / CAPL_CHECKPOINT
    torch_save_atomic({k: v.detach().cpu().contiguous() for k, v in model.sam.state_dict().items()}, sam_path)
    torch_save_atomic({"format": CAPL_FORMAT, "capl_cfg": model.capl_cfg.model_dump(mode="json"),
                       "state_dict": {k: v.detach().cpu() for k, v in model.capl.state_dict().items()}}, capl_path)
    return sam_path, capl_path
