"""YAML files -> a tree of typed dataclasses: ``base:`` inheritance, ``key.sub=value`` overrides, typed checks.

Generic: knows nothing of the run config (``megatron_pz.config`` composes the tree and calls ``build``). Values
are checked against the dataclass field types loosely (lists, dicts, optionals); every error is a
``ConfigError`` naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from megatron_pz.errors import ConfigError

# A decimal number in scientific or plain notation. YAML 1.1 reads "5e-5" (no dot) as a string, so a float
# field accepts such strings; "nan" / "inf" stay strings and are refused.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _member_types(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def as_float(value: Any, tp: Any) -> Any:
    """``value`` as a float where the field type is ``float`` or an optional float: ints, and numeric strings
    such as ``"5e-5"``. Anything else, and every value of a field that also admits ``str`` (or ``int``, for
    ints), is returned unchanged for ``type_ok`` to judge."""
    members = _member_types(tp)
    if float not in members or str in members or isinstance(value, bool):
        return value
    if isinstance(value, int) and int not in members:
        return float(value)
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key twice in one mapping: PyYAML keeps the last, so a second ``optim:`` section
    would silently drop everything the first one set."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line "
                                f"{first.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` that refuses a repeated key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def yaml_reason(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message with a caret, as one short phrase (its context's position 1-based)."""
    reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "'\\t'" in reason:
        reason += " (indent with spaces, not tabs)"
    context, mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and mark is not None:
        reason += f" ({context} from line {mark.line + 1}, column {mark.column + 1})"
    return reason


def yaml_error_line(exc: yaml.YAMLError, path: str) -> str:
    """``path:LINE:COLUMN: not valid YAML: reason``, 1-based like an editor's position."""
    mark = getattr(exc, "problem_mark", None)
    at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    return f"{at}: not valid YAML: {yaml_reason(exc)}"


def type_ok(value: Any, tp: Any) -> bool:
    """Loose structural type check for YAML values (int accepted where float is expected)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def build(cls: type, data: dict[str, Any], source: str, moved: Mapping[str, str] = {}, where: str = "") -> Any:
    """``cls(**data)`` with nested dataclass fields built recursively; ``moved`` maps old dotted keys to their
    new place, so an old key's error names the new one. ``source`` names the file(s) in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} in '{where or 'top level'}' is not a name")
        path = f"{where}.{key}" if where else key
        if key not in fields:
            now = [f"'{old}' is now '{new}'" for old, new in moved.items() if old == path or old.startswith(path + ".")]
            if now:
                raise ConfigError(f"{source}: unknown key '{path}': " + "; ".join(now))
            guess = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise ConfigError(f"{source}: unknown key '{path}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, source, moved, path)
        else:
            value = as_float(value, tp)
            if not type_ok(value, tp):
                want = getattr(tp, "__name__", tp)
                if float in _member_types(tp):
                    want = f"{want}, a number such as 5e-7 or 0.01"
                raise ConfigError(f"{source}: '{path}' = {value!r} has the wrong type (expected {want})")
            if isinstance(value, float) and not math.isfinite(value):  # YAML's .inf / .nan
                raise ConfigError(f"{source}: '{path}' = {value!r} must be a finite number")
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # Sections validate themselves under their class name ("CorpusConfig.paths"); the user sets "corpus.paths".
        message = str(exc).replace(f"{cls.__name__}.", f"{where}.") if where else str(exc)
        raise ConfigError(f"{source}: {message}") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: section '{where or 'top level'}': {exc}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its ``base:`` chain merged in (paths relative to the file; loops refused)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a .yaml file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): is it a YAML file?") from None
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_line(exc, str(path))) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' = {base!r} must be the path of another run file")
    if base is not None:
        data = _merge(read_yaml(path.parent / base, seen + (path,)), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (``["a", "b"]``, value parsed as a YAML scalar or flow collection)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml_text(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse the value: {yaml_reason(exc)}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``key.sub=value`` in ``data`` (in place; sections are created as needed) and return it."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
    return data
