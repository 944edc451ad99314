"""Focus crops in training (`model.crop`): every entity also becomes an item of its own, the crop
around its exact box that inference segments it in, with its mask and its K prompts moved into
the crop; the whole images stay (points-only prompts are answered on the whole image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpcsam.config import CropConfig
from cpcsam.errors import ConfigError
from cpcsam.modeling.transforms import crop_window
from cpcsam.modeling.transforms import preprocess_image
from cpcsam.training.data import TablePrompts, TrainingImages, split_halves
from training_helpers import cache_from_dicts, trainer_from_dicts

CROP = CropConfig(context=1.5, min_side=16)


def _data(project, crop=CROP) -> tuple[TrainingImages, TrainingImages]:
    args = dict(image_size=64, lowres_size=32, cache_mb=0)  # the data layer's image reader and mask decoder
    return TrainingImages(project["manifest"], **args), TrainingImages(project["manifest"], crop=crop, **args)


def test_every_entity_is_an_item_cut_around_its_exact_box(tiny_project) -> None:
    whole, cropped = _data(tiny_project)
    entities = [(image_id, i) for image_id, row in whole.images.items() for i in range(len(row.entities))]
    crops = sorted(f"{image_id}#{i}" for image_id, i in entities)
    assert sorted(cropped.image_ids) == sorted(crops + whole.image_ids)
    for image_id in whole.image_ids:  # the whole images are unchanged items
        assert cropped.images[image_id] == whole.images[image_id] and cropped.offset(image_id) == (0, 0)
        np.testing.assert_array_equal(cropped.mask(image_id, 0), whole.mask(image_id, 0))
    for image_id, i in entities:
        item = f"{image_id}#{i}"
        row, full_mask = whole.images[image_id], whole.mask(image_id, i)
        ys, xs = np.nonzero(full_mask)
        x0, y0, x1, y1 = crop_window(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]), CROP, row.width, row.height)
        assert cropped.offset(item) == (x0, y0) and cropped.sources[item] == image_id
        assert (cropped.images[item].height, cropped.images[item].width) == (y1 - y0, x1 - x0)
        assert cropped.images[item].entities == (row.entities[i],)
        np.testing.assert_array_equal(cropped.mask(item, 0), full_mask[y0:y1, x0:x1])
        assert cropped.mask(item, 0).sum() == full_mask.sum()  # the whole object is inside its crop
        pixels = whole.read_image(row.image_uri)[y0:y1, x0:x1]
        torch.testing.assert_close(cropped.preprocessed_image(item), preprocess_image(pixels, 64), rtol=0, atol=0)


def test_prompts_move_into_the_crop(tiny_project) -> None:
    whole, cropped = _data(tiny_project)
    table = TablePrompts(tiny_project["prompts"], tiny_project["params"]["perturb"]["k"], 8)
    rng = np.random.default_rng(0)
    for item in [i for i in cropped.image_ids if "#" in i]:
        source, index = item.split("#")
        c_whole, l_whole = table.prompts(whole, source, [int(index)], rng)
        c_crop, l_crop = table.prompts(cropped, item, [0], rng)
        np.testing.assert_array_equal(l_crop, l_whole)
        np.testing.assert_allclose(c_crop, c_whole - np.array(cropped.offset(item), np.float64))


def test_the_halves_never_share_an_image() -> None:
    items = [f"im{i}#{j}" for i in range(7) for j in range(3)]
    sources = {item: item.split("#")[0] for item in items}
    a, b = split_halves(items, 0, sources)
    assert set(a) | set(b) == set(items) and not {sources[i] for i in a} & {sources[i] for i in b}
    assert split_halves([f"im{i}" for i in range(7)], 0) == split_halves([f"im{i}" for i in range(7)], 0, None)


def test_training_on_crops_runs_and_refuses_the_whole_image_cache(tiny_project, tiny_params) -> None:
    tiny_params["model"]["crop"] = {"context": 1.5, "min_side": 16}
    trainer = trainer_from_dicts(tiny_params, tiny_project["manifest"], tiny_project["prompts"],
                                 tiny_project["sam_checkpoint"], None, train_overrides={"steps": 2})
    items = trainer.data.image_ids
    assert sum("#" in i for i in items) == len(tiny_project["prompts"].entity_id.unique())
    for _ in range(3):
        batch = trainer.lower_stream.next()
        for b, item in enumerate(batch.image_ids):  # one entity per crop
            assert "#" not in item or int((batch.image_index == b).sum()) == 1
    trainer.run(resume=False, progress=False)
    with pytest.raises(ConfigError, match="cannot serve focus crops"):
        trainer_from_dicts(tiny_params, tiny_project["manifest"], tiny_project["prompts"],
                           tiny_project["sam_checkpoint"], None, train_overrides={"embedding_cache": "on"})


def test_the_embed_stage_says_why_it_caches_nothing_under_crops(tiny_project, tiny_params, tmp_path) -> None:
    tiny_params["model"]["crop"] = {"context": 1.5}
    tiny_params["model"]["lora"] = {**tiny_params["model"].get("lora", {}), "targets": ["decoder_attention"]}
    summary = cache_from_dicts(tiny_params, tiny_project["manifest"], tiny_project["sam_checkpoint"], tmp_path,
                               progress=False)
    assert not summary["enabled"] and "focus crops" in summary["reason"]
