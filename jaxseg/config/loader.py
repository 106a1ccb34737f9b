"""YAML files and dotted overrides -> a config dataclass; writing, fingerprinting and comparing configs.

YAML files may start from another file with a top-level ``base: other.yaml`` (or a list of files),
resolved relative to the file that names it; bases are merged depth-first and then overridden by the
file's own keys. ``load_config(path, overrides, schema=Config)``: ``schema`` is the root dataclass, the
core :class:`Config` or a method's extension of it; a key it does not define is an error naming the
file (or override) and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from jaxseg.config.convert import (
    ConfigError,
    _from_dict,
    _is_union,
    _join,
    _show,
    _type_hints,
    _valid_keys_hint,
    to_dict,
)
from jaxseg.config.schema import Config
from jaxseg.fileio import write_text_atomic

C = TypeVar("C", bound=Config)


# --------------------------------------------------------------------------- YAML

# PyYAML implements YAML 1.1, where `1e-5` (no dot) is a *string*. Config files are
# written by people who expect it to be a float, so the loader and dumper below
# use a YAML 1.2-style float pattern. Both share it, so dumped strings that look
# like floats get quoted and round-trip.
_FLOAT_RE = re.compile(
    r"""^(?:
        [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
      | [-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
      | [-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
      | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
      | [-+]?\.(?:inf|Inf|INF)
      | \.(?:nan|NaN|NAN)
    )$""",
    re.X,
)
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _with_float_resolver(resolvers: dict) -> dict:
    # Deep copy: PyYAML's add_implicit_resolver mutates lists shared with SafeLoader.
    out = {ch: [r for r in lst if r[0] != _FLOAT_TAG] for ch, lst in resolvers.items()}
    for ch in "-+0123456789.":
        out.setdefault(ch, []).append((_FLOAT_TAG, _FLOAT_RE))
    return out


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = _with_float_resolver(yaml.SafeLoader.yaml_implicit_resolvers)

    def construct_mapping(self, node, deep=False):
        # PyYAML silently keeps the last of duplicate keys; in a config that hides mistakes.
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable key; PyYAML reports it below
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    yaml_implicit_resolvers = _with_float_resolver(yaml.SafeDumper.yaml_implicit_resolvers)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # [64, 64, 64] on one line; lists of lists / mappings in block style
    flat = dumper.default_flow_style is True or all(not isinstance(v, (list, tuple, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(tuple, _represent_list)


def _yaml_load(text: str, name: str = "<override>") -> Any:
    loader = _Loader(text)
    loader.name = name  # shown in YAML error marks instead of "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_dump(data: Any, **kwargs: Any) -> str:
    kwargs.setdefault("sort_keys", False)
    kwargs.setdefault("default_flow_style", False)
    kwargs.setdefault("allow_unicode", True)
    return yaml.dump(data, Dumper=_Dumper, **kwargs)


# ------------------------------------------------------------------ file loading


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    try:
        data = _yaml_load(text, str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys, got {_show(data)}")
    return data


def _record(prov: dict[str, str], data: Any, prefix: str, source: str) -> None:
    """Remember which source set each dotted key (later sources win)."""
    prov[prefix] = source
    if isinstance(data, dict):
        for k, v in data.items():
            _record(prov, v, _join(prefix, str(k)), source)


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: mappings merge key by key; anything else in ``top`` replaces.

    An empty section in ``top`` (``model:`` -> None) leaves ``base``'s section as is.
    """
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is None and isinstance(out.get(k), dict):
            continue
        else:
            out[k] = v
    return out


def _load_tree(path: Path, prov: dict[str, str], stack: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"{path}: cycle in 'base' includes: {chain}")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: base: expected a file name or a list of file names, got {_show(bases)}")
    merged: dict = {}
    for b in bases:
        base_path = Path(os.path.expanduser(b))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        merged = _merge(merged, _load_tree(base_path, prov, (*stack, resolved)))
    for k, v in data.items():
        _record(prov, v, str(k), str(path))
    return _merge(merged, data)


def _override_target(key: str, source: str, schema: type) -> Any:
    """Check a dotted override key against the schema; return the field's annotation."""
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"{source}: malformed key {key!r}; expected dotted field names like model.features_base")
    cls: Any = schema
    path = ""
    tp: Any = None
    for i, part in enumerate(parts):
        path = _join(path, part)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(f"{source}: {path}: unknown key{_valid_keys_hint(cls, part)}")
        tp = _type_hints(cls)[part]
        if i < len(parts) - 1:
            inner = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
            sections = [a for a in inner if dataclasses.is_dataclass(a)]
            if not sections:
                raise ConfigError(f"{source}: {path}: is a value, not a section; cannot set {key!r}")
            cls = sections[0]
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    return _is_union(tp) and str in typing.get_args(tp)


def _apply_override(data: dict, prov: dict[str, str], text: str, schema: type) -> dict:
    source = f"<override> {text!r}"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: malformed override; expected key.sub=value, e.g. model.features_base=16")
    tp = _override_target(key, source, schema)
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {key}: value is not valid YAML: {e}") from None
    if _accepts_str(tp) and value is not None and not isinstance(value, str):
        value = raw.strip()  # a string field takes the text as is: experiment=2024 -> "2024"
    parts = key.split(".")
    out = dict(data)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    _record(prov, value, key, source)
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), schema: type[C] = Config,
                *, ignore_sections: bool = False) -> C:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    ``schema``: the root dataclass, :class:`Config` or a method's extension of it (its own sections,
    e.g. ``jaxseg.dlb.config.DLBRunConfig``); a section it lacks is an unknown key, unless
    ``ignore_sections``: then the file's top-level sections (mappings) that ``schema`` lacks are dropped
    (`prepare` reads ``data`` from any experiment's config, a method's included).

    ``overrides`` are ``"a.b.c=value"`` strings; ``value`` is parsed as YAML
    (``model.features_base=16``, ``data.patch_size=[64,64,32]``,
    ``dro.enabled=true``, ``model.n_stages=null``); for string fields the raw
    text is kept. Raises :class:`ConfigError`.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    prov: dict[str, str] = {}
    fallback = "<defaults>"
    data: dict = {}
    if path is not None:
        p = Path(path)
        fallback = str(p)
        data = _load_tree(p, prov, ())
        if ignore_sections:
            names = {f.name for f in dataclasses.fields(schema)}
            data = {k: v for k, v in data.items() if k in names or not isinstance(v, dict)}
    for text in overrides:
        data = _apply_override(data, prov, text, schema)

    def where(key: str, related: Sequence[str]) -> str:
        for k in (key, *related):
            if k in prov:
                return prov[k]
        k = key
        while k:
            shorter = re.sub(r"(\[\d+\]|\.?[^.\[]+)$", "", k)
            if shorter == k:
                break
            k = shorter
            if k in prov:
                return prov[k]
        return fallback

    return _from_dict(schema, data, where)


