"""Resolving a frozen config dataclass from its layers.

Precedence, highest first: CLI flag > `PGOLF_<FIELD>` env var (or a challenge upper-case alias such as
`NUM_LAYERS`) > `--config FILE.toml` > named preset (`pgolf/presets/<kind>/<name>.toml`) > dataclass default.
Each config class validates itself in `__post_init__` and raises ValueError naming the field and allowed range;
that becomes a usage error (exit 2).
"""

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from pgolf.errors import UsageError

PRESETS = Path(__file__).resolve().parent / "presets"
ENV_PREFIX = "PGOLF_"


def preset_names(kind: str) -> list[str]:
    return sorted(p.stem for p in (PRESETS / kind).glob("*.toml"))


def read_toml(path: Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML ({e})") from None


def load_preset(kind: str, name: str) -> dict:
    path = PRESETS / kind / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown {kind} preset '{name}' (valid: {', '.join(preset_names(kind))})")
    return read_toml(path)


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, kind, name: str, source: str):
    """Convert a TOML or env-string value to the field's type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(value, args[0], name, source)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return tuple(_coerce(v, item, name, source) for v in value)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("1", "true", "yes", "on")
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except ValueError:
        raise UsageError(f"{source}: {name} = {value!r} is not a valid {kind.__name__}") from None
    return value


def resolve(
    cls,
    *,
    kind: str,
    preset: str | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    table: str | None = None,
):
    """Build `cls` from its layers; returns (config, sources) where sources maps each set field to its layer.

    With `table`, the preset and config file hold several configs as TOML tables and `cls` reads `[table]`.
    """
    env = os.environ if env is None else env
    types_ = _field_types(cls)
    values: dict[str, object] = {}
    sources: dict[str, str] = {}

    def apply(layer: Mapping, source: str, strict: bool = True):
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in types_:
                if strict:
                    raise UsageError(f"{source}: unknown setting '{key}' (valid: {', '.join(sorted(types_))})")
                continue
            values[name] = _coerce(value, types_[name], name, source)
            sources[name] = source

    def from_table(layer: dict, source: str) -> dict:
        section = layer.get(table, {}) if table else layer
        if not isinstance(section, dict):
            raise UsageError(f"{source}: '{table}' must be a table")
        return section

    if preset:
        apply(from_table(load_preset(kind, preset), f"preset {preset}"), f"preset {preset}")
    if config_file:
        apply(from_table(read_toml(config_file), str(config_file)), str(config_file))
    for alias, name in (aliases or {}).items():
        if alias in env:
            apply({name: env[alias]}, f"env {alias}")
    for name in types_:
        key = ENV_PREFIX + name.upper()
        if key in env:
            apply({name: env[key]}, f"env {key}")
    apply({k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    try:
        return cls(**values), sources
    except ValueError as e:
        raise UsageError(f"invalid {kind} config: {e}") from None


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
