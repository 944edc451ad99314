"""Pipeline step `gate`: decide promotion from the evaluation, the champion and the ONNX parity.

    python -m components.gate [--params params.yaml] [--out artifacts/eval/gate.json]

Runs after `evaluate` and `export` (dvc.yaml), so one file holds every reason. Reads
`artifacts/eval/metrics.json` (its `headline`), `artifacts/export/parity.json` (when
`gate.require_onnx_parity`), and the champion's numbers: the JSON file named by
`gate.champion_metrics` (an earlier `metrics.json`, or a bare headline dict), else — with
`gate.champion_from_registry` — the headline stored on the MLflow `champion` version
(`components.register.champion_headline`), else none. The decision is
`cpcsam.evaluation.gates.check_gate`; the file is written whether the gate passes or not (a
rejection is a result, not an error), and the exit code is 0 either way.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from components.cli import configure_logging, stage_parser
from cpcsam.config import load_params, section
from cpcsam.errors import CpcSamError, DataError

log = logging.getLogger("components.gate")


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {what} must be a JSON object")
    return obj


def champion_numbers(params: dict[str, Any], cfg: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The champion's headline and where it came from ('none' when there is no champion)."""
    path = cfg.get("champion_metrics") or ""
    if path:
        obj = read_json(path, "champion metrics (gate.champion_metrics)")
        head = obj.get("headline", obj)
        if not isinstance(head, dict) or "base_dice" not in head:
            raise DataError(f"{path}: champion metrics hold no 'base_dice' (expected an evaluate metrics.json)")
        return head, str(path)
    if cfg.get("champion_from_registry", True):
        try:
            from components.register import champion_headline

            head = champion_headline(params)
        except Exception as exc:  # the registry is optional here: no store, no champion
            log.info("gate: no champion from the registry (%s)", exc)
            head = None
        if head:
            return head, "mlflow registry"
    return None, "none"


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("gate", __doc__)
    parser.add_argument("--metrics", default="artifacts/eval/metrics.json")
    parser.add_argument("--parity", default="artifacts/export/parity.json")
    parser.add_argument("--out", default="artifacts/eval/gate.json")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        from cpcsam.evaluation.gates import check_gate, headline

        params = load_params(args.params, args.overrides)
        cfg = section(params, "gate")
        candidate = headline(read_json(args.metrics, "evaluation metrics"))
        parity = read_json(args.parity, "ONNX parity result") if Path(args.parity).is_file() else None
        champion, source = champion_numbers(params, cfg)
        result = check_gate(candidate, cfg, champion, parity)
        result["champion_source"] = source
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

        from components.tracking import stage_run

        with stage_run("gate", params) as run:
            run.log_metrics({"passed": float(result["passed"])})
            run.log_dict(result, "eval/gate.json")
            run.set_tags({"cpcsam.gate.passed": str(result["passed"]).lower()})
    except CpcSamError as exc:
        print(f"gate: {exc}", file=sys.stderr)
        return 2
    verdict = "PASSED" if result["passed"] else "REJECTED"
    failed = [r["detail"] for r in result["reasons"] if not r["passed"]]
    print(f"gate: {verdict}" + (f" ({'; '.join(failed)})" if failed else "") + f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
