"""The one small interface per-step metrics go through.

The library never imports MLflow: components pass an object with these two methods
(`operations.tracking.stage_run(...)` yields one); `NullLogger` drops everything and
`MemoryLogger` keeps it (tests, notebooks).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable


@runtime_checkable
class MetricLogger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...


class NullLogger:
    """Logs nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None


class MemoryLogger:
    """Keeps every call: `metrics` is a list of (step, dict), `params` the merged params."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.params: dict[str, Any] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((int(step), {k: float(v) for k, v in metrics.items()}))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)
