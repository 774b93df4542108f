import tomllib
from pathlib import Path

import pytest

from common.cli import main
from common.config import ConfigError, flower_run_config_defaults, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_layers_override_in_order(tmp_path):
    toml = tmp_path / "site.toml"
    toml.write_text('num-rounds = 7\nnorm = "group"\n')
    cfg = load_config(
        run_config={"num-rounds": 3, "lr": 0.01},
        node_config={"cache-dir": "/c"},
        toml_path=toml,
        cli={"num_rounds": "9", "seed": None},
    )
    assert cfg["num-rounds"] == 9  # CLI beats TOML beats run_config
    assert cfg["norm"] == "group"
    assert cfg["lr"] == 0.01
    assert cfg["cache-dir"] == "/c"
    assert cfg["seed"] == 42  # None on the CLI means "flag not given"


def test_empty_run_config_gives_defaults():
    cfg = load_config(run_config={})
    assert cfg["scenario"] == "paper" and cfg["folds"] == 5


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'num-round' from run_config"):
        load_config(run_config={"num-round": 3})


def test_wrong_type_says_expected_and_found():
    with pytest.raises(ConfigError, match=r"'folds' from node_config: expected an integer, found 'five'"):
        load_config(node_config={"folds": "five"})
    with pytest.raises(ConfigError, match=r"'norm' from command line: expected one of batch, instance, group"):
        load_config(cli={"norm": "layer"})
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(run_config={"resume": "maybe"})


def test_flower_node_keys_can_be_tolerated():
    cfg = load_config(node_config={"partition-id": 0, "cache-dir": "x"}, ignore_unknown_from=["node_config"])
    assert cfg["cache-dir"] == "x"


def test_pyproject_run_config_matches_schema():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == flower_run_config_defaults()


def test_cli_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("synth", "prepare", "simulate", "deploy", "bench"):
        assert name in out
