"""Settings loaded from YAML: dataclass sections whose `setting(...)` fields declare their allowed
values, read from a file plus `--section.key VALUE` overrides and checked before anything runs. Core
(no training imports), so recipes (qwenkit.train) and the data pipeline (qwenkit.data) share it."""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import types
import typing
from dataclasses import field
from pathlib import Path

import yaml

from qwenkit.errors import QwenkitError


def load_recipe(cls, path: str | os.PathLike | None, overrides: list[str]):
    """An instance of the dataclass `cls` from a YAML file plus `--section.key value` overrides."""
    values: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise QwenkitError(f"config file not found: {file}")
        try:
            values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise QwenkitError(f"{file} is not a YAML recipe (not UTF-8 text)") from None
        except OSError as e:
            raise QwenkitError(f"cannot read {file}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise QwenkitError(f"{file} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise QwenkitError(f"{file} must hold a mapping of sections")
    if len(overrides) % 2:
        raise QwenkitError(f"override {overrides[-1]!r} has no value (use --section.key VALUE)")
    for flag, text in zip(overrides[::2], overrides[1::2], strict=True):
        if not flag.startswith("--") or "." not in flag:
            raise QwenkitError(f"unknown option {flag!r}; overrides look like --train.lr 3e-4")
        *sections, key = flag[2:].replace("-", "_").split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise QwenkitError(f"{flag}: {section} is not a section")
        try:
            target[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise QwenkitError(f"{flag}: {text!r} is not a YAML value") from None
    return build_dataclass(cls, values, "")


def setting(default, *, choices: tuple | None = None, **bounds):
    """A recipe field with its allowed values, checked when a recipe is loaded: `choices`, or
    bounds `min` (>=), `above` (>), `max` (<=), `below` (<). Every float setting must be finite."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    return field(default=default, metadata={"choices": choices, **bounds})


BOUNDS = {"min": (">=", operator.ge), "above": (">", operator.gt), "max": ("<=", operator.le),
          "below": ("<", operator.lt)}  # fmt: skip


def check_setting(value, metadata, name: str) -> None:
    if value is None:
        return
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise QwenkitError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    for key, (sign, holds) in BOUNDS.items():
        if key in metadata and not holds(value, metadata[key]):
            raise QwenkitError(f"{name} must be {sign} {metadata[key]}, got {value!r}")


def build_dataclass(cls, values: dict, where: str):
    """Recursively build dataclass `cls` from a dict, checking names, simple types and the
    allowed values each field declares (`setting`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(name) for name in set(values) - set(fields))
    if unknown:
        raise QwenkitError(f"unknown setting {where}{unknown[0]}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise QwenkitError(f"{where}{name} must be a section (a mapping)")
            kwargs[name] = build_dataclass(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = check_type(value, hint, f"{where}{name}")
            check_setting(kwargs[name], fields[name].metadata, f"{where}{name}")
    return cls(**kwargs)


def check_type(value, hint, name: str):
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML reads "3e-4" (no dot) as a string
                number = float(value)
            except (ValueError, OverflowError):
                continue
            if not math.isfinite(number):
                raise QwenkitError(f"{name} must be a finite number, got {value!r}")
            return number
        if option in (int, str, bool) and type(value) is option:
            return value
        container = typing.get_origin(option) or option
        if container in (list, dict) and isinstance(value, container):
            return value
        if option is typing.Any:
            return value
    raise QwenkitError(f"{name} has the wrong type: {value!r}")
