"""Finding and loading ``config.yaml``.

The file is found through ``--config``, else ``$STEMSET_CONFIG``, else ``./config.yaml``;
when none was named and ``./config.yaml`` is absent, the embedded default (the shipped
``default_config.yaml``, the same content as the repository's ``config.yaml``) is used, so
``stemset`` works in any folder. A key written twice in one mapping is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gpu_worker.errors import ConfigError

from .schema import EMBEDDED_SOURCE, StemsetConfig
from .sections import SectionReader

CONFIG_ENV = "STEMSET_CONFIG"
DEFAULT_CONFIG_NAME = "config.yaml"

DEFAULT_CONFIG_YAML: str = (
    resources.files("stemset_assets.config").joinpath("default_config.yaml").read_text(encoding="utf-8")
)
"""The shipped ``config.yaml``, used when no config file is named and none is in the CWD."""


def _resolve(cli_path: Any, env: Mapping[str, str]) -> tuple[Path, str | None]:
    """The path and what named it (``--config``, ``STEMSET_CONFIG`` or None for the default)."""
    if cli_path is not None and str(cli_path) != "":
        return Path(cli_path).expanduser(), "--config"
    from_env = env.get(CONFIG_ENV)
    if from_env:
        return Path(from_env).expanduser(), CONFIG_ENV
    return Path(DEFAULT_CONFIG_NAME), None


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> StemsetConfig:
    """Read the config named by ``path`` (``--config``), ``$STEMSET_CONFIG`` or ``./config.yaml``.

    With nothing named and no ``./config.yaml``, the embedded default is used. A named file
    that does not exist is an error.
    """
    env = os.environ if env is None else env
    resolved, origin = _resolve(path, env)
    if not resolved.exists():
        if origin is None:
            return parse_config(DEFAULT_CONFIG_YAML, env=env)
        raise ConfigError(
            f"Config file {resolved} (from {origin}) does not exist.",
            f"Check the path, or drop {origin} to use ./config.yaml or the built-in defaults.",
        )
    if not resolved.is_file():
        raise ConfigError(f"Config file {resolved} is not a file.")
    try:
        text = resolved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {resolved} could not be read: {exc}.") from exc
    return parse_config(text, path=resolved, env=env)


def parse_config(
    text: str,
    *,
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
) -> StemsetConfig:
    """Parse config text. ``path`` names the file in errors and anchors relative paths
    (else ``base_dir``, else the CWD); without ``path`` the text counts as the embedded default."""
    source = str(path) if path is not None else EMBEDDED_SOURCE
    abs_path = Path(path).expanduser().absolute() if path is not None else None
    if abs_path is not None:
        anchor = abs_path.parent
    else:
        anchor = Path(base_dir).expanduser().absolute() if base_dir is not None else Path.cwd()
    reader = SectionReader(source, anchor, os.environ if env is None else env)
    return reader.read(_parse_yaml(text, source), abs_path)


# --------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        hint = (
            "Each key may appear once in a mapping: remove or rename one."
            if "duplicate key" in str(problem)
            else "Check indentation and quoting there (values with ': ' or '#' need quotes)."
        )
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}.", hint) from None
    cycle = _alias_cycle(data)
    if cycle is not None:
        raise ConfigError(
            f"{source}: {cycle} refers back to itself through a YAML alias (an anchor used inside itself).",
            "Aliases (*name) may only point at anchors (&name) outside the value that holds them.",
        )
    if data is None:
        raise ConfigError(
            f"{source}: the file is empty.",
            "Start from the shipped config.yaml (profiles, strategies, storage, gpu).",
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections "
            f"(storage, gpu, models, sensors, backfill, profiles, strategies), got {type(data).__name__}."
        )
    return data


def _alias_cycle(data: Any) -> str | None:
    """The key path of the first value that contains itself (``a: &x [*x]``), or None. PyYAML
    builds such values as self-referencing lists and dicts; anything walking them recurses for ever."""
    on_path: set[int] = set()
    done: set[int] = set()
    stack: list[tuple[Any, str, bool]] = [(data, "", False)]
    while stack:
        value, where, leaving = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        if leaving:
            on_path.discard(id(value))
            done.add(id(value))
            continue
        if id(value) in on_path:
            return where or "the top level"
        if id(value) in done:  # shared by two aliases, but not cyclic
            continue
        on_path.add(id(value))
        stack.append((value, where, True))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            child_at = f"{where}[{key}]" if isinstance(value, list) else (f"{where}.{key}" if where else str(key))
            stack.append((child, child_at, False))
    return None


def raw_section(config: StemsetConfig, *path: str) -> dict[str, Any]:
    """A section (``"storage", "s3"``) as written in the file, before ``${VAR}`` substitution
    (so a resource can refer to a secret by its variable's name); empty when unreadable."""
    try:
        text = config.path.read_text(encoding="utf-8") if config.path is not None else DEFAULT_CONFIG_YAML
        section = yaml.safe_load(text) or {}
        for name in path:
            section = section.get(name) or {}
        return section if isinstance(section, dict) else {}
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return {}
