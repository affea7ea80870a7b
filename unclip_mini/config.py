"""Configuration: frozen dataclasses with named presets, validated on construction.

Every component keeps its config next to the class it configures (`DataConfig` in `data.py`,
`UNetConfig` in `unet.py`, ...). Each is a frozen dataclass whose fields carry a comment with the
paper's value, and offers the presets as class methods:

    smoke()  tiny, for tests only (seconds)
    toy()    CPU, 2 cores: the default everywhere (minutes)
    small()  one GPU (minutes per stage)
    paper()  the paper's Table 3 sizes (many GPUs, torchrun)

This module holds the shared machinery (`PresetConfig`, the `check_*` validators) and, at the
bottom, `Config`: the whole stack's configuration for one preset.
Override a field with `cfg.replace(field=value)`; unknown fields and invalid values raise
`ConfigError` naming the valid choices.
"""
from __future__ import annotations

import dataclasses
import json
import typing

from .errors import ConfigError

PRESETS = ("smoke", "toy", "small", "paper")  # smoke is for tests only


# ---------------------------------------------------------------------------------------------
# validators: each raises ConfigError("<Class>.<field> = <value> is invalid: ...; valid: ...")
# ---------------------------------------------------------------------------------------------

def _where(obj, field):
    return f"{type(obj).__name__}.{field}"


def check_choice(obj, field, choices):
    """Fail unless `obj.<field>` is one of `choices`."""
    value = getattr(obj, field)
    if value not in choices:
        raise ConfigError(f"{_where(obj, field)} = {value!r} is not a valid choice; "
                          f"valid choices: {', '.join(map(repr, choices))}")


def check_range(obj, field, low=None, high=None, *, low_open=False, high_open=False, integer=False):
    """Fail unless `low <= obj.<field> <= high` (bounds optional, `*_open` makes them strict)."""
    value = getattr(obj, field)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{_where(obj, field)} = {value!r} must be {'an int' if integer else 'a number'}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ConfigError(f"{_where(obj, field)} = {value!r} is out of range; valid: {lo}value{hi}")


def check_positive(obj, *fields, integer=True):
    """Fail unless every named field is > 0 (an int by default)."""
    for f in fields:
        check_range(obj, f, 0, low_open=True, integer=integer)


def check(condition, obj, field, message):
    """Fail with `message` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{_where(obj, field)} = {getattr(obj, field)!r} is invalid: {message}")


# ---------------------------------------------------------------------------------------------
# the base class of every component config
# ---------------------------------------------------------------------------------------------

class PresetConfig:
    """Mixin for frozen config dataclasses: presets by name, safe overrides, dict round trip."""

    @classmethod
    def preset(cls, name: str):
        """The config of preset `name` (one of PRESETS)."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r} for {cls.__name__}; "
                              f"valid presets: {', '.join(PRESETS)}")
        return getattr(cls, name)()

    def replace(self, **changes):
        """A copy with some fields changed; unknown fields fail with the list of valid ones."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in changes if k not in names]
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no field {unknown[0]!r}; "
                              f"valid fields: {', '.join(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists). A field marked `metadata={"omit_at_default": True}` is
        left out while it holds its default: a field added after stages were recorded keeps their ids (the
        ids hash these dicts), and `from_dict` fills it back in."""
        return json.loads(json.dumps(_plain(self)))

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of `to_dict`: rebuilds nested configs and tuples; unknown keys fail."""
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field {unknown[0]!r} (a config from another "
                              f"version of the code?); valid fields: {', '.join(sorted(names))}")
        return cls(**{k: _coerce(hints[k], v) for k, v in d.items()})


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _plain(obj):
    """`dataclasses.asdict` that leaves out the `omit_at_default` fields holding their default (see `to_dict`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_at_default") and getattr(obj, f.name) == _default(f))}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _coerce(hint, value):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in typing.get_args(hint):
            if a is type(None) and value is None:
                return None
            if a is not type(None):
                return _coerce(a, value)
    return value


def diff_configs(old: dict, new: dict, prefix="") -> list[str]:
    """Dotted names of the fields where two config dicts differ (for error messages)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
