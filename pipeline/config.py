"""Typed configuration: dataclasses filled from YAML files and ``key.sub=value`` overrides.

Every stage declares a dataclass (``ExtractConfig``, ``IndexConfig``, ...). ``load_config``
builds one from an optional YAML file, then applies command-line overrides, converting each
value to the declared field type. Unknown keys and ill-typed values are errors that name the
key, so a typo in a config never silently falls back to a default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the declared type ``tp`` of config key ``key``, or a ``ConfigError`` naming it."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"config key {key!r} must not be empty")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, _mapping(value, key), prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return _sequence(value, tp, origin, key)
    if origin is dict:
        return dict(_mapping(value, key))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {value!r}")
        return value
    try:
        return _scalar(value, tp)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None


def _mapping(value: Any, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
    return value


def _sequence(value: Any, tp: Any, origin: Any, key: str) -> list | tuple:
    """A list or tuple (also ``"a,b c"`` from the command line), each item coerced."""
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
    args = typing.get_args(tp)
    item_tp = args[0] if args else Any
    items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


_TRUE_WORDS, _FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _scalar(value: Any, tp: Any) -> Any:
    """bool, int, float or str from YAML or command-line text; ``ValueError`` when it is not one."""
    if tp is bool:
        if not isinstance(value, str):
            return bool(value)
        if value.lower() in _TRUE_WORDS:
            return True
        if value.lower() in _FALSE_WORDS:
            return False
        raise ValueError(value)
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if tp in (float, str):
        return tp(value)
    return value


# One vocabulary across the stages' configs: a key renamed to it is still read for one release
# (old spelling -> new), with a warning naming both.
RENAMED_KEYS = {"address": "ray_address"}


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in data and old not in names and new in names:
            from .log import get_logger
            get_logger(__name__).warning("config key %r is deprecated; write %r", prefix + old, prefix + new)
            if new in data:
                raise ConfigError(f"config gives both {prefix + old!r} and {prefix + new!r}; keep {prefix + new!r}")
            data[new] = data.pop(old)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]} for {cls.__name__}; "
                          f"known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Mapping[str, Any] | list[str] | None = None,
                values: Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional), then overrides (``{"a.b": 1}`` or ``["a.b=1"]``,
    string values read as YAML), then ``values`` (already typed, e.g. parsed command-line options:
    taken as they are, so a path is never re-read as YAML). Later sources win."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level")
        data = loaded
    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else (_split_override(o) for o in overrides)
        for k, v in items:
            if isinstance(v, str):
                try:
                    v = yaml.safe_load(v) if v != "" else v
                except yaml.YAMLError:
                    pass
            _set_dotted(data, k, v)
    for k, v in (values or {}).items():
        _set_dotted(data, k, v)
    return from_dict(cls, data)


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    k, v = text.split("=", 1)
    return k.strip(), v


def parse_size(text: str | int) -> int:
    """Human memory sizes ("4G", "512M", "1.5GB", 1024) to bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise ConfigError(f"cannot read memory size {text!r} (use e.g. '4G' or '512M')") from None


# ---------------------------------------------------------------- command-line options
# The options every stage's command line shares; stages import them from here (the layer of
# configs), never from ``pipeline.cli``, which imports the stages.
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every stage shares: a YAML config and ``--set key=value`` overrides."""
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for nested keys); repeatable")


class _ImageSize(argparse.Action):
    """``--image-size H W`` or ``--image-size H,W`` (also ``HxW``): one form for every subcommand."""

    def __call__(self, parser, namespace, values, option_string=None):
        text = " ".join(values).replace(",", " ").replace("x", " ").split()
        try:
            size = [int(v) for v in text]
        except ValueError:
            size = []
        if len(size) != 2 or min(size) < 1:
            parser.error(f"{option_string} takes a height and a width (e.g. 480 640 or 480,640), got {' '.join(values)!r}")
        setattr(namespace, self.dest, size)


def add_image_size_argument(parser: argparse.ArgumentParser, default: str = "480 640") -> None:
    """The one ``--image-size`` option (input height and width) of every subcommand."""
    parser.add_argument("--image-size", nargs="+", action=_ImageSize, metavar="H W",
                        help=f"input height and width, as 'H W' or 'H,W' (default {default})")


def config_from_args(cls, args: argparse.Namespace, options) -> object:
    """The stage config from ``--config`` and ``--set``, then the stage's own options: each of
    ``options`` is an attribute of ``args`` (or an ``(attribute, config key)`` pair) applied when
    given on the command line. Command-line options win over the file and ``--set``."""
    values = {}
    for opt in options:
        attr, key = opt if isinstance(opt, tuple) else (opt, opt)
        value = getattr(args, attr, None)
        if value is not None:
            values[key] = value
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", None), values)


# ---------------------------------------------------------------- shared vocabulary
USE_GPU_VALUES = ("auto", "true", "false")
# Spellings accepted for one release after `use_gpu: auto|true|false` became the one vocabulary.
_OLD_USE_GPU = {"yes": True, "on": True, "1": True, "gpu": True, "no": False, "off": False, "0": False, "cpu": False}
_warned_spellings: set[str] = set()


def parse_use_gpu(value: Any) -> str | bool:
    """``use_gpu`` of any config: ``"auto"``, ``True`` or ``False``. ``auto``/``true``/``false``
    (any case, or a YAML bool) are the words; yes/no/on/off/gpu/cpu/1/0 are still read, with a
    warning once per spelling; anything else is a ``ConfigError``."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word == "auto":
        return "auto"
    if word in ("true", "false"):
        return word == "true"
    if word in _OLD_USE_GPU:
        if word not in _warned_spellings:
            _warned_spellings.add(word)
            from .log import get_logger
            get_logger(__name__).warning("use_gpu=%s is deprecated; write use_gpu: %s", value,
                                         "true" if _OLD_USE_GPU[word] else "false")
        return _OLD_USE_GPU[word]
    raise ConfigError(f"use_gpu must be auto, true or false, got {value!r}")


def jsonable(obj: Any, summarise: bool = False) -> Any:
    """``obj`` as JSON values (for manifests and job records): mappings with string keys, lists,
    numbers, strings, None; numpy scalars as numbers and arrays as lists; anything else as its
    ``str``. ``summarise`` keeps a job summary small: a list over 1,000 items becomes its count
    and first 20, an array over 64 elements its shape and dtype."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, summarise) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
        if summarise and len(items) > 1000:
            return {"count": len(items), "first": [jsonable(v, summarise) for v in items[:20]]}
        return [jsonable(v, summarise) for v in items]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if summarise and getattr(obj, "size", 0) and getattr(obj, "shape", None) is not None and obj.size > 64:
        return {"shape": list(obj.shape), "dtype": str(obj.dtype)}
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, TypeError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
