"""`evaluate.threshold: auto`: the threshold is chosen on base classes only, ties go to 0."""

from __future__ import annotations

import numpy as np
import pytest

from cpcsam.evaluation.calibration import calibrate_threshold
from cpcsam.evaluation.protocols import EntityRecord, ImageRecord


def _square(y0: int, x0: int, side: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


class LogitsByClass:
    """A stand-in model: an entity's logits are its class's profile over its true mask, a ring
    around it and the rest of the image, whatever the prompt (one per entity, in order)."""

    def __init__(self, profiles: dict[str, tuple[float, float, float]]) -> None:
        self.profiles = profiles
        self.prompted: list[str] = []

    def encode(self, image: ImageRecord) -> ImageRecord:
        return image

    def predict(self, image: ImageRecord, prompts) -> np.ndarray:
        out = []
        for prompt in prompts:
            (x0, y0), (x1, y1) = prompt[0].coords[:2]
            ent = next(e for e in image.entities if e.mask[int((y0 + y1) / 2), int((x0 + x1) / 2)])
            self.prompted.append(ent.class_name)
            inside, ring, outside = self.profiles[ent.class_name]
            grown = np.zeros_like(ent.mask)
            ys, xs = np.nonzero(ent.mask)
            grown[max(ys.min() - 3, 0):ys.max() + 4, max(xs.min() - 3, 0):xs.max() + 4] = True
            out.append(np.where(ent.mask, inside, np.where(grown, ring, outside)))
        return np.stack(out).astype(np.float32)


def _images() -> list[ImageRecord]:
    return [ImageRecord(f"im{i}", "-", [EntityRecord(f"im{i}/a", "crab", _square(4, 4, 8)),
                                        EntityRecord(f"im{i}/b", "fish", _square(18, 18, 9))]) for i in range(3)]


def test_the_threshold_that_best_segments_the_base_classes_wins() -> None:
    # crab (base): its true mask sits at logit -2.5 (under-confident), a ring at -6 (wrong):
    # only thresholds in (-6, -2.5) give it exactly; fish (target) would want 0.5 < t < 1.
    model = LogitsByClass({"crab": (-2.5, -6.0, -9.0), "fish": (1.0, 0.5, -9.0)})
    found = calibrate_threshold(model, _images(), base=["crab"], grid=[-4.0, -3.0, -2.0, 0.0, 1.0], seed=0,
                                load_image=lambda im: im)
    assert found.threshold == -3.0  # -4 and -3 both perfect: the one nearer 0
    assert found.base_dice[-3.0] == pytest.approx(1.0) and found.base_dice[0.0] == pytest.approx(0.0)
    assert found.images == 3
    assert set(model.prompted) == {"crab"}, "a target-class entity was prompted during calibration"


def test_no_base_class_on_the_split_is_an_error() -> None:
    model = LogitsByClass({"fish": (1.0, 0.5, -9.0)})
    with pytest.raises(ValueError, match="no image of the calibration split holds a base class"):
        calibrate_threshold(model, _images(), base=["eel"], grid=[0.0], seed=0, load_image=lambda im: im)
