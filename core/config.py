"""Frozen-dataclass configs: YAML in, resolved config out, unknown keys are an error.

Every stage (extract, train, report) has one frozen dataclass config. A YAML file or a dict is
turned into it by `from_dict`, which refuses unknown keys (listing the valid ones) and checks
types; `to_dict` gives back the plain resolved form that is saved, fingerprinted and logged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


from core.errors import MuskError


def check_finite(value: Any, where: str) -> Any:
    """`value`, refused (MuskError naming `where`, the key or flag) when it is, or holds in nested
    mappings and lists, a float that is not a number or is infinite: `temperature: .nan` would pass
    every `<= 0` check and run to nonsense (a NaN temperature samples nothing valid)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MuskError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{where}[{i}]")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except MuskError as e:
                errors.append(str(e))
        raise MuskError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is Any:
        return check_finite(value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise MuskError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MuskError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise MuskError(f"{where}: expected a mapping, got {value!r}")
        return check_finite(dict(value), where)
    if origin is typing.Literal:
        if value not in args:
            leaf = where.rsplit(".", 1)[-1].rsplit(" ", 1)[-1]
            raise MuskError(f"{where}: unknown {leaf} {value!r}; choices: {list(args)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MuskError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)  # YAML reads 1e-4 as a string: accept it
        except ValueError:
            raise MuskError(f"{where}: expected a number, got {value!r}") from None
        return check_finite(number, where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MuskError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MuskError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MuskError(f"{where}: expected a string, got {value!r}")
        return value
    return value


_BOUND_WORDS = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}


def bound(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, note: str = "") -> Any:
    """A dataclass field whose bounds sit beside it: `beta: float = bound(0.04, ge=0)`. `check_bounds`
    reads them; `note` says what the edge means (`"0: off"`) in the refusal."""
    limits = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={"bounds": limits, "note": note})


def check_bounds(obj: Any, where: str) -> None:
    """Refuse (MuskError naming `where.field`, the bound and the value) a field of the dataclass `obj`
    outside the bounds `bound` set beside it; None (an unset optional) passes."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        for op, limit in f.metadata.get("bounds", {}).items():
            ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[op]
            if not ok:
                note = f.metadata.get("note")
                raise MuskError(f"{where}.{f.name} must be {_BOUND_WORDS[op]} {limit:g}{f' ({note})' if note else ''}, "
                                f"got {value!r}")


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build the frozen dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise MuskError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        near = {k: difflib.get_close_matches(k, list(fields), n=3, cutoff=0.5) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {v}?" for k, v in near.items() if v)
        raise MuskError(
            f"{where}: unknown key(s) {unknown}{' (' + hint + ')' if hint else ''}; "
            f"valid keys for {cls.__name__} are {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MuskError(f"{where}: missing required key {name!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """The plain (YAML/JSON-able) form of a config: dataclasses to dicts, tuples to lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MuskError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise MuskError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MuskError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge: `override` wins; lists are replaced, not merged."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def is_text(tp: Any) -> bool:
    """Whether field type tp is str, str | None or a Literal of strings (VALUE then stays the text typed,
    not YAML's reading: `off` is "off", not false)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return all(isinstance(a, str) for a in args)
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and args == [str])


def parse_sets(cls: type, items: list[str] | tuple[str, ...], where: str = "--set") -> dict:
    """`--set KEY=VALUE` items -> a nested override dict for `cls` (a frozen dataclass config).

    KEY is a field name, dotted for nested configs (`task.train_size=64`). VALUE is read as YAML
    (`0.1`, `true`, `null`, `[q_proj, v_proj]`, `{a: 1}`), except for a string field, which takes the
    text as typed (`decode_merged=off` is "off", not YAML's false; `null` still clears an optional
    one), and is checked against the field's annotation here, so `beta=abc` fails naming --set.
    Raises MuskError for an item without "=", an unknown KEY (listing the nearest valid keys) and a
    VALUE of the wrong type (naming the key, the expected type and the nearest valid keys). Later
    items win over earlier ones.
    """
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise MuskError(f"{where} {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        tp, node, parts = cls, out, key.split(".")
        for depth, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(tp) if f.init} if dataclasses.is_dataclass(tp) else {}
            prefix = ".".join(parts[:depth])
            valid = [f"{prefix}.{n}" if prefix else n for n in sorted(fields)]
            if part not in fields:
                near = difflib.get_close_matches(".".join(parts[: depth + 1]), valid, n=5, cutoff=0.4)
                raise MuskError(f"{where} {key!r}: unknown key {part!r}"
                                f"{' for ' + prefix if prefix else ''}; nearest valid keys: {near or valid[:10]}")
            sub = typing.get_type_hints(tp)[part]
            if depth == len(parts) - 1:
                if is_text(sub) and value is not None and not isinstance(value, str):
                    value = raw.strip()  # YAML read it as a bool, number or date; the field wants the text
                try:
                    _convert(sub, value, f"{where} {key}")  # typed now, so the message names --set
                except MuskError as e:
                    near = difflib.get_close_matches(key, valid, n=5, cutoff=0.6)
                    raise MuskError(f"{e} (field type {_type_name(sub)}; nearest valid keys: {near})") from None
                node[part] = value
                break
            inner = [a for a in typing.get_args(sub) if dataclasses.is_dataclass(a)]
            tp = sub if dataclasses.is_dataclass(sub) else (inner[0] if inner else None)
            if tp is None:
                raise MuskError(f"{where} {key!r}: {part!r} is not a nested config; set it whole ({part}=...)")
            node = node.setdefault(part, {})
    return out
