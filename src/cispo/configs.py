"""Typed machinery for the frozen, kw_only dataclass configs (STYLE.md §5).

The configs themselves live next to the components they configure, and a run is a `recipe()`
function in `cispo.recipes`. This module only moves configs in and out of text:

- `apply_overrides(config, ["--loss.ratio_max=5", "train.steps=10"])`: dotted CLI overrides,
  coerced by each field's annotation, rebuilt with `dataclasses.replace` so `__post_init__`
  validation runs. Unknown keys and bad values are errors that say what was expected.
- `config_to_dict` / `config_from_dict`: the JSON-safe resolved config (written next to a run and
  read back on resume). Reading is strict: unknown keys are errors.
- `load_recipe("recipes/gsm8k_cispo.py")` or `load_recipe("arithmetic_cispo")`.
- `format_config(config)`: a readable dump for printing the plan.

Deliberately left out: YAML, composition, component strings (STYLE.md §5), and union members that
are themselves dataclasses (a section has one type).

Override values: scalars are plain text (`true`, `3e-4`, `qwen2`); `none`/`null` sets an
Optional field to None; a str value wrapped in double quotes is read as a JSON string, so
`--x="\\n"` gives a newline; sequences are JSON (`["\\n", "END"]`) or a comma list (`a,b`);
dicts are JSON objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib
import importlib.util
import json
import math
import pkgutil
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, overload

T = TypeVar("T")

_TRUE = frozenset({"true", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "0", "no", "n", "off"})
_NONE = frozenset({"none", "null"})


class ConfigError(ValueError):
    """A config could not be built from the given text; the message says what was expected."""


# --------------------------------------------------------------------------------------------
# Type introspection


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of a dataclass (works with postponed annotations)."""
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(typing.cast(Any, cls))
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in fields if f.init}
    return _FIELD_TYPES[cls]


