"""What focus crops cost at inference: whole images vs crops, side by side in one run.

    python benchmarks/bench_crops.py [--profile trashcan] [--split test] [--protocol box@0]
        [--context 2] [--repeats 3] [--sam checkpoints/sam_small_generalist.pth]

Scores nothing: it times `Predictor.encode` + `Predictor.predict` over every image of the split
(the starting SAM, one thread), under three settings taken in turn, image by image, so that a
drift of the machine's speed hits all three alike:

- `whole`: crops off, one encoder pass per image;
- `crops`: `model.crop.context`, the whole image encoded only if an entity lacks a box;
- `crops, eager`: the same, with the whole image always encoded first (as before the encoding
  became lazy), the yardstick of what that saves.

Prints median ms per image over the repeats and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="trashcan")
    parser.add_argument("--split", default="test")
    parser.add_argument("--protocol", default="box@0")
    parser.add_argument("--context", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sam", default=None, help="segment-anything checkpoint (default: model.checkpoint)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from bench_starting_sam import manifest_for

    from cpcsam.config import CropConfig, load_config
    from cpcsam.data import read_image
    from cpcsam.evaluation.protocols import Protocol, entity_prompts, image_records
    from cpcsam.inference import Predictor
    from cpcsam.modeling import CPCSAM, build_sam

    params = load_config(ROOT / "params.yaml", [])
    root = getattr(params.data.profiles.get(args.profile), "root", None)
    if root is not None and not str(root).startswith("s3://") and not Path(root).is_dir():
        parser.exit(2, f"bench_crops: profile {args.profile}: {root} is absent\n")
    manifest, _ = manifest_for(params, args.profile)
    images = image_records(manifest, [args.split])
    pixels = [np.array(read_image(im.uri)) for im in images]
    protocol = Protocol.parse(args.protocol)
    prompts = [entity_prompts(protocol, im, 0) for im in images]
    section = params.model if args.sam is None else params.model.model_copy(update={"checkpoint": args.sam})
    model = CPCSAM(build_sam(section), {"mode": "fixed"}).eval()
    whole = Predictor.from_model(model)
    crops = Predictor.from_model(model, crop=CropConfig(context=args.context))

    def eager(image: np.ndarray):
        encoded = crops.encode(image)
        encoded.embedding  # noqa: B018 (the whole image's encoder pass, up front)
        return encoded

    settings = {"whole": (whole, whole.encode), "crops": (crops, crops.encode), "crops, eager": (crops, eager)}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    with torch.no_grad():
        for _ in range(args.repeats):
            totals = dict.fromkeys(settings, 0.0)
            for image, entity in zip(pixels, prompts):
                for name, (predictor, encode) in settings.items():
                    start = time.perf_counter()
                    predictor.predict(encode(image), entity)
                    totals[name] += time.perf_counter() - start
            for name, total in totals.items():
                seconds[name].append(total)
    ms = {name: 1000 * float(np.median(s)) / len(images) for name, s in seconds.items()}
    entities = sum(len(p) for p in prompts)
    print(f"{args.profile} {args.split}: {len(images)} images, {entities} entities, {args.protocol}, "
          f"crop context {args.context:g}, {args.repeats} repeats, 1 thread\n")
    print("| setting | ms / image (median) | vs whole |\n| --- | ---: | ---: |")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {value / ms['whole']:.2f}× |")
    print(f"\ncrops / crops, eager: {ms['crops'] / ms['crops, eager']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
