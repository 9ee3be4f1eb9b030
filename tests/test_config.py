from pathlib import Path

import pytest

from lowbitsr.config import ExperimentConfig, config_to_dict, load_config, save_config
from lowbitsr.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_round_trip(tmp_path):
    cfg = load_config(None, ["name=abc", "train.iterations=7", "model.overrides.n_feats=8"])
    assert cfg.name == "abc" and cfg.train.iterations == 7
    assert cfg.model.overrides == {"n_feats": 8}
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert isinstance(again.train.betas, tuple)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_repo_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == path.stem  # file name and run name agree (shipped names follow configs)
    assert config_to_dict(cfg)["model"]["scale"] == cfg.model.scale


def test_unknown_key_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match=r"train\.iteratons"):
        load_config(p)


@pytest.mark.parametrize(
    "text,key",
    [
        ("train:\n  iterations: many\n", "train.iterations"),
        ("train:\n  lr: [1, 2]\n", "train.lr"),
        ("seed: 1.5\n", "seed"),
        ("model: 3\n", "model"),
        ("train:\n  betas: [0.9]\n", "train.betas"),
    ],
)
def test_wrong_type_named(tmp_path, text, key):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(p)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "x.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["oops"])
