"""The config machinery: typed sections, their validation helpers, overrides and the packaged-TOML reader.

A config is a dataclass of sections, each a dataclass owned by and defined beside the code that reads it (``data`` in
gali.pipelines, ``method`` in engine.method, ``model`` in engine.nets, ``optim`` and ``compute`` in engine.step, ``run``
and the whole :class:`gali.engine.loop.config.Config` in engine.loop). This module knows none of them: it fills any such
dataclass from TOML tables and ``section.key=value`` overrides, checks every value against its field's type, renames
deprecated keys, and writes the resolved config back as TOML. Every invalid key or value raises :class:`ConfigError`
naming the key and what is accepted, before any work starts. Presets (``presets/*.toml``) and tuple specs
(``engine/method/tuples/*.toml``) are read by the one reader :func:`read_toml`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from gali.engine.errors import ConfigError


def check_choice(key: str, value: str, accepted: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ConfigError(key, f"got {value!r}; accepted: {', '.join(accepted)}")


def check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    if not math.isfinite(value):
        raise ConfigError(key, f"got {value}; must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"got {value}; must be {'>= 0' if allow_zero else '> 0'}")


# -- packaged TOML ---------------------------------------------------------------------------------


def packaged_names(package: str, folder: str) -> list[str]:
    """Names (without ``.toml``) of the TOML files shipped in ``package``'s ``folder``."""
    files = resources.files(package) / folder
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def read_toml(name_or_path: str, *, package: str, folder: str, key: str) -> tuple[str, dict[str, Any]]:
    """``(origin, table)`` of a packaged TOML file by name, or of any ``.toml`` path.

    ``key`` is the config key the name came from (``preset``, ``method.tuples``): every error names
    it, and a name that is not packaged lists the accepted names.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(key, f"file {path} does not exist")
        text, origin = path.read_text(), str(path)
    else:
        resource = resources.files(package) / folder / f"{name_or_path}.toml"
        if not resource.is_file():
            accepted = ", ".join(packaged_names(package, folder))
            raise ConfigError(key, f"got {name_or_path!r}; accepted: {accepted} or a .toml path")
        text, origin = resource.read_text(), name_or_path
    try:
        return origin, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(key, f"{origin} is not valid TOML: {exc}") from exc


# -- filling sections ------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=4e-5'`` -> ``('optim.lr', 4e-5)``: TOML literals, else a bare string; 'none' -> None."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "overrides look like section.key=value, e.g. optim.lr=4e-5")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(key, "must be set (no 'none' here)")
    for kind in allowed:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and type(value) is kind:
            return value
    names = " or ".join("none" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(key, f"got {value!r} ({type(value).__name__}); expected {names}")


def section_names(config: Any) -> list[str]:
    """The section fields of a config dataclass (the fields whose values are dataclasses)."""
    return [f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))]


def set_value(config: Any, key: str, value: Any, *, aliases: Mapping[str, str] = {}, text: str | None = None) -> None:
    """Set ``section.name`` of ``config`` to ``value``, type-checked; a deprecated alias warns and is renamed.

    ``text`` is an override's value as written: a string key takes it as it stands wherever its TOML reading
    is not a string (``run.out_dir=2026-12-07`` is a date in TOML, ``data.root=2024`` an integer).
    """
    if key in aliases:
        warnings.warn(
            f"config key '{key}' is deprecated and will be removed; use '{aliases[key]}'", FutureWarning, stacklevel=3
        )
        key = aliases[key]
    sections = section_names(config)
    section_name, _, name = key.partition(".")
    if section_name not in sections or not name:
        raise ConfigError(key, f"unknown key; keys look like <section>.<name> with section in {', '.join(sections)}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        accepted = ", ".join(f"{section_name}.{f.name}" for f in dataclasses.fields(section))
        raise ConfigError(key, f"unknown key; accepted: {accepted}")
    accepted_types = typing.get_args(hints[name]) or (hints[name],)
    text_key = str in accepted_types and set(accepted_types) <= {str, type(None)}  # not int | str ('auto' or a number)
    if text is not None and value is not None and not isinstance(value, str) and text_key:
        value = text
    setattr(section, name, _coerce(key, value, hints[name]))


def fill_sections(
    config: Any,
    table: Mapping[str, Any],
    *,
    origin: str,
    overrides: Sequence[str] = (),
    skip: Sequence[str] = (),
    aliases: Mapping[str, str] = {},
) -> None:
    """Set ``config``'s sections from ``{section: {key: value}}`` tables, then from ``key=value`` overrides.

    Top-level keys in ``skip`` (a preset's name, say) are the caller's; any other must be a table.
    """
    for section_name, values in table.items():
        if section_name in skip:
            continue
        if not isinstance(values, dict):
            raise ConfigError(section_name, f"in {origin}: expected a [{section_name}] table")
        for name, value in values.items():
            set_value(config, f"{section_name}.{name}", value, aliases=aliases)
    for text in overrides:
        set_value(config, *parse_override(text), aliases=aliases, text=text.partition("=")[2].strip())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def dump_sections(config: Any, header: str) -> str:
    """``config``'s sections as TOML that :func:`fill_sections` reads back (None values are omitted)."""
    lines = [header]
    for section_name in section_names(config):
        lines.append(f"\n[{section_name}]")
        for name, value in dataclasses.asdict(getattr(config, section_name)).items():
            if value is not None:
                lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
