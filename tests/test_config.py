"""The typed params tree: one parse, typos named with the closest key, one seed rule."""

from pathlib import Path

import pytest
import yaml

from cpcsam.config import Params, load_config, read_params_file
from cpcsam.errors import ConfigError


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def project_params(project_root: Path) -> dict:
    return read_params_file(project_root / "params.yaml")


def test_project_params_file_validates(project_root: Path) -> None:
    params = load_config(project_root / "params.yaml")
    assert isinstance(params, Params)
    assert "cpcsam" in params.variants
    assert params.data.profile in params.data.profiles


def test_overrides_are_typed_and_validated(project_root: Path) -> None:
    params = load_config(project_root / "params.yaml", ["train.steps=3", "data.profile=tiny", "evaluate.sigmas=[0, 0.2]"])
    assert params.train.steps == 3 and params.data.profile == "tiny" and params.evaluate.sigmas == [0.0, 0.2]
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(project_root / "params.yaml", ["train.steps=-1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.checkpont=sam_vit_b.pth", "unknown key 'model.checkpont'; did you mean 'model.checkpoint'"),
        ("data.profiles.oceancoco.num_image=3", "did you mean 'data.profiles.oceancoco.num_images'"),
        ("tracking.retrys=2", "did you mean 'tracking.retries'"),
        ("evaluate.tta.kk=2", "did you mean 'evaluate.tta.k'"),
        ("data.profile=oceancocoa", "did you mean 'oceancoco'"),
        ("train.mode=lora-only", "set per variant"),
        ("variants=[lora_only]", "must include 'cpcsam'"),
        ("model.type=vit_q", "model.type"),
        ("evaluate.sigmas=[0, 0.1]", "evaluate.headline.protocol: 'box@0.2' is not a protocol of this run"),
    ],
)
def test_a_typo_anywhere_fails_naming_the_key(project_root: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(project_root / "params.yaml", [override])


def test_profile_keys_are_checked_per_source(tmp_path: Path, project_params: dict) -> None:
    raw = dict(project_params)
    raw["data"] = {**raw["data"], "profiles": {**raw["data"]["profiles"], "x": {"source": "coco", "root": "/d",
                                                                                    "num_images": 3}}}
    with pytest.raises(ConfigError, match="unknown key 'data.profiles.x.num_images'"):
        load_config(_write(tmp_path, raw))


def test_defaults_live_in_one_place(project_params: dict, tmp_path: Path) -> None:
    """A params file without a section gets the typed defaults, not a second set elsewhere."""
    raw = {k: v for k, v in project_params.items() if k not in ("train", "pretrain")}
    params = load_config(_write(tmp_path, raw))
    assert params.train == Params().train and params.pretrain == Params().pretrain


def test_one_seed_rule(project_root: Path) -> None:
    a = load_config(project_root / "params.yaml")
    b = load_config(project_root / "params.yaml", ["seed=1"])
    c = load_config(project_root / "params.yaml", ["train.seed=5"])
    assert a.stage_seed("train") != b.stage_seed("train") and a.stage_seed("perturb") != b.stage_seed("perturb")
    assert c.stage_seed("train") != a.stage_seed("train") and c.stage_seed("perturb") == a.stage_seed("perturb")
    assert a.seeded("train").seed == a.stage_seed("train")


@pytest.mark.parametrize(
    "content, overrides, message",
    [
        ("seed: [\n", [], "not valid YAML"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("seed: 0\n", ["noequals"], "expected key.sub=value"),
        ("seed: 0\n", ["seed.sub=1"], "is not a mapping"),
    ],
)
def test_bad_params_files_name_the_problem(tmp_path: Path, content: str, overrides: list, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
