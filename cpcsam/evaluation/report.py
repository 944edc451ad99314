"""What people look at: the markdown table, the plots, the overlays, the Dice-vs-noise curve.

Inputs are the plain `metrics.json` structure written by `cpcsam.evaluation.protocols`:

    {"models": {model: {"protocols": {protocol: summary}}},
     "protocols": {protocol: {"kind": ..., "sigma": ...}}, "headline": {...}, ...}

where a `summary` is `cpcsam.evaluation.metrics.summarize`'s dict. Plots use matplotlib's Agg
backend (no display); overlays are plain numpy + PIL so that prediction can use them too.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

# A fixed, colour-blind-friendly cycle (Okabe–Ito), so an entity keeps its colour across panels.
PALETTE = np.array(
    [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
     (204, 121, 167), (255, 255, 255)],
    dtype=np.float32,
)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """One row per (model, protocol): Dice/IoU (%) for base, target, overall, and label-map mIoU."""
    lines = [
        "| model | protocol | base Dice | target Dice | overall Dice | base IoU | target IoU | label-map mIoU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, entry in metrics["models"].items():
        for protocol, s in entry["protocols"].items():
            lines.append(
                f"| {model} | {protocol} | {_fmt(s['base']['dice'])} | {_fmt(s['target']['dice'])} | "
                f"{_fmt(s['overall']['dice'])} | {_fmt(s['base']['iou'])} | {_fmt(s['target']['iou'])} | "
                f"{_fmt(s.get('label_map_miou'))} |"
            )
    head = metrics.get("headline") or {}
    notes = [
        "",
        "Numbers are percentages. Dice/IoU per class are averaged over the images where the class is present;",
        "base/target/overall are means over classes. `box@σ` / `points@σ`: prompts from the ground truth with",
        "noise σ (box sides moved by U(−σ, σ)·side; points displaced likewise); `auto`: automatic prompts from",
        "class prototypes of the support subset (target classes only); `+ttaK`: test-time calibration over K",
        "perturbations, logits averaged.",
    ]
    if head:
        notes.append(
            f"Gating numbers: model `{head.get('model')}`, protocol `{head.get('protocol')}`: target Dice "
            f"{_fmt(head.get('target_dice'))}, base Dice {_fmt(head.get('base_dice'))}."
        )
    calibration = metrics.get("calibration")
    if calibration:
        chosen = ", ".join(f"{model} {entry['threshold']:g}" for model, entry in calibration["models"].items())
        notes.append(f"Mask thresholds (`evaluate.threshold: auto`, best base-class Dice at box@0 on the "
                     f"{calibration['split']} split): {chosen}; the prompt-only references answer hard masks.")
    return "\n".join(lines + notes) + "\n"


def scores(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The compact numbers for `dvc metrics show/diff`: the headline and, per model and protocol,
    base/target Dice (metrics.json keeps everything else: IoU, per-class, label-map mIoU, counts)."""
    out: dict[str, Any] = {"headline": {k: v for k, v in (metrics.get("headline") or {}).items()
                                        if isinstance(v, (int, float)) or v is None}}
    for model, entry in metrics["models"].items():
        out[model] = {protocol: {"base_dice": s["base"]["dice"], "target_dice": s["target"]["dice"]}
                      for protocol, s in entry["protocols"].items()}
    return out