def _is_dataclass_type(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _optional_dataclass(tp: Any) -> type | None:
    """The dataclass X of a field typed `X` or `X | None`, else None."""
    tp = _strip_annotated(tp)
    if _is_dataclass_type(tp):
        return typing.cast(type, tp)
    if _is_union(tp):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1 and _is_dataclass_type(members[0]):
            return typing.cast(type, members[0])
    return None


def _type_name(tp: Any) -> str:
    tp = _strip_annotated(tp)
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {', '.join(repr(m.name) for m in tp)} ({tp.__name__})"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


# --------------------------------------------------------------------------------------------
# Value conversion: text (from the CLI) and JSON values (from a resolved-config file)


def _bad(path: str, value: object, tp: Any, why: str = "") -> ConfigError:
    extra = f" ({why})" if why else ""
    return ConfigError(f"bad value for '{path}': {value!r}; expected {_type_name(tp)}{extra}")


def _from_text(text: str, tp: Any, path: str) -> object:
    """Convert one CLI value to the field type `tp`."""
    tp = _strip_annotated(tp)
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return text
    if _is_union(tp):
        members = typing.get_args(tp)
        if type(None) in members and text.strip().lower() in _NONE:
            return None
        for member in (m for m in members if m is not type(None)):
            try:
                return _from_text(text, member, path)
            except ConfigError:
                continue
        raise _bad(path, text, tp)
    if tp is type(None):
        if text.strip().lower() in _NONE:
            return None
        raise _bad(path, text, tp)
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if str(allowed) == text or (
                isinstance(allowed, bool) and text.lower() in (_TRUE if allowed else _FALSE)
            ):
                return allowed
        raise _bad(path, text, tp)
    if origin in (list, tuple, Sequence, set, frozenset) or tp in (list, tuple):
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items: object = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise _bad(path, text, tp, f"invalid JSON list: {e.msg}") from e
            return _from_json(items, tp, path)
        parts = [p.strip() for p in stripped.split(",")] if stripped else []
        return _sequence(parts, tp, path, _from_text)
    if origin in (dict, Mapping) or tp is dict:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _bad(path, text, tp, f"invalid JSON object: {e.msg}") from e
        return _from_json(obj, tp, path)
    if _is_dataclass_type(tp):
        keys = ", ".join(_field_types(tp))
        raise ConfigError(
            f"'{path}' is a section ({tp.__name__}); set its fields as {path}.<field>=value "
            f"(fields: {keys})"
        )
    return _scalar_from_text(text, tp, path)


def _scalar_from_text(text: str, tp: Any, path: str) -> object:
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise _bad(path, text, tp, "true/false, yes/no or 1/0")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise _bad(path, text, tp) from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise _bad(path, text, tp) from None
    if tp is str:
        if len(text) >= 2 and text[0] == text[-1] == '"':
            try:
                return str(json.loads(text))
            except json.JSONDecodeError as e:
                raise _bad(path, text, tp, f"invalid JSON string: {e.msg}") from e
        return text
    if tp is Path:
        return Path(text)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if text in (member.name, str(member.value)):
                return member
        raise _bad(path, text, tp)
    raise ConfigError(f"'{path}': fields of type {_type_name(tp)} cannot be set from text")


def _sequence(
    items: Sequence[object], tp: Any, path: str, convert: typing.Callable[[Any, Any, str], object]
) -> object:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(items) != len(args):
            raise _bad(path, items, tp, f"{len(args)} items, got {len(items)}")
        return tuple(
            convert(x, a, f"{path}[{i}]") for i, (x, a) in enumerate(zip(items, args, strict=True))
        )
    elem = args[0] if args else Any
    values = [convert(x, elem, f"{path}[{i}]") for i, x in enumerate(items)]
    if origin is list:
        return values
    if origin in (set, frozenset):
        return origin(values)
    return tuple(values)  # tuple[X, ...] and Sequence[X]: immutable, like the frozen config


def _from_json(obj: object, tp: Any, path: str) -> object:
    """Convert a JSON value (as written by `config_to_dict`) to the field type `tp`."""
    tp = _strip_annotated(tp)
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return obj
    if _is_union(tp):
        members = typing.get_args(tp)
        if obj is None:
            if type(None) in members:
                return None
            raise _bad(path, obj, tp)
        for member in (m for m in members if m is not type(None)):
            try:
                return _from_json(obj, member, path)
            except ConfigError:
                continue
        raise _bad(path, obj, tp)
    if obj is None:
        if tp is type(None):
            return None
        raise _bad(path, obj, tp)
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if obj == allowed and type(obj) is type(allowed):
                return allowed
        if isinstance(obj, str):
            return _from_text(obj, tp, path)
        raise _bad(path, obj, tp)
    if origin in (list, tuple, Sequence, set, frozenset) or tp in (list, tuple):
        if not isinstance(obj, (list, tuple)):
            raise _bad(path, obj, tp, "a list")
        return _sequence(obj, tp, path, _from_json)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(obj, dict):
            raise _bad(path, obj, tp, "a JSON object")
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        return {
            _from_text(str(k), key_tp, f"{path}.{k}"): _from_json(v, val_tp, f"{path}.{k}")
            for k, v in obj.items()
        }
    if _is_dataclass_type(tp):
        if not isinstance(obj, Mapping):
            raise _bad(path, obj, tp, "a JSON object")
        return _build(typing.cast(type, tp), obj, path)
    if tp is bool:
        if isinstance(obj, bool):
            return obj
    elif tp is int:
        if isinstance(obj, int) and not isinstance(obj, bool):
            return obj
    elif tp is float:
        if isinstance(obj, (int, float)) and not isinstance(obj, bool):
            return float(obj)
    elif tp is str:
        if isinstance(obj, str):
            return obj
    elif isinstance(obj, str):
        return _scalar_from_text(obj, tp, path)  # Path, Enum
    if isinstance(obj, str):  # a number written as text, e.g. "inf" for a float
        return _scalar_from_text(obj, tp, path)
    raise _bad(path, obj, tp)


def _to_json(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan": keeps the file strict JSON; read back by float()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} to a config file")


# --------------------------------------------------------------------------------------------
# Building and rebuilding dataclasses


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    valid = list(_field_types(cls))
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{_join(prefix, close[0])}'?" if close else ""
    where = f"under '{prefix}' ({cls.__name__})" if prefix else f"in {cls.__name__}"
    return ConfigError(
        f"unknown config key '{_join(prefix, name)}'{hint} valid keys {where}: {', '.join(valid)}"
    )


def _construct(cls: type[T], kwargs: dict[str, object], prefix: str, base: T | None) -> T:
    """`cls(**kwargs)` or `replace(base, **kwargs)`; validation errors say which section failed."""
    try:
        if base is None:
            return cls(**kwargs)
        return typing.cast(T, dataclasses.replace(typing.cast(Any, base), **kwargs))
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        where = f"'{prefix}' ({cls.__name__})" if prefix else cls.__name__
        raise ConfigError(f"invalid {where}: {e}") from e


def _build(cls: type[T], data: Mapping[str, object], prefix: str) -> T:
    types_ = _field_types(cls)
    for name in data:
        if name not in types_:
            raise _unknown_key(cls, name, prefix)
    required = [
        f.name
        for f in dataclasses.fields(typing.cast(Any, cls))
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in data
    ]
    if required:
        missing = ", ".join(_join(prefix, n) for n in required)
        raise ConfigError(f"missing required config keys for {cls.__name__}: {missing}")
    kwargs = {name: _from_json(v, types_[name], _join(prefix, name)) for name, v in data.items()}
    return _construct(cls, kwargs, prefix, None)


# An override tree maps a field name to its text value (a leaf) or to a subtree (a section).
_Tree = dict[str, Union[str, "_Tree"]]


def _apply_tree(config: T, tree: _Tree, prefix: str) -> T:
    cls = type(config)
    types_ = _field_types(cls)
    changes: dict[str, object] = {}
    for name, sub in tree.items():
        if name not in types_:
            raise _unknown_key(cls, name, prefix)
        path = _join(prefix, name)
        if isinstance(sub, str):
            changes[name] = _from_text(sub, types_[name], path)
            continue
        section_cls = _optional_dataclass(types_[name])
        if section_cls is None:
            raise ConfigError(
                f"'{path}' is a {_type_name(types_[name])} field, not a section; "
                f"set it as {path}=value"
            )
        current = getattr(config, name)
        if current is None:  # an unset Optional section: start from its defaults
            leaves = {k: v for k, v in sub.items() if isinstance(v, str)}
            nested: _Tree = {k: v for k, v in sub.items() if not isinstance(v, str)}
            for k in leaves:
                if k not in _field_types(section_cls):
                    raise _unknown_key(section_cls, k, path)
            section_types = _field_types(section_cls)
            kwargs = {k: _from_text(v, section_types[k], _join(path, k)) for k, v in leaves.items()}
            current = _construct(section_cls, kwargs, path, None)
            changes[name] = _apply_tree(current, nested, path) if nested else current
        else:
            changes[name] = _apply_tree(current, sub, path)
    return _construct(cls, changes, prefix, config) if changes else config


def _parse_override(item: str) -> tuple[list[str], str]:
    text = item[2:] if item.startswith("--") else item
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form --section.field=value")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {item!r} has an empty key segment")
    return parts, value


