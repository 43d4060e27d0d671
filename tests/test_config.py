from dataclasses import dataclass

import pytest

from pgolf import config
from pgolf.errors import UsageError


@dataclass(frozen=True)
class Demo:
    layers: int = 9  # transformer blocks
    lr: float = 0.04  # learning rate
    ema: bool = False  # keep an EMA of the weights
    name: str = "x"  # run name
    dims: tuple[int, ...] = (16, 64)  # a list field

    def __post_init__(self):
        if not 1 <= self.layers <= 64:
            raise ValueError(f"layers must be in [1, 64], got {self.layers}")


@pytest.fixture
def presets(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "small.toml").write_text("layers = 4\nlr = 0.1\n")
    monkeypatch.setattr(config, "PRESETS", tmp_path)
    return tmp_path


def test_precedence_cli_over_env_over_file_over_preset_over_default(presets, tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("layers = 5\nname = 'file'\nema = true\n")
    env = {"PGOLF_LAYERS": "6", "NUM_LAYERS": "7", "PGOLF_LR": "0.5"}
    cfg, sources = config.resolve(Demo, kind="demo", preset="small", config_file=file, env=env,
                                  aliases={"NUM_LAYERS": "layers"}, overrides={"layers": 8, "name": None})
    assert cfg == Demo(layers=8, lr=0.5, ema=True, name="file")
    assert sources["layers"] == "command line" and sources["lr"] == "env PGOLF_LR" and sources["name"] == str(file)
    cfg, sources = config.resolve(Demo, kind="demo", preset="small", env={"NUM_LAYERS": "7"},
                                  aliases={"NUM_LAYERS": "layers"})
    assert cfg.layers == 7 and cfg.lr == 0.1 and sources["layers"] == "env NUM_LAYERS"
    assert config.resolve(Demo, kind="demo", env={})[0] == Demo()


def test_env_values_are_typed(presets):
    cfg, _ = config.resolve(Demo, kind="demo", env={"PGOLF_EMA": "1", "PGOLF_DIMS": "8,32"})
    assert cfg.ema is True and cfg.dims == (8, 32)
    with pytest.raises(UsageError, match="PGOLF_LAYERS.*not an integer"):
        config.resolve(Demo, kind="demo", env={"PGOLF_LAYERS": "nine"})
    with pytest.raises(UsageError, match="not a boolean"):
        config.resolve(Demo, kind="demo", env={"PGOLF_EMA": "maybe"})


def test_errors_name_the_field_the_file_and_the_choices(presets, tmp_path):
    with pytest.raises(UsageError, match="unknown demo preset 'big' \\(valid: small\\)"):
        config.resolve(Demo, kind="demo", preset="big", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("layerz = 3\n")
    with pytest.raises(UsageError, match="bad.toml: unknown setting 'layerz'"):
        config.resolve(Demo, kind="demo", config_file=bad, env={})
    with pytest.raises(UsageError, match=r"layers must be in \[1, 64\]"):
        config.resolve(Demo, kind="demo", overrides={"layers": 100}, env={})
    bad.write_text("layers = [")
    with pytest.raises(UsageError, match="invalid TOML"):
        config.resolve(Demo, kind="demo", config_file=bad, env={})


@pytest.mark.parametrize("toml, message", [
    ("layers = [1, 2]", "layers = 'list' is not an integer"),
    ("layers = {a = 1}", "layers = 'dict' is not an integer"),
    ("layers = true", "layers = True is not an integer"),
    ("lr = inf", "lr = inf is not a finite number"),
    ("lr = nan", "lr = nan is not a finite number"),
    ("name = 5", "name = 5 is not a string"),
    ("ema = 2", "ema = 2 is not a boolean"),
    ("dims = {a = 1}", "dims = 'dict' is not a list"),
    ("name = 1979-05-27", "is not a string"),
])
def test_non_scalar_and_non_finite_values_are_refused_naming_the_field(presets, tmp_path, toml, message):
    file = tmp_path / "run.toml"
    file.write_text(toml + "\n")
    with pytest.raises(UsageError) as error:
        config.resolve(Demo, kind="demo", config_file=file, env={})
    assert str(file) in str(error.value) and message in str(error.value)


def test_a_scalar_for_a_list_field_is_a_one_element_list(presets):
    assert config.resolve(Demo, kind="demo", env={}, overrides={"dims": 7})[0].dims == (7,)


@pytest.mark.parametrize("content, message", [(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a TOML file"),
                                              (None, "is a directory, not a TOML config file")])
def test_an_unreadable_config_file_is_one_usage_error(presets, tmp_path, content, message):
    path = tmp_path / "cfg.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        config.resolve(Demo, kind="demo", config_file=path, env={})


def test_an_env_value_is_reported_under_the_name_it_was_read_from():
    from pgolf.ttt import TTTConfig

    with pytest.raises(UsageError, match="env PGOLF_TTT_LR: lr = 'abc' is not a number"):
        config.resolve(TTTConfig, kind="ttt", env={"PGOLF_TTT_LR": "abc"}, env_prefix="PGOLF_TTT_")


@pytest.mark.parametrize("name, suggestion", [("PGOLF_NUM_LAYER", "PGOLF_NUM_LAYERS"),
                                               ("PGOLF_TTT_LEARNING_RATE", None),
                                               ("PGOLF_SLIDING_STRID", "PGOLF_SLIDING_STRIDE")])
def test_a_misspelt_pgolf_variable_is_an_error_with_the_closest_name(name, suggestion):
    from pgolf.cli import check_env, env_settings

    with pytest.raises(UsageError) as error:
        check_env({name: "3", "PGOLF_NUM_LAYERS": "11", "PGOLF_TTT_LR": "0.1", "HOME": "/root"})
    assert f"env {name}: no pgolf setting has this name" in str(error.value)
    if suggestion:
        assert f"did you mean {suggestion}?" in str(error.value)
    check_env({"PGOLF_NUM_LAYERS": "11", "PGOLF_TTT_LR": "0.1", "PGOLF_CODEC": "zstd"})  # all known
    assert {"PGOLF_SEED", "PGOLF_PLAN", "PGOLF_TTT_MODE", "PGOLF_VAL_DOCS"} <= env_settings()


def test_the_cli_refuses_an_unknown_pgolf_variable_before_running():
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pgolf", "verify", "/nowhere"], capture_output=True, text=True,
                            env={**os.environ, "PGOLF_NUM_LAYER": "11"})
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: env PGOLF_NUM_LAYER: no pgolf setting has this name; did you mean PGOLF_NUM_LAYERS?")