def noise_curve_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Dice vs prompt noise, one row per σ: `sigma`, then `<model>_<kind>` target Dice columns.

    Wide format so that `dvc plots` can draw each model/kind as one line against `sigma`.
    """
    table: dict[float, dict[str, Any]] = {}
    for model, entry in metrics["models"].items():
        for protocol, summary in entry["protocols"].items():
            spec = metrics["protocols"][protocol]
            if spec["kind"] not in ("box", "points") or spec.get("tta", 1) > 1:
                continue
            row = table.setdefault(float(spec["sigma"]), {"sigma": float(spec["sigma"])})
            row[f"{model}_{spec['kind']}"] = summary["target"]["dice"]
            row[f"{model}_{spec['kind']}_base"] = summary["base"]["dice"]
    return [table[s] for s in sorted(table)]


def write_noise_curve(metrics: Mapping[str, Any], path: str | Path) -> list[dict[str, Any]]:
    rows = noise_curve_rows(metrics)
    columns = sorted({k for r in rows for k in r} - {"sigma"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sigma", *columns])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in ["sigma", *columns]})
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_class_dice(metrics: Mapping[str, Any], protocol: str, path: str | Path) -> None:
    """Grouped bars: per-class Dice of every model under `protocol`, base classes then target ones."""
    plt = _pyplot()
    base, target = list(metrics["classes"]["base"]), list(metrics["classes"]["target"])
    models = [m for m, e in metrics["models"].items() if protocol in e["protocols"]]
    names = [c for c in base + target if any(c in metrics["models"][m]["protocols"][protocol]["per_class"] for m in models)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * max(1, len(models)) / 2 + 2), 4.2))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(names))
    for i, model in enumerate(models):
        per_class = metrics["models"][model]["protocols"][protocol]["per_class"]
        values = [100 * (per_class.get(c, {}).get("dice") or 0.0) for c in names]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model)
    n_base = sum(1 for c in names if c in base)
    if 0 < n_base < len(names):
        ax.axvline(n_base - 0.5, color="black", linestyle="--", linewidth=1)
        ax.text(n_base - 0.6, 101, "base", ha="right", va="bottom", fontsize=8)
        ax.text(n_base - 0.4, 101, "target", ha="left", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 108)
    ax.set_ylabel("Dice (%)")
    ax.set_title(f"Per-class Dice, prompts {protocol}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dice_vs_noise(metrics: Mapping[str, Any], path: str | Path) -> None:
    """Target (solid) and base (dashed) Dice against prompt noise σ, one colour per model, per kind."""
    plt = _pyplot()
    rows = noise_curve_rows(metrics)
    kinds = sorted({spec["kind"] for spec in metrics["protocols"].values() if spec["kind"] in ("box", "points")})
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.5 * max(1, len(kinds)), 3.8), squeeze=False)
    sigmas = [r["sigma"] for r in rows]
    for ax, kind in zip(axes[0], kinds):
        for i, model in enumerate(metrics["models"]):
            color = f"C{i}"
            for suffix, style, label in (("", "-", "target"), ("_base", "--", "base")):
                ys = [r.get(f"{model}_{kind}{suffix}") for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(sigmas, [np.nan if y is None else 100 * y for y in ys], style, color=color,
                            marker="o", label=f"{model} ({label})")
        ax.set_xlabel("prompt noise σ")
        ax.set_ylabel("Dice (%)")
        ax.set_title(f"{kind} prompts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlay_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """The RGB image with each mask tinted in its own colour and its label at the mask's top-left."""
    out = image.astype(np.float32).copy()
    for j, mask in enumerate(masks):
        m = np.asarray(mask, bool)
        if m.any():
            out[m] = (1 - alpha) * out[m] + alpha * PALETTE[j % len(PALETTE)]
    result = out.clip(0, 255).astype(np.uint8)
    if labels:
        pil = Image.fromarray(result)
        draw = ImageDraw.Draw(pil)
        for j, (mask, text) in enumerate(zip(masks, labels)):
            m = np.asarray(mask, bool)
            if m.any():
                ys, xs = np.nonzero(m)
                pos = (int(xs.min()), max(0, int(ys.min()) - 11))
                draw.text(pos, str(text), fill=tuple(int(c) for c in PALETTE[j % len(PALETTE)]))
        result = np.asarray(pil)
    return result


def side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str] | None = None, gap: int = 4) -> np.ndarray:
    """Panels of the same height next to each other (with a title strip when `titles` are given)."""
    height = max(p.shape[0] for p in panels)
    strip = 14 if titles else 0
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.zeros((height + strip, width, 3), np.uint8)
    x = 0
    for i, panel in enumerate(panels):
        canvas[strip : strip + panel.shape[0], x : x + panel.shape[1]] = panel
        x += panel.shape[1] + gap
    if titles:
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        x = 0
        for panel, title in zip(panels, titles):
            draw.text((x + 3, 1), title, fill=(255, 255, 255))
            x += panel.shape[1] + gap
        canvas = np.asarray(pil)
    return canvas


def save_png(array: np.ndarray, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
