"""The type-hint driven converter behind every config section.

A config is a tree of frozen stdlib dataclasses; YAML mappings and dotted overrides become them through
:func:`from_dict`, so the dataclass definitions are the single source of truth for names, types,
defaults and valid choices:

* ``typing.Literal[...]`` fields accept exactly the listed values;
* ``tuple[int, int, int]`` / ``tuple[float, ...]`` accept YAML lists (length is checked when fixed) and
  are stored as tuples;
* ``X | None`` accepts ``null``; other unions (``int | Literal["all"]``) accept any member;
* ``bool`` accepts only ``true``/``false``; ``int`` refuses bools and floats with a fractional part;
  ``float`` accepts ints.

Every problem is a :class:`ConfigError` naming the full dotted key and where the value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

# --------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """Any problem with a configuration: unknown key, wrong type, bad value, bad file."""


class _Invalid(ConfigError):
    """Internal: a problem at a dotted ``key`` (relative to where it was raised).

    Raised by the converter and by ``__post_init__`` validation. :func:`from_dict`
    turns it into a plain :class:`ConfigError` carrying the full key and source.
    ``related`` names other keys involved (for cross-field checks) so the source
    lookup can find the file that set them.
    """

    def __init__(self, key: str, problem: str, related: Sequence[str] = (), owner: str = ""):
        self.key = key
        self.problem = problem
        self.related = tuple(related)
        where = f"{owner}.{key}" if owner and key else (owner or key)
        super().__init__(f"{where}: {problem}" if where else problem)


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def check_field(ok: bool, key: str, problem: str, *related: str) -> None:
    """Raise the section's validation error for `key` (with `problem`) unless `ok`: for sections' _validate."""
    if not ok:
        raise _Invalid(key, problem, related)


# ------------------------------------------------------------------------- schema


class Section:
    """Mixin for config sections: coerces and validates fields on construction.

    Runs on every construction path (``from_dict``, direct calls,
    ``dataclasses.replace``), so a config object is always well typed.
    """

    def __post_init__(self) -> None:
        try:
            for f in dataclasses.fields(self):  # type: ignore[arg-type]
                tp = _type_hints(type(self))[f.name]
                value = getattr(self, f.name)
                converted = _convert(tp, value, f.name, strict_sections=True)
                if converted is not value:
                    object.__setattr__(self, f.name, converted)
            self._validate()
        except _Invalid as e:  # name the class for direct construction / dataclasses.replace
            raise _Invalid(e.key, e.problem, e.related, owner=type(self).__name__) from None

    def _validate(self) -> None:  # overridden by sections with cross-field rules
        pass


# ---------------------------------------------------------------------- converter


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


_PLURAL = {str: "strings", bool: "bools", int: "ints", float: "floats"}


def _describe_many(tp: Any) -> str:
    if tp in _PLURAL:
        return _PLURAL[tp]
    if typing.get_origin(tp) is tuple:
        return _describe(tp).replace("a list", "lists", 1)
    return f"values that are {_describe(tp)}"


def _describe(tp: Any) -> str:
    """Human description of an annotation, for error messages."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "anything"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe_many(args[0])}"
        if args and all(a == args[0] for a in args):
            return f"a list of {len(args)} {_describe_many(args[0])}"
        return "a list [" + ", ".join(_describe(a) for a in args) + "]"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    if isinstance(tp, type):
        return {str: "a string", bool: "a bool (true/false)", int: "an int", float: "a float"}.get(tp, tp.__name__)
    return str(tp)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _valid_keys_hint(cls: type, key: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(names)}"


