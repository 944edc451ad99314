"""segment-anything's modeling code without the package's `__init__` (half of a model's start-up).

`segment_anything/__init__.py` imports `SamPredictor` and `SamAutomaticMaskGenerator`, which
import torchvision, which imports `torch._dynamo`: `import cpcsam.modeling` takes 3.5 s with it
and 1.8 s without it on these CPUs (and 160 MiB less), in every process that builds a model (the
pretrain, embed, evaluate and export stages, `cpcsam predict`, a serving worker), for code this
project never calls. Python runs a package's `__init__` before any of its submodules, so the only way
around it is to register the package module first, from its spec, without running it.

`defer_package_init()` does that. The registered module is the real package (same spec, path and
`__file__`), so `import segment_anything.modeling.sam` and pickles that name its classes work
unchanged. Its `__init__` runs on the first attribute the module does not have yet (e.g.
`from segment_anything import SamPredictor`), so every name of the package stays reachable.
Training processes with LoRA import torchvision anyway (through PEFT); they gain nothing.
"""

from __future__ import annotations

import importlib.util
import sys

PACKAGE = "segment_anything"


def defer_package_init() -> None:
    """Register `segment_anything` with its `__init__` deferred; a no-op once it is imported."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None:
        return  # not installed: the import that needs it fails with Python's own message
    module = importlib.util.module_from_spec(spec)
    completed = False

    def __getattr__(name: str) -> object:
        # Called only for names the module lacks: run the real `__init__` once, then look again.
        # Other dunders (`__wrapped__`, ...) are what introspection probes for; they do not load it.
        nonlocal completed
        if completed or (name.startswith("__") and name != "__all__"):
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
        completed = True
        spec.loader.exec_module(module)
        return getattr(module, name)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]  # PEP 562: a module's own __getattr__
    sys.modules[PACKAGE] = module

