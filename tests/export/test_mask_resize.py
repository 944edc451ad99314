"""The exported graph's mask postprocessing as products (`cpcsam.export.mask_resize`) against the
two bilinear resizes it replaces, in PyTorch and through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpcsam.export.mask_resize import composed_taps, postprocess_masks_as_products, rows_per_block
from cpcsam.export.onnx import _export, postprocess_masks_traceable, prepadded_size
from cpcsam.export.runtime import create_session

# (H, W): landscape and portrait, square, a prime H (no block divisor: one dense block), an image
# smaller than the frame's inner side (the second resize shrinks), a thin strip.
SIZES = [(1200, 1800), (1800, 1200), (1024, 1024), (1201, 640), (100, 150), (33, 2000)]


def _smooth_logits(n: int, low: int, seed: int = 0) -> torch.Tensor:
    """Logits with a decoder's spatial smoothness (a random field upsampled ×8) and its range."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, low // 8, low // 8, generator=gen) * 20
    return torch.nn.functional.interpolate(coarse, size=(low, low), mode="bilinear", align_corners=False)


def _products(low_res: torch.Tensor, size: tuple[int, int], image_size: int) -> torch.Tensor:
    orig = torch.tensor(size, dtype=torch.float32)
    return postprocess_masks_as_products(low_res, prepadded_size(orig, image_size), orig, image_size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("low,image_size", [(256, 1024), (32, 64)])
def test_products_equal_the_two_resizes(size: tuple[int, int], low: int, image_size: int) -> None:
    low_res = _smooth_logits(3, low)
    expected = postprocess_masks_traceable(low_res, torch.tensor(size, dtype=torch.float32), image_size)
    got = _products(low_res, size, image_size)
    assert got.shape == expected.shape == (3, 1, *size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_each_output_reads_at_most_four_neighbouring_rows_with_weights_summing_to_one() -> None:
    index, weight = composed_taps(torch.tensor(1200), torch.tensor(683), low=256, factor=4)
    assert index.shape == weight.shape == (1200, 4)
    torch.testing.assert_close(weight.sum(-1), torch.ones(1200))
    assert int((index[:, 3] - index[:, 0]).max()) <= 2  # three neighbouring low-resolution rows at most
    assert bool((index[1:, 0] >= index[:-1, 0]).all())  # the blocks' windows start at their first row
    assert int(index.max()) == (683 + 3) // 4  # ceil(683 / 4): the last row the crop reads, no further


@pytest.mark.parametrize("rows,expected", [(1200, 120), (1024, 128), (683, 683), (1201, 1201), (20, 20), (96, 96)])
def test_blocks_tile_the_rows_exactly(rows: int, expected: int) -> None:
    assert int(rows_per_block(torch.tensor(rows))) == expected


def test_the_exported_graph_runs_the_products_and_matches_pytorch(tmp_path) -> None:
    class Postprocess(torch.nn.Module):
        def forward(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
            return postprocess_masks_traceable(low_res, orig_im_size, 1024)

    path = tmp_path / "postprocess.onnx"
    _export(Postprocess(), (_smooth_logits(2, 256), torch.tensor([1200.0, 1800.0])), path,
            ["low_res", "orig_im_size"], ["masks"], {"low_res": {0: "n"}, "masks": {0: "n", 2: "h", 3: "w"}}, 17)
    import onnx

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Resize" not in ops and "MatMul" in ops
    session, _ = create_session(path, "cpu", 2)
    for n, size in [(3, (1200, 1800)), (1, (1201, 640)), (0, (480, 640))]:  # one graph: any N, any size
        low_res = _smooth_logits(n, 256, seed=n) if n else torch.zeros(0, 1, 256, 256)
        orig = np.asarray(size, np.float32)
        (got,) = session.run(None, {"low_res": low_res.numpy(), "orig_im_size": orig})
        expected = postprocess_masks_traceable(low_res, torch.from_numpy(orig), 1024).numpy()
        assert got.shape == expected.shape == (n, 1, *size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
