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
