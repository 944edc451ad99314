"""params.yaml loading: sections, dotted overrides, clear errors."""

from pathlib import Path

import pytest

from cpcsam.config import get_dotted, load_params, section
from cpcsam.errors import ConfigError


def test_overrides_parse_yaml_values_and_create_keys(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\ntrain:\n  steps: 10\n  lr: 0.001\n")
    params = load_params(path, ["train.steps=3", "train.modes=[a, b]", "new.key=true"])
    assert params["train"] == {"steps": 3, "lr": 0.001, "modes": ["a", "b"]}
    assert get_dotted(params, "new.key") is True
    assert section(params, "train")["steps"] == 3


def test_project_params_file_loads(project_root: Path) -> None:
    params = load_params(project_root / "params.yaml")
    assert isinstance(params["seed"], int)


@pytest.mark.parametrize(
    "content, overrides, message",
    [
        ("seed: [\n", [], "not valid YAML"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("seed: 0\n", ["noequals"], "expected key.sub=value"),
        ("seed: 0\n", ["seed.sub=1"], "is not a mapping"),
    ],
)
def test_bad_params_name_the_problem(tmp_path: Path, content: str, overrides: list, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_params(path, overrides)


def test_missing_file_and_section_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section 'train'"):
        section({"seed": 0}, "train")
