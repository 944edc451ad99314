"""The embedded default source: a deterministic synthetic deep-sea generator.

Images come in *dives*: a few frames sharing their water (colour cast, haze, light) and their
seabed, like near-duplicate frames of one video; the dive is the split group. Each frame holds
1-5 entities from 14 classes with their own shape, texture, colour and opacity statistics.

The environment factors are the confounders of the paper's causal story. They are drawn from
a random stream of their own, independent of which classes appear, and `confounder_strength`
(0 = clear neutral water, 1 = strong) scales all of them: water colour cast, haze/turbidity,
illumination gradient, marine snow, seabed texture contrast and sensor noise.

Everything is a pure function of the config (seed included): same config, same PNG bytes.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from PIL import Image, ImageDraw

from cpcsam.config import SyntheticProfile
from cpcsam.data.masks import encode_mask, mask_bbox
from cpcsam.data.records import EntityRecord, ImageRecord, Quarantine
from cpcsam.errors import ConfigError

log = logging.getLogger(__name__)

Point = tuple[float, float]


# ---- shapes: each draws one entity (255) onto an "L" canvas, centred at (cx, cy), size r ----


def _rot(points: list[Point], cx: float, cy: float, angle: float) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _ellipse(a: float, b: float, n: int = 28, start: float = 0.0, end: float = 2 * math.pi) -> list[Point]:
    return [(a * math.cos(t), b * math.sin(t)) for t in np.linspace(start, end, n)]


def _fish(d: ImageDraw.ImageDraw, cx, cy, r, ang, rng) -> None:
    body = _ellipse(r, 0.42 * r)
    tail = [(-0.8 * r, 0.0), (-1.45 * r, -0.5 * r), (-1.3 * r, 0.0), (-1.45 * r, 0.5 * r)]
    fin = [(-0.1 * r, -0.35 * r), (0.25 * r, -0.7 * r), (0.35 * r, -0.3 * r)]
    for part in (body, tail, fin):
        d.polygon(_rot(part, cx, cy, ang), fill=255)


def _jellyfish(d, cx, cy, r, ang, rng) -> None:
    ang = 0.25 * math.sin(ang)  # jellyfish float bell-up
    bell = _ellipse(r, 0.75 * r, start=math.pi, end=2 * math.pi) + [(r, 0.1 * r), (-r, 0.1 * r)]
    d.polygon(_rot(bell, cx, cy, ang), fill=255)
    for k in range(int(rng.integers(4, 7))):
        x0 = -0.7 * r + 1.4 * r * k / 5
        pts = [(x0 + 0.12 * r * math.sin(3 * t + k), 0.1 * r + t * 0.45 * r) for t in np.linspace(0, 3, 10)]
        d.line(_rot(pts, cx, cy, ang), fill=255, width=max(1, int(r * 0.07)))


def _coral(d, cx, cy, r, ang, rng) -> None:
    def branch(x, y, length, theta, width, depth):
        x2, y2 = x + length * math.cos(theta), y + length * math.sin(theta)
        d.line([(x, y), (x2, y2)], fill=255, width=max(1, int(width)))
        d.ellipse([x2 - width / 2, y2 - width / 2, x2 + width / 2, y2 + width / 2], fill=255)
        if depth > 0:
            for dt in (-0.5, 0.45):
                branch(x2, y2, length * 0.72, theta + dt + rng.normal(0, 0.15), width * 0.72, depth - 1)

    branch(cx, cy + 0.9 * r, 0.8 * r, -math.pi / 2 + 0.2 * math.sin(ang), 0.28 * r, 3)


def _starfish(d, cx, cy, r, ang, rng) -> None:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.38 * r
        t = k * math.pi / 5
        pts.append((rad * math.cos(t), rad * math.sin(t)))
    d.polygon(_rot(pts, cx, cy, ang), fill=255)


def _crab(d, cx, cy, r, ang, rng) -> None:
    w = max(1, int(0.09 * r))
    for side in (-1, 1):
        for k in range(4):
            t = -0.6 + 0.4 * k
            knee = (side * 0.75 * r, 0.3 * r * t)
            foot = (side * 1.05 * r, 0.55 * r * t + 0.3 * r)
            d.line(_rot([(side * 0.4 * r, 0.2 * r * t), knee, foot], cx, cy, ang), fill=255, width=w)
        claw = _rot([(side * 0.55 * r, -0.65 * r)], cx, cy, ang)[0]
        cr = 0.22 * r
        d.ellipse([claw[0] - cr, claw[1] - cr, claw[0] + cr, claw[1] + cr], fill=255)
        d.line(_rot([(side * 0.3 * r, -0.2 * r), (side * 0.55 * r, -0.65 * r)], cx, cy, ang), fill=255, width=w)
    d.polygon(_rot(_ellipse(0.62 * r, 0.42 * r), cx, cy, ang), fill=255)


def _eel(d, cx, cy, r, ang, rng) -> None:
    phase = rng.uniform(0, 2 * math.pi)
    pts = [(t * r, 0.3 * r * math.sin(2.2 * t + phase)) for t in np.linspace(-1.3, 1.3, 24)]
    d.line(_rot(pts, cx, cy, ang), fill=255, width=max(2, int(0.22 * r)), joint="curve")
    head = _rot([pts[-1]], cx, cy, ang)[0]
    hr = 0.14 * r
    d.ellipse([head[0] - hr, head[1] - hr, head[0] + hr, head[1] + hr], fill=255)


def _sea_urchin(d, cx, cy, r, ang, rng) -> None:
    for k in range(28):
        t = ang + k * 2 * math.pi / 28
        d.line([(cx, cy), (cx + r * math.cos(t), cy + r * math.sin(t))], fill=255, width=max(1, int(0.05 * r)))
    b = 0.5 * r
    d.ellipse([cx - b, cy - b, cx + b, cy + b], fill=255)


def _sponge(d, cx, cy, r, ang, rng) -> None:
    n = 18
    radii = 1.0 + 0.25 * np.convolve(rng.normal(0, 1, n + 4), np.ones(5) / 5, mode="valid")[:n]
    pts = [(r * radii[k] * math.cos(2 * math.pi * k / n), 0.85 * r * radii[k] * math.sin(2 * math.pi * k / n)) for k in range(n)]
    d.polygon(_rot(pts, cx, cy, ang), fill=255)
    for _ in range(int(rng.integers(2, 5))):  # oscula: real holes in the mask
        hx, hy = cx + rng.uniform(-0.45, 0.45) * r, cy + rng.uniform(-0.4, 0.4) * r
        hr = rng.uniform(0.07, 0.14) * r
        d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=0)


def _sea_cucumber(d, cx, cy, r, ang, rng) -> None:
    half, rad = 0.95 * r, 0.3 * r
    pts = _ellipse(rad, rad, 12, -math.pi / 2, math.pi / 2)
    cap = [(x + half - rad, y) for x, y in pts] + [(-x - half + rad, -y) for x, y in pts]
    d.polygon(_rot(cap, cx, cy, ang), fill=255)


def _shrimp(d, cx, cy, r, ang, rng) -> None:
    pts = [(0.8 * r * math.cos(t), 0.8 * r * math.sin(t)) for t in np.linspace(-0.3, 3.6, 14)]
    widths = np.linspace(0.32, 0.08, len(pts) - 1) * r
    rot = _rot(pts, cx, cy, ang)
    for k in range(len(rot) - 1):
        d.line([rot[k], rot[k + 1]], fill=255, width=max(1, int(widths[k])))
    tip = rot[0]
    for da in (-0.5, -0.8):
        d.line([tip, (tip[0] + r * math.cos(ang + da), tip[1] + r * math.sin(ang + da))], fill=255, width=1)


def _anemone(d, cx, cy, r, ang, rng) -> None:
    d.rectangle([cx - 0.3 * r, cy, cx + 0.3 * r, cy + 0.8 * r], fill=255)
    for k in range(11):
        t = -math.pi + 0.15 + k * (math.pi - 0.3) / 10
        wob = 0.15 * r * math.sin(k + ang)
        d.line([(cx, cy + 0.05 * r), (cx + r * math.cos(t) + wob, cy + 0.9 * r * math.sin(t))], fill=255, width=max(1, int(0.1 * r)))


def _bottle(d, cx, cy, r, ang, rng) -> None:
    body = [(-r, -0.32 * r), (0.35 * r, -0.32 * r), (0.6 * r, -0.12 * r), (r, -0.1 * r), (r, 0.1 * r), (0.6 * r, 0.12 * r), (0.35 * r, 0.32 * r), (-r, 0.32 * r)]
    d.polygon(_rot(body, cx, cy, ang), fill=255)


def _can(d, cx, cy, r, ang, rng) -> None:
    body = [(-0.6 * r, -0.38 * r), (0.6 * r, -0.38 * r), (0.6 * r, 0.38 * r), (-0.6 * r, 0.38 * r)]
    d.polygon(_rot(body, cx, cy, ang), fill=255)


def _tire(d, cx, cy, r, ang, rng) -> None:
    d.ellipse([cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r], fill=255)
    d.ellipse([cx - 0.5 * r, cy - 0.4 * r, cx + 0.5 * r, cy + 0.4 * r], fill=0)


@dataclass(frozen=True)
class ClassStyle:
    draw: Callable[..., None]
    rgb: tuple[int, int, int]  # mean colour
    jitter: float  # colour std (0..255 scale)
    texture: str  # stripes | spots | mottled | plain | bands | radial | glint
    opacity: float  # < 1: translucent, the background shows through
    size: tuple[float, float]  # radius range, fraction of min(H, W)


CLASSES: dict[str, ClassStyle] = {
    "fish": ClassStyle(_fish, (235, 150, 40), 18, "stripes", 1.0, (0.08, 0.14)),
    "jellyfish": ClassStyle(_jellyfish, (225, 170, 235), 15, "plain", 0.55, (0.08, 0.14)),
    "coral": ClassStyle(_coral, (215, 60, 80), 20, "spots", 1.0, (0.12, 0.18)),
    "starfish": ClassStyle(_starfish, (240, 95, 45), 15, "spots", 1.0, (0.07, 0.12)),
    "crab": ClassStyle(_crab, (170, 70, 40), 15, "mottled", 1.0, (0.07, 0.11)),
    "eel": ClassStyle(_eel, (110, 120, 70), 12, "bands", 1.0, (0.12, 0.18)),
    "sea_urchin": ClassStyle(_sea_urchin, (60, 25, 75), 10, "radial", 1.0, (0.06, 0.1)),
    "sponge": ClassStyle(_sponge, (225, 205, 70), 18, "spots", 1.0, (0.08, 0.13)),
    "sea_cucumber": ClassStyle(_sea_cucumber, (120, 80, 50), 12, "spots", 1.0, (0.08, 0.13)),
    "shrimp": ClassStyle(_shrimp, (245, 150, 140), 12, "bands", 0.7, (0.06, 0.1)),
    "anemone": ClassStyle(_anemone, (120, 220, 150), 18, "stripes", 0.9, (0.08, 0.13)),
    "bottle": ClassStyle(_bottle, (70, 160, 80), 15, "glint", 0.65, (0.06, 0.1)),
    "can": ClassStyle(_can, (200, 200, 210), 10, "glint", 1.0, (0.04, 0.07)),
    "tire": ClassStyle(_tire, (30, 30, 32), 6, "stripes", 1.0, (0.08, 0.12)),
}


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w))
    grid = (rng.random((gh, gw)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _texture(style: ClassStyle, rng: np.random.Generator, h: int, w: int, box: tuple[int, int, int, int], ang: float) -> np.ndarray:
    """The entity's colour field over its bounding box: [bh, bw, 3] float in 0..255."""
    x0, y0, x1, y1 = box
    bh, bw = y1 - y0, x1 - x0
    base = np.clip(np.array(style.rgb, np.float32) + rng.normal(0, style.jitter, 3), 0, 255)
    yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    if style.texture == "stripes":
        pat = 0.35 * np.sign(np.sin(u / max(2.0, 0.12 * max(bh, bw)) * math.pi))
    elif style.texture == "bands":
        pat = 0.25 * np.sin(u / max(1.5, 0.06 * max(bh, bw)) * math.pi)
    elif style.texture == "spots":
        pat = np.zeros((bh, bw), np.float32)
        for _ in range(max(3, bh * bw // 60)):
            sx, sy, sr = rng.uniform(0, bw), rng.uniform(0, bh), rng.uniform(1.0, 2.5)
            pat[(xx - sx) ** 2 + (yy - sy) ** 2 < sr * sr] = -0.4
    elif style.texture == "mottled":
        pat = 0.6 * (_smooth_noise(rng, bh, bw, 6) - 0.5)
    elif style.texture == "radial":
        rr = np.hypot(xx - bw / 2, yy - bh / 2) / (0.5 * max(bh, bw) + 1e-6)
        pat = 0.6 * (rr - 0.5)
    elif style.texture == "glint":
        v = -xx * math.sin(ang) + yy * math.cos(ang)
        v = (v - v.mean()) / (v.std() + 1e-6)
        pat = 0.9 * np.exp(-((v + 0.6) ** 2) * 4)
    else:  # plain
        pat = np.zeros((bh, bw), np.float32)
    pat = pat + rng.normal(0, 0.04, (bh, bw))
    return np.clip(base[None, None, :] * (1.0 + pat[..., None]), 0, 255)


def water_environment(rng: np.random.Generator, strength: float) -> dict[str, Any]:
    """One dive's environment; strength 0 gives neutral, clear, evenly lit water."""
    casts = np.array([[0.55, 0.85, 1.15], [0.6, 1.1, 0.9], [0.5, 1.0, 1.1], [0.9, 0.95, 0.8], [0.7, 0.8, 1.2]], np.float32)
    cast = 1.0 + strength * (casts[rng.integers(len(casts))] * rng.uniform(0.85, 1.15, 3) - 1.0)
    return {
        "cast": cast.astype(np.float32),
        "water_rgb": np.clip(np.array([20, 60, 90], np.float32) * cast * rng.uniform(0.7, 1.4), 0, 255),
        "haze": strength * rng.uniform(0.1, 0.55),
        "light_angle": rng.uniform(0, 2 * math.pi),
        "light_amp": strength * rng.uniform(0.15, 0.6),
        "snow": strength * rng.uniform(0.0, 1.0),
        "seabed_rgb": np.array([120, 110, 85], np.float32) * rng.uniform(0.6, 1.2, 3),
        "seabed_contrast": 0.15 + 0.6 * strength * rng.uniform(0.3, 1.0),
        "seabed_line": rng.uniform(0.35, 0.65),
        "noise_sigma": strength * rng.uniform(1.0, 9.0),
        "bg_seed": int(rng.integers(2**31)),
    }


def _background(env: dict[str, Any], h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(env["bg_seed"])  # shared by all frames of the dive
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    water = env["water_rgb"][None, None, :] * (1.25 - 0.5 * yy)
    tex = 0.6 * _smooth_noise(rng, h, w, 24) + 0.4 * _smooth_noise(rng, h, w, 6)
    seabed = env["seabed_rgb"][None, None, :] * (1 + env["seabed_contrast"] * (tex[..., None] - 0.5) * 2)
    ridge = env["seabed_line"] + 0.08 * (_smooth_noise(rng, 1, w, 8)[0] - 0.5)
    blend = np.clip((yy[..., 0] - ridge[None, :]) * 12, 0, 1)[..., None]
    return np.broadcast_to(water, (h, w, 3)) * (1 - blend) + seabed * blend


def apply_environment(img: np.ndarray, env: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    h, w, _ = img.shape
    out = img * env["cast"][None, None, :]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xx / w - 0.5) * math.cos(env["light_angle"]) + (yy / h - 0.5) * math.sin(env["light_angle"])
    out = out * (1 + env["light_amp"] * ramp * 2)[..., None]
    depth = 0.5 + 0.5 * (yy / h)  # haze thickens towards the bottom of the frame
    t = np.clip(env["haze"] * depth, 0, 0.9)[..., None]
    out = out * (1 - t) + env["water_rgb"][None, None, :] * 1.3 * t
    for _ in range(int(env["snow"] * 0.002 * h * w)):
        sx, sy = int(rng.integers(w)), int(rng.integers(h))
        out[max(0, sy - 1) : sy + 1, max(0, sx - 1) : sx + 1] = out[max(0, sy - 1) : sy + 1, max(0, sx - 1) : sx + 1] * 0.3 + 200
    out = out + rng.normal(0, env["noise_sigma"], out.shape) if env["noise_sigma"] > 0 else out
    return np.clip(out, 0, 255).round().astype(np.uint8)


class SyntheticSource:
    """Synthetic deep-sea dives; writes its PNGs into `images_dir` (a DVC out)."""

    name = "synthetic"

    def __init__(self, cfg: SyntheticProfile | Mapping[str, Any], images_dir: str | Path) -> None:
        from cpcsam.data.sources.common import as_profile

        cfg = as_profile(SyntheticProfile, cfg)
        self.num_images = cfg.num_images
        self.width = cfg.width
        self.height = cfg.height
        self.frames_per_dive = cfg.frames_per_dive
        self.min_entities = cfg.min_entities
        self.max_entities = cfg.max_entities
        self.strength = cfg.confounder_strength
        self.seed = cfg.seed
        # small enough for tiny test images, large enough that an entity is more than a speck
        self.min_area = cfg.min_entity_area or max(12, self.width * self.height // 2000)
        names = cfg.classes or list(CLASSES)
        unknown = sorted(set(names) - set(CLASSES))
        if unknown:
            raise ConfigError(f"params data synthetic classes: unknown {unknown}; known {list(CLASSES)}")
        self.class_names = list(names)
        if not (1 <= self.min_entities <= self.max_entities):
            raise ConfigError("params data synthetic: need 1 <= min_entities <= max_entities")
        if not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"params data synthetic confounder_strength={self.strength}: must be in [0, 1]")
        if self.num_images < 1 or self.frames_per_dive < 1 or min(self.width, self.height) < 32:
            raise ConfigError("params data synthetic: need num_images >= 1, frames_per_dive >= 1, width/height >= 32")
        self.images_dir = Path(images_dir)

    def classes(self) -> list[str]:
        return list(self.class_names)

    def __len__(self) -> int:
        return self.num_images

    def _class_deck(self) -> Iterator[str]:
        """Classes dealt from reshuffled decks: near-equal counts, independent of the water."""
        rng = np.random.default_rng([self.seed, 1])
        while True:
            for i in rng.permutation(len(self.class_names)):
                yield self.class_names[i]

    def render(self, index: int, env: dict[str, Any], classes: list[str]) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
        """Frame `index`: the RGB image and its (class, visible mask) entities."""
        h, w = self.height, self.width
        rng = np.random.default_rng([self.seed, 2, index])
        img = _background(env, h, w)
        owner = np.full((h, w), -1, np.int16)
        drawn: list[str] = []
        scale = min(h, w)
        for cls in classes:
            style = CLASSES[cls]
            placed = False
            for _attempt in range(8):  # re-place when it would mostly hide earlier entities
                r = max(5.0, rng.uniform(*style.size) * scale)
                cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
                ang = rng.uniform(0, 2 * math.pi)
                canvas = Image.new("L", (w, h), 0)
                style.draw(ImageDraw.Draw(canvas), cx, cy, r, ang, rng)
                mask = np.asarray(canvas) > 127
                if mask.sum() < self.min_area:
                    continue
                placed = True
                if (owner[mask] >= 0).mean() < 0.3:
                    break
            if not placed:
                continue
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            tex = _texture(style, rng, h, w, box, ang)
            sub = mask[box[1] : box[3], box[0] : box[2]]
            patch = img[box[1] : box[3], box[0] : box[2]]
            patch[sub] = style.opacity * tex[sub] + (1 - style.opacity) * patch[sub]
            owner[mask] = len(drawn)
            drawn.append(cls)
        img = apply_environment(img, env, rng)
        entities = []
        for j, cls in enumerate(drawn):
            visible = owner == j
            if visible.sum() >= self.min_area:  # an entity hidden by later ones is not annotated
                entities.append((cls, visible))
        return img, entities

    def records(self, quarantine: Quarantine) -> Iterator[ImageRecord]:
        self.images_dir.mkdir(parents=True, exist_ok=True)
        deck = self._class_deck()
        count_rng = np.random.default_rng([self.seed, 3])
        env_rng = np.random.default_rng([self.seed, 4])
        env: dict[str, Any] = {}
        for index in range(self.num_images):
            dive, frame = divmod(index, self.frames_per_dive)
            if frame == 0:
                env = water_environment(env_rng, self.strength)
            # frames of a dive share the water, with a small per-frame drift of the light
            frame_env = dict(env, light_angle=env["light_angle"] + 0.1 * frame)
            n = int(count_rng.integers(self.min_entities, self.max_entities + 1))
            classes = [next(deck) for _ in range(n)]
            img, entities = self.render(index, frame_env, classes)
            image_id = f"dive{dive:04d}_frame{frame:02d}"
            path = self.images_dir / f"{image_id}.png"
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=1)  # noisy pixels: zlib effort buys little
            path.write_bytes(buf.getvalue())
            quarantine.saw("image")
            quarantine.saw("annotation", len(entities))
            rec = ImageRecord(image_id, str(path.resolve()), self.width, self.height, f"dive{dive:04d}")
            for j, (cls, mask) in enumerate(entities):
                rec.entities.append(
                    EntityRecord(f"{image_id}_e{j}", cls, encode_mask(mask), mask_bbox(mask), int(mask.sum()))
                )
            yield rec
