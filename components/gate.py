"""Pipeline step `gate`: decide promotion from the evaluation, the champion and the ONNX parity.

    python -m components.gate [--params params.yaml] [--out artifacts/eval/gate.json]

Runs after `evaluate` and `export` (dvc.yaml), so one file holds every reason. Reads
`artifacts/eval/metrics.json` (its `headline`, with the prompt-only reference rows),
`artifacts/export/parity.json` (when `gate.require_onnx_parity`) and the champion's numbers from
the param `gate.champion` (the flows fill it from the MLflow registry). The decision is
`cpcsam.evaluation.gates.check_gate`; the file is written whether the gate passes or not (a
rejection is a result, not an error), and the exit code is 0 either way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from components.cli import stage_main


def add_arguments(parser) -> None:
    parser.add_argument("--metrics", default="artifacts/eval/metrics.json")
    parser.add_argument("--parity", default="artifacts/export/parity.json")
    parser.add_argument("--out", default="artifacts/eval/gate.json")


def work(params, args, run) -> str:
    from cpcsam.evaluation.gates import check_gate, headline
    from cpcsam.files import read_json_object as read_json
    from cpcsam.files import write_json_atomic

    cfg = params.gate
    candidate = headline(read_json(args.metrics, "evaluation metrics"))
    parity = read_json(args.parity, "ONNX parity result") if Path(args.parity).is_file() else None
    champion = cfg.champion.model_dump() if cfg.champion is not None else None
    result = check_gate(candidate, cfg, champion, parity)
    result["champion_source"] = f"registry version {cfg.champion.version}" if cfg.champion else "none"
    write_json_atomic(args.out, result)
    run.log_metrics({"passed": float(result["passed"])})
    run.log_dict(result, "eval/gate.json")
    run.set_tags({"cpcsam.gate.passed": str(result["passed"]).lower()})
    verdict = "PASSED" if result["passed"] else "REJECTED"
    failed = [r["detail"] for r in result["reasons"] if not r["passed"]]
    return f"gate: {verdict}" + (f" ({'; '.join(failed)})" if failed else "") + f" -> {args.out}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("gate", __doc__, add_arguments, work, argv)


if __name__ == "__main__":
    sys.exit(main())
