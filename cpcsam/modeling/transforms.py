"""The one home of the image ↔ model-frame geometry.

SAM's model frame is a square of side `image_size` (1024 for the official models): the image is
resized so that its longest side is `image_size` (aspect kept, sizes rounded as SAM rounds them),
normalised with SAM's pixel mean/std, and zero-padded at the bottom and right. Point and box
coordinates scale by the same per-axis factors; predicted masks go back by upsampling the
low-resolution logits to the square frame, cropping the padding and resizing to the original size.

Everything here is plain torch (or numpy in, torch out) and device-agnostic: tensors stay on the
device they come on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from cpcsam.config import CropConfig
from cpcsam.modeling.build import PIXEL_MEAN, PIXEL_STD


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) of an image of (height, width) after resizing its longest side to `image_size`.

    Rounds as `segment_anything.utils.transforms.ResizeLongestSide.get_preprocess_shape` does.
    """
    scale = image_size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _as_float_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H×W×3 image, got shape {image.shape}")
        # A float copy: decoded images may be read-only arrays, which torch warns about sharing.
        return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a 3×H×W tensor, got shape {tuple(image.shape)}")
    return image.float()


def preprocess_image(image: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """An RGB image (H×W×3 uint8 array, or 3×H×W tensor in 0..255) → normalised, padded [3, S, S].

    Resizing is bilinear with antialiasing on float pixels (SAM resizes a PIL image; the two
    agree to within rounding of uint8 values).
    """
    x = _as_float_chw(image)
    h, w = x.shape[-2:]
    new_h, new_w = resized_shape(h, w, image_size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(PIXEL_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, image_size - new_w, 0, image_size - new_h))


def preprocess_images(images: Sequence[np.ndarray | torch.Tensor], image_size: int) -> torch.Tensor:
    """A batch [B, 3, S, S] from images of any sizes (see `preprocess_image`)."""
    return torch.stack([preprocess_image(im, image_size) for im in images])


def coords_to_model(
    coords: np.ndarray | torch.Tensor, original_size: tuple[int, int], image_size: int
) -> torch.Tensor:
    """Pixel coordinates [..., 2] as (x, y) in the original image → model-frame coordinates."""
    h, w = original_size
    new_h, new_w = resized_shape(h, w, image_size)
    coords = torch.as_tensor(coords, dtype=torch.float32)
    scale = torch.tensor([new_w / w, new_h / h], dtype=coords.dtype, device=coords.device)
    return coords * scale


def coords_to_original(coords: torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """Model-frame coordinates [..., 2] (x, y) → pixel coordinates in the original image."""
    h, w = original_size
    new_h, new_w = resized_shape(h, w, image_size)
    scale = torch.tensor([w / new_w, h / new_h], dtype=coords.dtype, device=coords.device)
    return coords * scale


def boxes_to_model(boxes: np.ndarray | torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """Boxes [..., 4] as (x0, y0, x1, y1) in original pixels → model frame."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    return coords_to_model(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, image_size).reshape(boxes.shape)


def low_res_rows_read(low_res: torch.Tensor, inner: torch.Tensor, image_size: int) -> tuple[int, int, torch.Tensor]:
    """(low, factor, need) for [.., l, l] low-resolution logits: their side, the ×factor to the
    square model frame, and how many low-resolution (rows, cols) the crop to `inner` of the
    upsampled frame reads: ceil(inner / factor) + 1 (the +1 being bilinear's next neighbour of the
    last one), at most `low`. Traceable: `inner` is an int64 tensor, a graph input's function in
    an export."""
    low = int(low_res.shape[-1])
    if image_size % low:
        raise ValueError(f"low-resolution logits of side {low} do not divide the model frame {image_size}")
    factor = image_size // low
    return low, factor, torch.clamp(torch.div(inner + (factor - 1), factor, rounding_mode="floor") + 1, max=low)


def postprocess_masks_interpolated(low_res: torch.Tensor, inner: torch.Tensor, orig_im_size: torch.Tensor,
                                   image_size: int) -> torch.Tensor:
    """[N, M, l, l] low-resolution logits → [N, M, H, W]; `inner` is the (h, w) of the image in the
    square frame and `orig_im_size` (H, W), both int64 tensors, so that a traced graph keeps them
    as functions of its inputs (`postprocess_masks` takes plain sizes).

    Only the rows/cols that the crop reads are upsampled: the same scale factor and the same
    source coordinates, so the kept pixels are bit-identical to SAM's upsampling of the whole
    square and cropping it afterwards, at a fraction of the cost for non-square images."""
    _, factor, need = low_res_rows_read(low_res, inner, image_size)
    masks = low_res[..., : need[0], : need[1]]  # tensor bounds: dynamic Slices in a graph
    masks = F.interpolate(masks, size=(need[0] * factor, need[1] * factor), mode="bilinear", align_corners=False)
    masks = masks[..., : inner[0], : inner[1]]
    out = orig_im_size.to(torch.int64)
    return F.interpolate(masks, size=(out[0], out[1]), mode="bilinear", align_corners=False)


def postprocess_masks(low_res_logits: torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """Low-resolution logits [N, M, h, w] → logits [N, M, H, W] at the original image size: SAM's
    `Sam.postprocess_masks` (upsample to the square model frame, crop the padding, resize to
    (H, W)), bit for bit, upsampling only what the crop keeps."""
    inner = torch.tensor(resized_shape(*original_size, image_size))
    return postprocess_masks_interpolated(low_res_logits, inner, torch.tensor(tuple(original_size)), image_size)


def mask_to_model(mask: np.ndarray | torch.Tensor, image_size: int, out_size: int | None = None) -> torch.Tensor:
    """A binary mask [H, W] (original frame) → float mask [S, S] in the padded model frame.

    With `out_size` (e.g. the decoder's low-resolution side 4·h), the padded square is then
    resized to `out_size`², which is the frame of `DecoderOutput.low_res_logits`. Values are in
    [0, 1] (area-averaged), threshold at 0.5 for a binary target.
    """
    m = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).float()
    h, w = m.shape[-2:]
    new_h, new_w = resized_shape(h, w, image_size)
    m = F.interpolate(m[None, None], (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    m = F.pad(m, (0, image_size - new_w, 0, image_size - new_h))
    if out_size is not None and out_size != image_size:
        m = F.interpolate(m, (out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
    return m[0, 0]


def crop_window(box: np.ndarray, crop: CropConfig, width: int, height: int) -> tuple[int, int, int, int]:
    """The focus crop (x0, y0, x1, y1) of a box (x0, y0, x1, y1) in an image of width × height
    (`model.crop`; used by inference and by training, which must cut the same windows).

    A square of `context` × the box's longer side (at least `min_side`) centred on the box,
    clipped to the image: near a border the crop loses that side's context rather than moving off
    the box's centre.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(crop.context * max(x1 - x0, y1 - y0), float(crop.min_side))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(np.clip(np.floor(cx - side / 2), 0, width - 1)), int(np.clip(np.floor(cy - side / 2), 0, height - 1))
    right, bottom = int(np.clip(np.ceil(cx + side / 2), left + 1, width)), int(np.clip(np.ceil(cy + side / 2), top + 1, height))
    return left, top, right, bottom
