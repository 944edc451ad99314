"""The scaffold every pipeline step's entry point shares: parse, typed params, tracked run, exit code.

    def work(params: Params, args: argparse.Namespace, run) -> str:   # returns the closing line
        ...
    sys.exit(stage_main("train", __doc__, add_arguments, work))

- `--params FILE` and repeatable `-S KEY=VALUE`; the whole params tree is validated before any
  work (`cpcsam.config.load_config`), so a typo fails the stage in a second, naming the key.
- The MLflow run (`operations.tracking.stage_run`) is open around the work, not after it, so its
  duration is the stage's.
- Exit codes: 0 done; 2 bad input or configuration (`CpcSamError`), which a retry cannot mend;
  3 a deterministic check refused the result (`CheckFailed`: ONNX parity), likewise not retryable;
  anything else is a crash (traceback, exit 1), which an orchestrator may retry.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from cpcsam.errors import CpcSamError

EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3
NOT_RETRYABLE = (EXIT_BAD_INPUT, EXIT_CHECK_FAILED)


class CheckFailed(CpcSamError):
    """A deterministic check refused the stage's result (the same inputs fail the same way)."""


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser for `python -m components.<stage>` with `--params` and repeatable `-S KEY=VALUE`."""
    parser = argparse.ArgumentParser(prog=f"python -m components.{stage}", description=(doc or stage).splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def stage_main(
    stage: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    work: Callable[[Any, argparse.Namespace, Any], str],
    argv: list[str] | None = None,
    run_name: Callable[[argparse.Namespace], str] | None = None,
) -> int:
    """Run one pipeline step: parse, validate params, open its tracked run, do `work`, exit code."""
    parser = stage_parser(stage, doc)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        from cpcsam.config import load_config
        from operations.tracking import stage_run

        params = load_config(args.params, args.overrides)
        with stage_run(stage, params, run_name=run_name(args) if run_name else None) as run:
            message = work(params, args, run)
    except CheckFailed as exc:
        print(f"{stage}: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except CpcSamError as exc:
        print(f"{stage}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(message)
    return 0
