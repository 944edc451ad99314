"""A procedural, class-agnostic segmentation corpus: the stand-in for SA-1B.

No SA-1B weights or images can be downloaded here, so the starting SAM learns "what is an object
inside this prompt" from an endless stream of rendered scenes. The scenes share no class with any
fine-tuning data set: objects are random shapes (Fourier blobs, polygons, rounded rectangles,
ellipses, thin curves, composites of several parts, shapes with holes), each filled with its own
procedural texture (multi-octave noise mapped through a random palette, stripes, spots, shading),
often with an inner part of another colour so that an inner edge is not an object boundary.
Objects occlude each other (masks are the visible parts), cast shadows that are not part of them,
sometimes have the colour of the background behind them (low contrast) or are translucent.
The whole frame then goes through the underwater confounders of the synthetic source (colour
cast, haze, uneven light, marine snow, sensor noise) at a random strength, blur and JPEG.

Scene `i` of seed `s` is a pure function of `(s, i)`: the stream needs no state beyond a step
counter, so a resumed pretraining sees exactly the images it would have seen.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cpcsam.data.sources.synthetic import apply_environment, water_environment


@dataclass(frozen=True)
class CorpusConfig:
    """Scene sizes and counts (the long side is the model's input side: no resize at training)."""

    long_side: int = 256
    min_aspect: float = 0.5  # short side / long side
    min_objects: int = 2
    max_objects: int = 10
    min_area: int = 24  # visible pixels an annotated object keeps at least
    size_range: tuple[float, float] = (0.04, 0.38)  # object radius, fraction of the long side (log-uniform)


Scene = tuple[np.ndarray, list[np.ndarray]]


def _noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0


def _fractal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multi-octave noise in [0, 1] with a random spectrum slope (smooth .. grainy)."""
    slope = rng.uniform(0.4, 0.9)
    total = np.zeros((h, w), np.float32)
    weight_sum = 0.0
    for octave, cells in enumerate((2, 4, 8, 16, 32, 64)):
        weight = slope**octave
        total += weight * _noise(rng, h, w, cells)
        weight_sum += weight
    total /= weight_sum
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def _palette(rng: np.random.Generator) -> np.ndarray:
    """2-4 colours [n, 3] in 0..255: a random base hue with nearby or contrasting companions."""
    n = int(rng.integers(2, 5))
    base = rng.uniform(0, 255, 3)
    spread = rng.uniform(10, 120)
    colours = np.clip(base[None, :] + rng.normal(0, spread, (n, 3)), 0, 255)
    grey = colours.mean(1, keepdims=True)
    saturation = rng.uniform(0.15, 1.0)  # natural scenes are mostly muted
    return (grey + saturation * (colours - grey)).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A colour field [h, w, 3] in 0..255: noise through a palette, plus a pattern and shading."""
    colours = _palette(rng)
    t = _fractal(rng, h, w) * (len(colours) - 1)
    lo = np.floor(t).astype(np.int64).clip(0, len(colours) - 2)
    frac = (t - lo)[..., None]
    field = colours[lo] * (1 - frac) + colours[lo + 1] * frac
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    kind = rng.choice(["none", "none", "stripes", "spots", "checker", "grain"])
    amp = rng.uniform(0.1, 0.45)
    if kind == "stripes":
        pattern = np.sin(u * 2 * math.pi / rng.uniform(3, 30))
    elif kind == "checker":
        period = rng.uniform(4, 24)
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        pattern = np.sign(np.sin(u * math.pi / period) * np.sin(v * math.pi / period))
    elif kind == "spots":
        pattern = (_noise(rng, h, w, int(rng.integers(12, 40))) > rng.uniform(0.6, 0.8)).astype(np.float32) * -1.0
    elif kind == "grain":
        pattern = rng.normal(0, 0.5, (h, w)).astype(np.float32)
    else:
        pattern = np.zeros((h, w), np.float32)
    shade_angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx / max(w, 1) - 0.5) * math.cos(shade_angle) + (yy / max(h, 1) - 0.5) * math.sin(shade_angle)
    shading = 1 + rng.uniform(0, 0.8) * ramp
    return np.clip(field * ((1 + amp * pattern) * shading)[..., None], 0, 255)


