"""What every pipeline step's entry point shares: its parser and its log format."""

from __future__ import annotations

import argparse
import logging


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser for `python -m components.<stage>` with `--params` and repeatable `-S KEY=VALUE`."""
    parser = argparse.ArgumentParser(prog=f"python -m components.{stage}", description=(doc or stage).splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
