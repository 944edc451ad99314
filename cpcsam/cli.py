"""The `cpcsam` console command.

`cpcsam run` runs the DVC pipeline (`dvc repro`) and prints where the results are.
Other subcommands register themselves in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from cpcsam.errors import CpcSamError

RESULTS = {
    "manifest": "data/ingest/manifest.parquet",
    "quarantine report": "data/ingest/quarantine.json",
    "trained model": "artifacts/train/model.pt",
    "evaluation": "artifacts/eval/table.md",
    "gate": "artifacts/eval/gate.json",
    "ONNX models": "artifacts/export/",
}


def _run(args: argparse.Namespace) -> int:
    """Run `dvc repro` for the whole graph (or one target) and list the results."""
    cmd = ["dvc", "repro", *([args.target] if args.target else [])]
    print("$ " + " ".join(cmd), flush=True)
    # dvc.yaml's stage commands call `python`; make it (and `dvc`) this interpreter's even
    # when the virtualenv is not activated.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    code = subprocess.call(cmd, env=env)
    if code != 0:
        print(f"cpcsam run: `{' '.join(cmd)}` failed with exit code {code}", file=sys.stderr)
        return code
    print("\nResults:")
    for label, rel in RESULTS.items():
        path = Path(rel)
        if path.exists():
            print(f"  {label:18s} {path.resolve()}")
    print("  MLflow runs        mlflow ui --backend-store-uri sqlite:///mlflow.db")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the pipeline (dvc repro) and print where the results are")
    p.add_argument("target", nargs="?", help="a dvc.yaml stage to run up to (default: all)")
    p.set_defaults(func=_run)


# Each entry adds one subparser; later modules (predict, ...) append theirs here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_run]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpcsam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CpcSamError as exc:
        print(f"cpcsam {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
