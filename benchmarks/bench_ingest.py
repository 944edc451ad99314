"""Ingestion speed on the real TrashCan folder, and the quarantine report of a corrupted copy.

    .venv/bin/python benchmarks/bench_ingest.py [--trashcan PATH] [--repeats 3]

Prints markdown tables. The raw folder is only read; the corrupted copy lives in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpcsam.config import read_params_file  # noqa: E402
from cpcsam.data.ingest import run_ingest  # noqa: E402
from cpcsam.errors import DataError  # noqa: E402

DEFAULT_TRASHCAN = Path(os.environ.get("CPCSAM_SHARED_DIR", ROOT.parent / "shared")) / "data" / "trashcan"


def _data_cfg(profile: str, root: Path | None = None) -> dict:
    data = read_params_file(ROOT / "params.yaml")["data"]
    data = {**data, "profile": profile, "progress": False}
    if root is not None:
        data["profiles"] = {**data["profiles"], profile: {**data["profiles"][profile], "root": str(root)}}
    return data


def _timed(data: dict, repeats: int) -> tuple[dict, list[float]]:
    times, summary = [], {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            summary = run_ingest(data, out)
            times.append(time.perf_counter() - t0)
    return summary, times


def _corrupt_copy(src: Path, dest: Path) -> list[str]:
    """Copy the folder and damage it; returns what was done."""
    shutil.copytree(src, dest)
    coco = json.loads((dest / "annotations.json").read_text())
    images = coco["images"]
    done = []
    for im in images[10:13]:  # three images overwritten with garbage
        (dest / "images" / im["file_name"]).write_bytes(os.urandom(2048))
        done.append(f"garbage bytes: {im['file_name']}")
    path = dest / "images" / images[20]["file_name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    done.append(f"truncated to 1/3: {images[20]['file_name']}")
    images[30]["file_name"] = "../../../etc/hostname"
    done.append(f"file_name escaping the root: image id {images[30]['id']}")
    anns = coco["annotations"]
    anns[40]["segmentation"] = {"size": anns[40]["segmentation"]["size"], "counts": "0000zzzz"}
    done.append(f"bad RLE counts: annotation {anns[40]['id']}")
    anns[50]["category_id"] = 999
    done.append(f"unknown category 999: annotation {anns[50]['id']}")
    (dest / "annotations.json").write_text(json.dumps(coco))
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trashcan", type=Path, default=DEFAULT_TRASHCAN)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (args.trashcan / "annotations.json").is_file():
        print(f"TrashCan folder not found: {args.trashcan}", file=sys.stderr)
        return 2
    print(f"## Ingestion speed ({os.cpu_count()} cores, median of {args.repeats} runs)\n")
    print("| source | images read | images in manifest | entities | seconds | images/s | quarantined |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, data in (
        ("TrashCan (COCO, local)", _data_cfg("trashcan", args.trashcan)),
        ("oceancoco (synthetic, generated)", _data_cfg("oceancoco")),
    ):
        summary, times = _timed(data, args.repeats)
        sec = statistics.median(times)
        print(f"| {label} | {summary['images_read']} | {summary['n_images']} | {summary['n_entities']} | "
              f"{sec:.2f} | {summary['images_read'] / sec:.0f} | {summary['quarantine']['n_items']} |")

    with tempfile.TemporaryDirectory() as tmp:
        damaged = Path(tmp) / "trashcan"
        done = _corrupt_copy(args.trashcan, damaged)
        print("\n## Corrupted copy\n")
        for line in done:
            print(f"- {line}")
        out = Path(tmp) / "out"
        try:
            summary = run_ingest(_data_cfg("trashcan", damaged), out)
            outcome = "ingestion passed (quarantined fraction under the limit)"
        except DataError as exc:
            summary = json.loads((out / "summary.json").read_text())
            outcome = f"ingestion failed: {exc}"
        report = json.loads((out / "quarantine.json").read_text())
        print(f"\n{outcome}\n")
        print(f"quarantined {report['n_quarantined']} item(s), fraction {report['fraction']:.4f} of "
              f"{sum(report['n_examined'].values())} examined; manifest: {summary['n_images']} images, "
              f"{summary['n_entities']} entities\n")
        print("| reason | count |")
        print("| --- | --- |")
        for reason, n in report["counts_by_reason"].items():
            print(f"| {reason} | {n} |")
        print("\n| file | reason | detail |")
        print("| --- | --- | --- |")
        for item in report["items"]:
            print(f"| {Path(item['file']).name if not item['file'].startswith('..') else item['file']} | "
                  f"{item['reason']} | {item['detail'].replace('|', '/')[:110]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
