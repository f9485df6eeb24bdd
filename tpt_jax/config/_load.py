"""YAML configs with `base:` inheritance and `key=value` overrides, checked against the schema.

Resolution order (later wins): dataclass defaults, then each `base:` file (depth first, in list
order), then the file itself, then the command-line overrides. Every leaf remembers which file or
override set it, so an error can name the culprit.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

import yaml

from tpt_jax.config import _paths
from tpt_jax.config._schema import Config, origin_of
from tpt_jax.config._validate import validate
from tpt_jax.errors import ConfigError

BASE_KEY = "base"


def load_config(path: str | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Loads, merges, type-checks and validates a config.

    Relative paths resolve against the file that set them, and empty output paths derive from
    run.root and run.name (see `tpt_jax.config._paths`).

    Args:
        path: a YAML file (a name under `configs/` also finds the configs shipped in the
            package), or None for the schema defaults.
        overrides: "dotted.key=value" strings; the value is parsed as YAML.

    Raises:
        ConfigError: naming the key and the file (or override) at fault.
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = _paths.locate(path)
        _merge_file(path, tree, sources, chain=())
    _apply_overrides(overrides, tree, sources)
    cfg = _build(Config, tree, "", sources)
    cfg = _paths.finish_paths(dataclasses.replace(cfg, sources=sources), path)
    _paths.check_placeholders(cfg)
    validate(cfg)
    return cfg


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a folder; give a YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def _merge_file(path: str, tree: dict, sources: dict, chain: tuple[str, ...]) -> None:
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"{path}: `base:` inheritance loops back to itself")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: `base:` must be a file name or a list of file names")
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        _merge_file(base_path, tree, sources, (*chain, real))
    _deep_merge(tree, data, "", sources, path)


def _deep_merge(dst: dict, src: dict, prefix: str, sources: dict, origin: str) -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value, dotted + ".", sources, origin)
        else:
            dst[key] = value
            for leaf in _leaves(value, dotted):
                sources[leaf] = origin
            sources[dotted] = origin


def _leaves(value: Any, dotted: str) -> list[str]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{dotted}.{k}")]
    return [dotted]


def _apply_overrides(overrides: typing.Sequence[str], tree: dict, sources: dict) -> None:
    seen: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        if key in seen:
            raise ConfigError(f"override '{key}' is given twice on the command line")
        seen.add(key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        # Keep the raw text too: a string field given "123" must stay "123", not become an int.
        node[parts[-1]] = _Override(value, raw)
        sources[key] = f"override '{item}'"


@dataclasses.dataclass(frozen=True)
class _Override:
    value: Any
    raw: str


def _build(cls: type, data: Any, prefix: str, sources: dict) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} must be a mapping, got {_describe(data)} "
            f"({origin_of(sources, prefix.rstrip('.'))})"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else ""
            raise ConfigError(f"unknown config key '{dotted}' ({origin_of(sources, dotted)}){hint}")
        kind = hints[key]
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, dotted + ".", sources)
        elif item is not None and dataclasses.is_dataclass(item):
            origin = origin_of(sources, dotted)
            if isinstance(value, _Override):
                value = value.value
            if not isinstance(value, list):
                raise ConfigError(
                    f"config key '{dotted}' must be a list, got {_describe(value)} ({origin})"
                )
            for i in range(len(value)):
                sources.setdefault(f"{dotted}[{i}]", origin)
            kwargs[key] = [_build(item, v, f"{dotted}[{i}].", sources) for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(kind, value, dotted, origin_of(sources, dotted))
    return cls(**kwargs)


def _coerce(kind: type, value: Any, dotted: str, origin: str) -> Any:
    raw = None
    if isinstance(value, _Override):
        value, raw = value.value, value.raw
    ok = True
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):
            # PyYAML reads "3e-4" (no dot) as a string; accept any float literal.
            try:
                value = float(value)
            except ValueError:
                ok = False
        elif isinstance(value, bool) or not isinstance(value, int | float):
            ok = False
        else:
            value = float(value)
    elif kind is str:
        if raw is not None and not isinstance(value, str):
            value = raw.strip()
        ok = isinstance(value, str)
    elif kind is list:
        ok = isinstance(value, list)
    elif kind is dict:
        value = _unwrap(value)
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(
            f"config key '{dotted}' must be {kind.__name__}, got {_describe(value)} ({origin})"
        )
    return value


def _unwrap(value: Any) -> Any:
    # `key.sub=1` overrides land inside a dict field as _Override leaves; keep their parsed values.
    if isinstance(value, _Override):
        return value.value
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def to_dict(cfg: Any) -> Any:
    """The resolved config as plain data (no provenance), ready for YAML or JSON."""
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if not dataclasses.is_dataclass(cfg):
        return cfg
    return {
        f.name: to_dict(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
        if not f.metadata.get("internal")
    }


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_resolved(cfg: Config, folder: str) -> str:
    """Writes the resolved config as `config.yaml` in `folder` (local or gs://)."""
    from tpt_jax import storage

    path = os.path.join(folder, "config.yaml")
    storage.write_bytes(path, dump_yaml(cfg).encode())
    return path
