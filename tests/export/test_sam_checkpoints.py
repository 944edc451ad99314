"""The exported SAM checkpoint loads into segment-anything's own `Sam` and runs in `SamPredictor`."""

from __future__ import annotations

import numpy as np
import torch
from export_helpers import SMALL_CFG, calibrated_small_model
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from cpcsam.export.checkpoints import CAPL_FORMAT, write_sam_checkpoints
from cpcsam.export.onnx import prepare_for_export
from cpcsam.modeling import CPCSAM
from cpcsam.modeling.build import build_sam_from_arch, resolve_arch


def test_merged_sam_runs_in_sam_predictor_like_our_model(tmp_path) -> None:
    trained = calibrated_small_model()  # LoRA adapters with non-zero weights: merging them matters
    merged = prepare_for_export(trained)
    sam_path, capl_path = write_sam_checkpoints(merged, tmp_path)

    sam = build_sam_from_arch(resolve_arch(SMALL_CFG))  # segment-anything's modules, small sizes
    assert type(sam) is Sam
    sam.load_state_dict(torch.load(sam_path, weights_only=True), strict=True)
    predictor = SamPredictor(sam.eval())
    image = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    predictor.set_image(image)
    box = np.array([40, 30, 150, 120])
    _, _, low_res = predictor.predict(box=box, multimask_output=False, return_logits=True)

    # the same weights, as our model without CaPL (a copy: CPCSAM wraps the attention it is given),
    # give the same embedding and, on it, the same low-resolution logits as SamPredictor
    import copy

    ours = CPCSAM(copy.deepcopy(merged.sam), {"mode": "fixed"}).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 256, 256)
        assert torch.allclose(ours.encode_images(x), sam.image_encoder(x), atol=1e-5)
        coords = torch.from_numpy(predictor.transform.apply_boxes(box[None], image.shape[:2])).float().reshape(1, 2, 2)
        out = ours.decode(predictor.features, torch.zeros(1, dtype=torch.long),
                          ours.embed_prompts(coords, torch.tensor([[2, 3]])))
    assert np.allclose(out.low_res_logits[0, 0].numpy(), low_res[0], atol=1e-4)

    capl = torch.load(capl_path, weights_only=True)
    assert capl["format"] == CAPL_FORMAT and capl["capl_cfg"]["mode"] == trained.capl_cfg.mode
    restored = CPCSAM(build_sam_from_arch(resolve_arch(SMALL_CFG)), capl["capl_cfg"])
    restored.sam.load_state_dict(torch.load(sam_path, weights_only=True))
    restored.capl.load_state_dict(capl["state_dict"])
    for (n, a), (_, b) in zip(restored.state_dict().items(), merged.state_dict().items()):
        assert torch.equal(a, b), n
