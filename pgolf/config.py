"""Resolving a frozen config dataclass from its layers.

Precedence, highest first: CLI flag > `PGOLF_<FIELD>` env var (or a challenge upper-case alias such as
`NUM_LAYERS`) > `--config FILE.toml` > named preset (`pgolf/presets/<kind>/<name>.toml`) > dataclass default.
Each config class validates itself in `__post_init__` and raises ValueError naming the field and allowed range;
that becomes a usage error (exit 2).
"""

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from pgolf.errors import UsageError

PRESETS = Path(__file__).resolve().parent / "presets"
ENV_PREFIX = "PGOLF_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def preset_names(kind: str) -> list[str]:
    return sorted(p.stem for p in (PRESETS / kind).glob("*.toml"))


def read_toml(path: Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a TOML config file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML ({e})") from None


def load_preset(kind: str, name: str, _children: tuple[str, ...] = ()) -> dict:
    """A preset's settings. `base = "other"` at its top builds on another preset of the same kind: the base's
    tables, with this preset's keys replacing the base's key by key."""
    path = PRESETS / kind / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown {kind} preset '{name}' (valid: {', '.join(preset_names(kind))})")
    layer = read_toml(path)
    base = layer.pop("base", None)
    if base is None:
        return layer
    if not isinstance(base, str) or base in (*_children, name):
        raise UsageError(f"{path}: base = {base!r} is not another {kind} preset's name (or it builds on this one)")
    merged = load_preset(kind, base, (*_children, name))
    for key, value in layer.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value, kind, name: str, source: str):
    """`value` (from TOML, JSON, an env string or a flag) as the field's type; UsageError naming the field and
    its source for anything else: a table or list where one value belongs, a bool for a number, NaN or inf."""

    def refuse(what: str = ""):
        shown = value if isinstance(value, (str, int, float, bool)) else type(value).__name__
        expected = what or getattr(kind, "__name__", str(kind))
        return UsageError(f"{source}: {name} = {shown!r} is not {expected}")

    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return coerce(value, args[0], name, source)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)):
            value = [value]
        elif not isinstance(value, (list, tuple)):
            raise refuse("a list")
        return tuple(coerce(v, item, name, source) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise refuse("a boolean (true/false)")
    if kind is int:
        if isinstance(value, bool):
            raise refuse("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise refuse("an integer") from None
        raise refuse("an integer")
    if kind is float:
        if isinstance(value, bool):
            raise refuse("a number")
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise refuse("a number") from None
        else:
            raise refuse("a number")
        if not math.isfinite(number):
            raise refuse("a finite number")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise refuse("a string")
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
    env_prefix: str = ENV_PREFIX,
):
    """Build `cls` from its layers; returns (config, sources) where sources maps each set field to its layer.

    With `table`, the preset and config file hold several configs as TOML tables and `cls` reads `[table]`.
    Env variables are `env_prefix` + the field name in upper case (PGOLF_TTT_LR for TTTConfig.lr).
    """
    env = os.environ if env is None else env
    types_ = field_types(cls)
    values: dict[str, object] = {}
    sources: dict[str, str] = {}

    def apply(layer: Mapping, source: str, strict: bool = True):
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in types_:
                if strict:
                    raise UsageError(f"{source}: unknown setting '{key}' (valid: {', '.join(sorted(types_))})")
                continue
            values[name] = coerce(value, types_[name], name, source)
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
        key = env_prefix + name.upper()
        if key in env:
            apply({name: env[key]}, f"env {key}")
    apply({k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    try:
        return cls(**values), sources
    except ValueError as e:
        raise UsageError(f"invalid {kind} config: {e}") from None


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, values: Mapping, source: str):
    """The inverse of to_dict: `cls` from a dict that went through JSON (lists back to tuples, each value checked
    as its field's type); UsageError naming `source` for unknown or invalid fields."""
    if not isinstance(values, Mapping):
        raise UsageError(f"{source}: is {type(values).__name__}, not a table of settings")
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise UsageError(f"{source}: unknown setting '{unknown[0]}' (valid: {', '.join(sorted(types_))})")
    try:
        return cls(**{name: coerce(value, types_[name], name, source) for name, value in values.items()})
    except ValueError as e:
        raise UsageError(f"{source}: {e}") from None
