"""``${VAR}`` and ``${VAR:-default}`` in config values, resolved against an environment mapping.

Substitution runs on parsed values (a ``$`` in a YAML comment is harmless). The section
reader turns the two exceptions here into :class:`~gpu_worker.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class MissingVariable(Exception):
    """``${NAME}`` without a default, and NAME is not set."""

    def __init__(self, name: str, path: str = ""):
        self.name = name
        self.path = path


class MalformedReference(Exception):
    """A ``${`` that is not ``${NAME}`` or ``${NAME:-default}``."""

    def __init__(self, text: str, path: str):
        self.text = text
        self.path = path


def substitute(value: Any, path: str, env: Mapping[str, str]) -> Any:
    """``value`` with every string's references replaced (dicts and lists walked); ``path`` is
    the key path reported in errors."""
    if isinstance(value, str):
        return substitute_text(value, path, env)
    if isinstance(value, dict):
        return {k: substitute(v, f"{path}.{k}", env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def substitute_text(text: str, path: str, env: Mapping[str, str]) -> str:
    if "${" not in text:
        return text
    if "${" in VAR.sub("", text):
        raise MalformedReference(text, path)

    def one(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            raise MissingVariable(name, path)
        return value

    return VAR.sub(one, text)