def _convert(tp: Any, value: Any, path: str, *, strict_sections: bool = False) -> Any:
    """Validate ``value`` against annotation ``tp`` and return the typed value.

    Raises :class:`_Invalid` with ``path`` (the full dotted key known so far). Long: one branch per kind of
    annotation (Any, unions, literals, tuples, lists, dicts, sections, scalars).
    """
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Invalid(path, f"expected null, got {_show(value)}")

    origin = typing.get_origin(tp)

    if origin is Literal:
        for choice in typing.get_args(tp):
            # type check too, so that True does not match 1 and 1.0 does not match 1
            if type(value) is type(choice) and value == choice:
                return choice
        choices = ", ".join(repr(c) for c in typing.get_args(tp))
        raise _Invalid(path, f"invalid value {_show(value)}; valid choices: {choices}")

    if _is_union(tp):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        candidates = [m for m in members if m is not type(None)]
        errors: list[_Invalid] = []
        for member in candidates:
            try:
                return _convert(member, value, path, strict_sections=strict_sections)
            except _Invalid as e:
                errors.append(e)
        # A nested problem (a tuple element, a section key) is more useful than a summary.
        deep = [e for e in errors if e.key != path]
        if len(deep) == 1:
            raise deep[0]
        raise _Invalid(path, f"expected {_describe(tp)}, got {_show(value)}")

    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Invalid(path, f"expected {_describe(tp)}, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            elem_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise _Invalid(path, f"expected {_describe(tp)} (length {len(args)}), got length {len(value)}: {_show(value)}")
            elem_types = list(args)
        out = tuple(_convert(t, v, f"{path}[{i}]", strict_sections=strict_sections) for i, (t, v) in enumerate(zip(elem_types, value)))
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(out, value)) else out

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if value is None and not strict_sections:
            value = {}  # an empty YAML section (`model:` with everything commented out)
        if isinstance(value, Mapping):
            return _build_dataclass(tp, value, path)
        raise _Invalid(path, f"expected {_describe(tp)} for section {path!r}, got {_show(value)}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(path, f"expected a bool (true/false), got {_show(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise _Invalid(path, f"expected an int, got bool {_show(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Invalid(path, f"expected an int, got {_show(value)}")
    if tp is float:
        if isinstance(value, bool):
            raise _Invalid(path, f"expected a float, got bool {_show(value)}")
        if isinstance(value, float):
            return value
        if isinstance(value, int):
            return float(value)
        raise _Invalid(path, f"expected a float, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid(path, f"expected a string, got {_show(value)}")

    raise TypeError(f"jaxseg.config: unsupported annotation {tp!r} at {path!r}")


def _build_dataclass(cls: type, data: Mapping[str, Any], path: str) -> Any:
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise _Invalid(_join(path, str(key)), f"unknown key{_valid_keys_hint(cls, key)}")
        kwargs[key] = _convert(hints[key], value, _join(path, key))
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and no_default and f.name not in kwargs:
            raise _Invalid(_join(path, f.name), "missing required key")
    try:
        return cls(**kwargs)
    except _Invalid as e:  # raised by __post_init__ with keys relative to this section
        raise _Invalid(_join(path, e.key), e.problem, [_join(path, r) for r in e.related]) from None


_SourceLookup = Callable[[str, Sequence[str]], str]


def _from_dict(cls: type, data: Any, where: _SourceLookup, path: str = "") -> Any:
    try:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise _Invalid(path, f"expected a mapping, got {_show(data)}")
        return _build_dataclass(cls, data, path)
    except _Invalid as e:
        source = where(e.key, e.related)
        what = f"{e.key}: " if e.key else ""
        raise ConfigError(f"{source}: {what}{e.problem}") from None


def from_dict(cls: type, data: Mapping[str, Any] | None, *, source: str, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) nested mapping.

    Missing keys take the dataclass defaults. ``source`` (a file name, or
    ``"<override>"``) and ``path`` (the dotted key of ``data`` within the whole
    config, e.g. ``"model"``) only serve to make error messages precise.
    Raises :class:`ConfigError`.
    """
    return _from_dict(cls, data, lambda key, related: source, path)


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready structure of a config: dataclasses -> dicts (field order), tuples -> lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