# ---- shapes: each draws one object (255) on an "L" canvas around (cx, cy) with radius r ----------


def _rotate(points: np.ndarray, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rot = points @ np.array([[c, s], [-s, c]], np.float64)
    return [(float(x + cx), float(y + cy)) for x, y in rot]


def _blob(d: ImageDraw.ImageDraw, rng, cx, cy, r, angle) -> None:
    theta = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(1, 6):
        radius += rng.normal(0, 0.35 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    radius = np.clip(radius, 0.25, None)
    aspect = rng.uniform(0.4, 1.0)
    pts = np.stack([r * radius * np.cos(theta), aspect * r * radius * np.sin(theta)], 1)
    d.polygon(_rotate(pts, cx, cy, angle), fill=255)


def _polygon(d, rng, cx, cy, r, angle) -> None:
    n = int(rng.integers(3, 9))
    theta = np.sort(rng.uniform(0, 2 * math.pi, n))
    radius = rng.uniform(0.5, 1.0, n) * r
    pts = np.stack([radius * np.cos(theta), radius * np.sin(theta)], 1)
    d.polygon(_rotate(pts, cx, cy, angle), fill=255)


def _box(d, rng, cx, cy, r, angle) -> None:
    a, b = r, r * rng.uniform(0.2, 1.0)
    pts = np.array([[-a, -b], [a, -b], [a, b], [-a, b]], np.float64)
    d.polygon(_rotate(pts, cx, cy, angle), fill=255)


def _ellipse(d, rng, cx, cy, r, angle) -> None:
    theta = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    b = rng.uniform(0.3, 1.0)
    pts = np.stack([r * np.cos(theta), b * r * np.sin(theta)], 1)
    d.polygon(_rotate(pts, cx, cy, angle), fill=255)


def _curve(d, rng, cx, cy, r, angle) -> None:
    """A thin object: a rope, a stalk, a cable (random walk of bounded curvature)."""
    n = 12
    heading = angle
    x, y = cx - 0.8 * r * math.cos(angle), cy - 0.8 * r * math.sin(angle)
    pts = [(x, y)]
    for _ in range(n):
        heading += rng.normal(0, 0.35)
        x, y = x + 1.6 * r / n * math.cos(heading), y + 1.6 * r / n * math.sin(heading)
        pts.append((x, y))
    d.line(pts, fill=255, width=max(2, int(r * rng.uniform(0.08, 0.3))), joint="curve")


def _composite(d, rng, cx, cy, r, angle) -> None:
    """An object of several parts (a body with limbs, a machine with arms)."""
    _PRIMITIVES[int(rng.integers(len(_PRIMITIVES)))](d, rng, cx, cy, 0.7 * r, angle)
    for _ in range(int(rng.integers(1, 4))):
        t = rng.uniform(0, 2 * math.pi)
        px, py = cx + 0.6 * r * math.cos(t), cy + 0.6 * r * math.sin(t)
        part = _PRIMITIVES[int(rng.integers(len(_PRIMITIVES)))]
        part(d, rng, px, py, r * rng.uniform(0.25, 0.5), rng.uniform(0, 2 * math.pi))


_PRIMITIVES = (_blob, _polygon, _box, _ellipse, _curve)
_SHAPES = (_blob, _blob, _polygon, _box, _ellipse, _curve, _composite, _composite)


def _object_mask(rng: np.random.Generator, h: int, w: int, cfg: CorpusConfig) -> np.ndarray:
    lo, hi = cfg.size_range
    r = math.exp(rng.uniform(math.log(lo), math.log(hi))) * max(h, w)
    cx, cy = rng.uniform(-0.05 * w, 1.05 * w), rng.uniform(-0.05 * h, 1.05 * h)  # may leave the frame
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    _SHAPES[int(rng.integers(len(_SHAPES)))](draw, rng, cx, cy, r, rng.uniform(0, 2 * math.pi))
    if rng.random() < 0.2:  # a hole: a ring, a tyre, a frame
        hole = 0.25 * r * rng.uniform(0.5, 1.2)
        hx, hy = cx + rng.uniform(-0.2, 0.2) * r, cy + rng.uniform(-0.2, 0.2) * r
        draw.ellipse([hx - hole, hy - hole, hx + hole, hy + hole], fill=0)
    return np.asarray(canvas) > 127


def _soft_alpha(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask's opacity with a soft edge (defocus, anti-aliasing): [h, w] float in [0, 1]."""
    radius = float(rng.choice([0.0, 0.5, 1.0, 1.5]))
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(image, dtype=np.float32) / 255.0


def render_scene(seed: int, index: int, cfg: CorpusConfig = CorpusConfig()) -> Scene:
    """Scene `index` of `seed`: an RGB uint8 image [h, w, 3] and its visible object masks."""
    rng = np.random.default_rng([int(seed), int(index), 7])
    long_side = cfg.long_side
    short = int(round(long_side * rng.uniform(cfg.min_aspect, 1.0)))
    h, w = (short, long_side) if rng.random() < 0.75 else (long_side, short)
    image = _texture(rng, h, w)
    if rng.random() < 0.5:  # a second background region (seabed / water, floor / wall)
        horizon = np.clip(rng.uniform(0.2, 0.8) * h + 0.15 * h * (_noise(rng, 1, w, 6)[0] - 0.5), 0, h)
        below = (np.arange(h)[:, None] > horizon[None, :])[..., None]
        image = np.where(below, _texture(rng, h, w), image)
    owner = np.full((h, w), -1, np.int16)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for j in range(count):
        mask = _object_mask(rng, h, w, cfg)
        if mask.sum() < cfg.min_area:
            continue
        alpha = _soft_alpha(mask, rng)[..., None]
        if rng.random() < 0.3:  # a shadow: darker background beside the object, not part of it
            dx, dy = rng.integers(-6, 7, 2)
            shadow = np.roll(np.roll(alpha, int(dy), 0), int(dx), 1) * rng.uniform(0.2, 0.6)
            image = image * (1 - shadow)
        ys, xs = np.nonzero(alpha[..., 0] > 0)
        window = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        bh, bw = window[0].stop - window[0].start, window[1].stop - window[1].start
        fill = _texture(rng, bh, bw)
        if rng.random() < 0.25:  # camouflage: the object takes on the colour of what is behind it
            mix = rng.uniform(0.3, 0.7)
            fill = mix * image[mask].mean(0) + (1 - mix) * fill
        if rng.random() < 0.4:  # an inner part of another colour (a label, a window, a patch)
            inner = _object_mask(rng, h, w, CorpusConfig(size_range=(0.02, 0.12)))[window] & mask[window]
            fill = np.where(inner[..., None], _texture(rng, bh, bw), fill)
        opacity = 1.0 if rng.random() < 0.85 else rng.uniform(0.55, 0.9)
        a = opacity * alpha[window]
        image[window] = image[window] * (1 - a) + fill * a
        owner[mask] = j
    env = water_environment(rng, float(rng.uniform(0.0, 1.0)))
    out = apply_environment(image, env, rng)
    out = _camera(out, rng)
    masks = [owner == j for j in range(count)]
    return out, [m for m in masks if m.sum() >= cfg.min_area]


def _camera(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Defocus and JPEG compression, each half of the time."""
    pil = Image.fromarray(image)
    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(rng.integers(30, 95)))
        buf.seek(0)
        pil = Image.open(buf).convert("RGB")
    return np.asarray(pil)
