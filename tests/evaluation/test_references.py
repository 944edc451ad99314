"""The prompt-only reference rows: the filled box and GrabCut."""

from __future__ import annotations

import numpy as np

from cpcsam.evaluation.metrics import dice
from cpcsam.evaluation.references import FilledBox, GrabCut
from cpcsam.prompts.perturb import Prompt


def _scene(seed: int = 0):
    """A red disc on a textured blue-grey frame, and its box."""
    rng = np.random.default_rng(seed)
    h, w = 240, 320
    image = np.clip(rng.normal((90, 110, 130), 12, (h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 150) ** 2 + (xx - 200) ** 2 <= 30**2
    image[disc] = np.clip(rng.normal((200, 40, 40), 12, (int(disc.sum()), 3)), 0, 255).astype(np.uint8)
    return image, disc, np.array([165.0, 115.0, 236.0, 186.0])


def _prompt(box):
    return [Prompt(kind="box", coords=box.reshape(2, 2), labels=np.array([2, 3]))]


def test_grabcut_finds_the_object_inside_its_box_only():
    image, disc, box = _scene()
    reference = GrabCut()
    logits = reference.predict(reference.encode(image), [_prompt(box)])[0]
    mask = logits > 0
    assert dice(mask, disc) >= 0.95
    x0, y0, x1, y1 = box.astype(int)
    outside = mask.copy()
    outside[y0:y1, x0:x1] = False
    assert not outside.any()  # GC_INIT_WITH_RECT: outside the rectangle is background
    # It is a segmentation, not the box: the box's corners are background.
    assert dice(mask, disc) > dice(FilledBox().predict(FilledBox().encode(image), [_prompt(box)])[0] > 0, disc) + 0.1


def test_grabcut_near_the_border_and_tiny_boxes():
    image, disc, _ = _scene(1)
    reference = GrabCut()
    encoded = reference.encode(image)
    corner = np.array([0.0, 0.0, 40.0, 30.0])  # a box on the frame's corner
    tiny = np.array([100.0, 100.0, 102.0, 101.0])  # too small for colour models: the filled box
    corner_mask, tiny_mask = reference.predict(encoded, [_prompt(corner), _prompt(tiny)]) > 0
    assert corner_mask[:30, :40].any() and not corner_mask[30:].any() and not corner_mask[:, 40:].any()
    assert tiny_mask.sum() == 2 and tiny_mask[100, 100:102].all()


def test_a_reference_row_is_the_same_mask_at_any_evaluation_threshold():
    """The evaluation thresholds every row at `evaluate.threshold`; a prompt-only answer must not move
    with it (a threshold below the references' "outside" value once scored the whole frame)."""
    from cpcsam.evaluation.protocols import EntityRecord, EvalConfig, ImageRecord, Protocol, evaluate_model

    image, disc, _ = _scene()
    record = ImageRecord("img", "unused", [EntityRecord("e0", "disc", disc)])
    scores = {}
    for threshold in (-3.0, 0.0, 3.0):
        cfg = EvalConfig(protocols=[Protocol.parse("box@0")], threshold=threshold, overlay_images=0)
        result = evaluate_model(FilledBox(), [record], ["disc"], [], [], cfg, lambda im: image, name="filled_box")
        scores[threshold] = result.protocols["box@0"]["base"]["dice"]
    box = np.zeros_like(disc)
    ys, xs = np.nonzero(disc)
    box[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] = True
    assert scores[-3.0] == scores[0.0] == scores[3.0] == dice(box, disc)
