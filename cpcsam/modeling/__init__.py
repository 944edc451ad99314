"""The model: SAM build/load, CaPL (task + entity causal modules), LoRA through PEFT.

See docs/CONTRACTS.md "Model API" for the contract other parts of the pipeline rely on.
"""

from cpcsam.modeling.sam_package import defer_package_init

defer_package_init()  # before the modules below import segment_anything.modeling

from cpcsam.modeling.build import ARCHS, SamArch, build_sam, check_state_dict, read_state_dict, resolve_arch
from cpcsam.modeling.capl import CAPL_MODES, CaPL, CalibratedAttention
from cpcsam.modeling.cpcsam import (
    CPCSAM,
    DecoderOutput,
    capl_parameters,
    lora_parameters,
    sam_parameters,
)
from cpcsam.modeling.lora import apply_lora, has_lora, merge_lora
from cpcsam.modeling.serialization import build_cpcsam, load_cpcsam, save_cpcsam

__all__ = [
    "ARCHS",
    "CAPL_MODES",
    "CPCSAM",
    "CaPL",
    "CalibratedAttention",
    "DecoderOutput",
    "SamArch",
    "apply_lora",
    "build_cpcsam",
    "build_sam",
    "capl_parameters",
    "check_state_dict",
    "has_lora",
    "load_cpcsam",
    "lora_parameters",
    "merge_lora",
    "read_state_dict",
    "resolve_arch",
    "sam_parameters",
    "save_cpcsam",
]
