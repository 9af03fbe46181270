"""Typed experiment configs: dataclasses, loaded from YAML plus dotted `key=value` overrides.

Every config is a tree of dataclasses. Loading validates the whole tree: an unknown key, a value
of the wrong type, a value outside a `Literal` or outside a field's range (`Positive`,
`NonNegative`, `Fraction`, ... below; every float must be finite) gets a `ConfigError` that names
the key and the valid values, before any run folder or file exists. Each field carries a docstring (the string literal under it), which
`describe()` reads back for `metacl config describe`.

A YAML file may start with `extends: other.yaml` (a path relative to the file) to inherit
another file's values; its own values win, merged key by key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from .errors import ConfigError

T = typing.TypeVar("T")


# ---------------------------------------------------------------------------------- ranges
@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number field, used as `Annotated[int, Range(1)]` (see the aliases below)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, value: Any, key: str) -> None:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ConfigError(f"{key}: {value!r} is out of range; valid values: {self.describe()}")

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        assert self.high is not None, "a Range bounds at least one side"
        return f"{'<' if self.high_open else '<='} {_num(self.high)}"


@dataclasses.dataclass(frozen=True)
class NonEmpty:
    """A list field that must hold at least one item."""

    def check(self, value: Any, key: str) -> None:
        if not value:
            raise ConfigError(f"{key}: must not be empty")

    def describe(self) -> str:
        return "non-empty"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


Positive = Annotated[int, Range(1)]
"""An integer >= 1: sizes, counts, intervals."""
NonNegative = Annotated[int, Range(0)]
"""An integer >= 0 (0 usually meaning "off")."""
PositiveFloat = Annotated[float, Range(0, low_open=True)]
"""A float > 0: learning rates, budgets."""
NonNegativeFloat = Annotated[float, Range(0)]
"""A float >= 0: weight decay, clipping norms (0 = off)."""
Fraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]
"""A share strictly between 0 and 1."""


# ---------------------------------------------------------------------------------------- YAML
class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (instead of last-wins)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} (line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}); keep one of them"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, following `extends:` chains."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {error.start}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: extends must be the path of another config file, got {parent!r}")
    chain = (*_chain, path.resolve())
    target = (path.parent / parent).resolve()
    if target in chain:
        cycle = " -> ".join(str(p) for p in (*chain, target))
        raise ConfigError(f"{path}: extends forms a cycle: {cycle}")
    return deep_merge(read_yaml(target, chain), data)


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. seed=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[keys[-1]] = value
    return data


# ---------------------------------------------------------------------------------- validation
def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from plain data, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls, include_extras=True)
    for key in data:
        if key not in fields:
            where = f" under '{prefix.rstrip('.')}'" if prefix else ""
            raise ConfigError(f"unknown key '{prefix}{key}'; valid keys{where}: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        default = _default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = deep_merge(to_dict(default), value)  # keys not given keep the field's own default
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from None


def _default(field: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for default factories), or MISSING."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        base, *constraints = typing.get_args(tp)
        return f"{_type_name(base)} {' '.join(c.describe() for c in constraints)}"
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *constraints = args
        value = _coerce(base, value, key)
        for constraint in constraints:
            constraint.check(value, key)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key}: invalid value {value!r}; valid choices: {choices}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)} ({'; '.join(errors)})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value] if origin is list else value
            if not isinstance(value, list):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (), base: dict | None = None
) -> T:
    """Load `cls` from an optional YAML file plus overrides (overrides win)."""
    data = deep_merge(base or {}, read_yaml(path)) if path else dict(base or {})
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(config: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ----------------------------------------------------------------------------------- describe
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        klass_node = tree.body[0]
        if not isinstance(klass_node, ast.ClassDef):
            continue
        body = klass_node.body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every leaf field, nested sections flattened with dots.

    Defaults are read from an instance, so a section whose default factory sets its own values
    (e.g. a smaller protocol) shows those.
    """
    rows = []
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    instance = cls() if instance is None else instance
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):  # a typed section (or one chosen at load time)
            rows.extend(describe(type(value), f"{prefix}{field.name}.", value))
        else:
            rows.append((prefix + field.name, _type_name(tp), getattr(instance, field.name), docs.get(field.name, "")))
    return rows
