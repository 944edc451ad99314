"""Loading `params.yaml`: one dict keyed by stage, with dotted-key overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from cpcsam.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read the params file and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        set_dotted(params, key, yaml.safe_load(raw))
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The named top-level section, with a clear error when it is missing."""
    if name not in params or not isinstance(params[name], dict):
        raise ConfigError(f"params: section {name!r} is missing or not a mapping")
    return params[name]


def get_dotted(params: dict[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params: key {key!r} not found")
        node = node[part]
    return node


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = params
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"params: cannot set {key!r}: {part!r} is not a mapping")
    node[parts[-1]] = copy.deepcopy(value)