def restrict(cfg: Config, schema: type[C] = Config) -> C:
    """The sections of ``cfg`` that ``schema`` defines, as a ``schema``: what a run writes and compares
    (a training run launched from a method's config keeps the core sections only)."""
    if type(cfg) is schema:
        return cfg
    return schema(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(schema) if f.init})


# ------------------------------------------------------------------ writing out


def dump_config(cfg: Any) -> str:
    """YAML text of a config, keys in dataclass field order; ``load_config`` reads it back equal."""
    return _yaml_dump(to_dict(cfg))


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``dump_config(cfg)`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    return write_text_atomic(path, dump_config(cfg))


# ------------------------------------------------------------ comparing configs


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            out.update(_flatten(getattr(obj, f.name), _join(prefix, f.name)))
        return out
    return {prefix: obj}


def _lookup(cfg: Any, key: str) -> Any:
    obj = cfg
    for i, part in enumerate(key.split(".")):
        if not (dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}):
            where = ".".join(key.split(".")[:i]) or "config"
            names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
            valid = f" valid keys in {where}: {', '.join(names)}" if names else f" {where} is not a section"
            raise ConfigError(f"config_fingerprint: unknown section {key!r};{valid}")
        obj = getattr(obj, part)
    return obj


def config_fingerprint(cfg: Any, sections: str | Sequence[str] | None = None) -> str:
    """Stable sha256 (hex) of the canonical YAML of the chosen parts of ``cfg``.

    ``sections`` are top-level field names or dotted keys (``"model"``,
    ``"data.patch_size"``); None means the whole config. Order and repeats do not
    matter. Compare fingerprints computed with the same code version: a new
    field changes the hash of every config that contains its section.
    """
    if sections is None:
        chosen = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    else:
        if isinstance(sections, str):
            sections = [sections]
        chosen = {key: to_dict(_lookup(cfg, key)) for key in sorted(set(sections))}
    canonical = _yaml_dump(chosen, sort_keys=True, width=1 << 30)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _fmt(value: Any) -> str:
    text = _yaml_dump(to_dict(value), default_flow_style=True, width=1 << 30).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text


def diff_configs(a: Any, b: Any) -> list[str]:
    """Changed leaves from ``a`` to ``b`` as ``"model.features_base: 32 -> 16"`` lines, in field order."""
    fa, fb = _flatten(a), _flatten(b)
    lines = []
    for key in list(fa) + [k for k in fb if k not in fa]:
        old, new = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if old != new or type(old) is not type(new):
            lines.append(f"{key}: {_fmt(old)} -> {_fmt(new)}")
    return lines
