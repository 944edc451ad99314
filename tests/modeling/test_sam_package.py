"""`cpcsam.sam_package`: segment-anything's modeling code without its package `__init__`."""

from __future__ import annotations

import subprocess
import sys


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_building_and_running_a_model_imports_no_torchvision():
    """torchvision (and torch._dynamo behind it) comes only with segment-anything's `__init__`:
    a process that builds, runs and saves a model without LoRA must not pay its 1.1 s."""
    proc = _fresh(
        "import io, sys, torch\n"
        "from cpcsam.modeling import build_cpcsam\n"
        "model = build_cpcsam({'type': 'small', 'capl': {'mode': 'causal'}}, with_lora=False).eval()\n"
        "with torch.no_grad():\n"
        "    model.encode_images(torch.zeros(1, 3, 256, 256))\n"
        "torch.save(model, io.BytesIO())  # pickles segment_anything's classes by name\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_name_of_the_package_stays_reachable():
    """The deferred `__init__` runs on the first name the package lacks, once; the classes are the
    ones the modeling code already uses."""
    proc = _fresh(
        "import sys, cpcsam.modeling\n"
        "import segment_anything\n"
        "from segment_anything import SamPredictor, sam_model_registry\n"
        "from segment_anything.modeling import Sam\n"
        "assert segment_anything.modeling.Sam is Sam and 'vit_b' in sam_model_registry\n"
        "assert SamPredictor.__module__ == 'segment_anything.predictor'\n"
        "try:\n"
        "    segment_anything.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('a missing name was found')\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_package_imported_first_is_left_as_it_is():
    proc = _fresh(
        "import sys, segment_anything\n"
        "real = sys.modules['segment_anything']\n"
        "import cpcsam.modeling\n"
        "assert sys.modules['segment_anything'] is real and hasattr(real, 'SamPredictor')\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
