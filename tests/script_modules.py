"""The repository's scripts that are not in an importable package (`benchmarks/`, `infra/`),
loaded by path so that their tests can call them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, relative_path: str) -> ModuleType:
    """`ROOT / relative_path` as the module `name`, registered in `sys.modules` (dataclasses and
    pickling resolve a module by its name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