# --------------------------------------------------------------------------------------------
# Public API


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """A copy of `config` with dotted typed overrides applied (`--a.b=v` or `a.b=v`).

    All overrides are gathered first, and each dataclass is rebuilt once with all its changes, so
    validation in `__post_init__` sees the final values together (setting `ratio_min` and
    `ratio_max` in one command never fails on the intermediate state). A later override of the
    same key wins.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"apply_overrides needs a dataclass instance, got {type(config).__name__}")
    tree: _Tree = {}
    for item in overrides:
        parts, value = _parse_override(item)
        node = tree
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if isinstance(child, str):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r} conflicts with an earlier '{prefix}=...'")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override {item!r} conflicts with earlier '{'.'.join(parts)}.*'")
        node[parts[-1]] = value
    return _apply_tree(config, tree, "")


def config_to_dict(config: object) -> dict[str, Any]:
    """The config as nested JSON-safe dicts (tuples become lists, Paths and Enums strings)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(config).__name__}")
    return {f.name: _to_json(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def config_from_dict(cls: type[T], data: Mapping[str, object]) -> T:
    """Rebuild a config of type `cls` from `config_to_dict` output; unknown keys are errors."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_from_dict needs a dataclass type, got {cls!r}")
    return _build(cls, data, "")


@overload
def load_recipe(path_or_name: str) -> object: ...
@overload
def load_recipe(path_or_name: str, expected: type[T]) -> T: ...
def load_recipe(path_or_name: str, expected: type[Any] | None = None) -> object:
    """Call `recipe()` from a Python file or from a module of the `cispo.recipes` package.

    A value ending in `.py` or naming an existing file is a path; otherwise it is a module name
    in `cispo.recipes` ("arithmetic_cispo"). With `expected`, the result must be an instance of it.
    """
    path = Path(path_or_name)
    if path_or_name.endswith(".py") or path.is_file():
        module = _load_file(path)
        where = str(path)
    else:
        module = _load_packaged(path_or_name)
        where = module.__name__
    recipe = getattr(module, "recipe", None)
    if not callable(recipe):
        raise ConfigError(f"{where} defines no recipe() function")
    config = recipe()
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"recipe() in {where} returned {type(config).__name__}, not a config")
    if expected is not None and not isinstance(config, expected):
        raise ConfigError(
            f"recipe() in {where} returned {type(config).__name__}, expected {expected.__name__}"
        )
    return config


def _load_file(path: Path) -> types.ModuleType:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    resolved = path.resolve()
    # A unique module name per file; registered in sys.modules because dataclasses and
    # get_type_hints look their module up there.
    name = f"cispo_recipe_{resolved.stem}_{abs(hash(str(resolved))):x}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import recipe file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load_packaged(name: str) -> types.ModuleType:
    try:
        package = importlib.import_module("cispo.recipes")
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"no recipe file {name!r}, and the cispo.recipes package is missing"
        ) from e
    available = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    if name not in available:
        close = difflib.get_close_matches(name, available, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"no recipe file or cispo.recipes module named {name!r}{hint} "
            f"available: {', '.join(available) or '(none)'}"
        )
    return importlib.import_module(f"cispo.recipes.{name}")


def format_config(config: object) -> str:
    """A readable multi-line dump: one `field: value` per line, sections indented."""
    lines = [type(config).__name__]
    _format_into(config, lines, indent=1)
    return "\n".join(lines)


def _format_into(config: object, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for f in dataclasses.fields(typing.cast(Any, config)):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines.append(f"{pad}{f.name}: ({type(value).__name__})")
            _format_into(value, lines, indent + 1)
        else:
            lines.append(f"{pad}{f.name}: {json.dumps(_to_json(value), ensure_ascii=False)}")
