"""Loading a config: YAML plus dotted CLI overrides (``--train.steps 100``) -> :class:`Config`, each value
coerced to its field's declared type; an unknown key or a bad value is a one-line ValueError."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from hyperp_megatron.config.sections import Config


def _unknown_key_error(key: str, section: str, valid: list[str]) -> ValueError:
    hint = difflib.get_close_matches(key, valid, n=1)
    where = f"{section}." if section else ""
    suggestion = f" (did you mean '{where}{hint[0]}'?)" if hint else f" (valid keys: {', '.join(valid)})"
    return ValueError(f"unknown config key '{where}{key}'{suggestion}")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML or CLI value to the field's declared type, with a clear error."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = next(a for a in args if a is not type(None))
        return _coerce(value, annotation, name)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value]
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} expects {annotation.__name__}, got {value!r}") from None
    return value


def _build(cls, data: dict, section: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"config section '{section or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(key, section, names)
        dotted = f"{section}.{key}" if section else key
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, dotted)
        else:
            kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def redundant_keys(data: dict, cls=Config, section: str = "") -> list[str]:
    """The dotted keys of a YAML config mapping whose value equals its field's default (after coercion): a
    config file should state only what differs from the defaults (tests/test_config.py checks configs/).
    Unknown keys and bad values are :func:`load_config`'s to report; they are skipped here."""
    if not isinstance(data, dict):
        return []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    found = []
    for key, value in data.items():
        if key not in hints:
            continue
        dotted = f"{section}.{key}" if section else key
        if dataclasses.is_dataclass(hints[key]):
            found += redundant_keys(value or {}, hints[key], dotted)
            continue
        try:
            coerced = _coerce(value, hints[key], dotted)
        except ValueError:
            continue
        if coerced == getattr(defaults, key):
            found.append(dotted)
    return found


def parse_overrides(args: list[str]) -> dict:
    """``['--train.steps', '100', '--optim.lr=0.01']`` -> nested dict (values still strings)."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected an override like --section.key VALUE, got {arg!r}")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg} has no value")
            value, i = args[i + 1], i + 1
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {arg}: '{part}' was given a value earlier, it cannot also have keys")
        node[leaf] = yaml.safe_load(value) if value.strip().startswith("[") else value
        i += 1
    return nested


def merge_dicts(base: dict, override: dict) -> dict:
    """Nested dict merge: ``override`` wins; neither input is modified."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1}, first on line "
                             f"{seen[key] + 1}): keep one")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml(path: Path):
    """A YAML file's data (safe: plain values only), refusing duplicate keys; ValueError (one line) for bad YAML."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:  # (a ValueError)
        raise ValueError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise ValueError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None


def _check_sections(data: dict, overrides: dict, section: str = "") -> None:
    """A section the overrides give keys must be a mapping in the file (the merge would replace it silently)."""
    for key, value in overrides.items():
        dotted = f"{section}.{key}" if section else key
        if isinstance(value, dict) and key in data:
            if data[key] is not None and not isinstance(data[key], dict):
                raise ValueError(f"config section '{dotted}' must be a mapping, got {data[key]!r}")
            _check_sections(data[key] or {}, value, dotted)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply dotted overrides; raises ValueError on bad input."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        data = read_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must be a mapping of sections (model:, train:, ...) at the top "
                             f"level, not a {type(data).__name__}")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        _check_sections(data, extra)
        data = merge_dicts(data, extra)
    return _build(Config, data)
