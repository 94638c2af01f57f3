"""Reading one config value: checked against its type and range, with ``${VAR}`` substituted.

:class:`ValueReader` holds the file's name (for errors), the folder relative paths are anchored
to, and the environment; :class:`~stemset_assets.config.sections.SectionReader` builds on it.
Every error is a :class:`ConfigError` naming the file and the key path.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpu_worker.errors import ConfigError

from .env import MalformedReference, MissingVariable, substitute


class ValueReader:
    """Typed, range-checked values of the parsed tree, substituting variables as they are read."""

    def __init__(self, source: str, anchor: Path, env: Mapping[str, str]):
        self.source = source
        self.anchor = anchor
        self.env = env

    def error(self, path: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.source}: {path} {message}", hint)

    def substitute(self, value: Any, path: str, required: bool = True) -> Any:
        """``${VAR}`` / ``${VAR:-default}`` in every string of ``value``. With
        ``required=False`` a missing variable yields None instead of an error."""
        try:
            return substitute(value, path, self.env)
        except MalformedReference as bad:
            raise self.error(
                bad.path,
                f"has a malformed variable reference in {bad.text!r}.",
                "Write ${NAME} or ${NAME:-default}; NAME is letters, digits and underscores.",
            ) from None
        except MissingVariable as missing:
            if not required:
                return None
            raise self.error(
                missing.path,
                f"uses ${{{missing.name}}}, but the environment variable {missing.name} is not set.",
                f"Export {missing.name}, or write ${{{missing.name}:-default}} in the file to give it a default.",
            ) from None

    def section(self, raw: Any, path: str, keys: tuple[str, ...]) -> dict:
        """A mapping whose keys are checked against ``keys`` (catches typos); None = empty."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.error(path, f"must be a mapping with keys {', '.join(keys)} (got {type(raw).__name__}).")
        for key in raw:
            if key not in keys:
                raise self.unknown_key(f"{path}.{key}", key, keys, path)
        return raw

    def unknown_key(self, where: str, key: Any, keys: tuple[str, ...], section: str) -> ConfigError:
        """The error for a key no section knows: it names the key and the nearest valid one."""
        close = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.5)
        hint = f"Did you mean {close[0]!r}?" if close else "Remove it, or rename it to one of those."
        return self.error(where, f"is not a known key in {section} (allowed: {', '.join(keys)}).", hint)

    def get(self, sec: dict, key: str, path: str, default: Any = None, required: bool = True) -> Any:
        value = sec.get(key)
        if value is None:
            return default
        return self.substitute(value, f"{path}.{key}", required=required)

    def text(self, value: Any, path: str, *, optional: bool = False) -> str | None:
        if value is None:
            if optional:
                return None
            raise self.error(path, "is required.")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(path, f"must be text (got {type(value).__name__}).")
        value = str(value).strip()
        if not value:
            if optional:
                return None
            raise self.error(path, "must not be empty.")
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.error(path, f"must be one of {', '.join(choices)} (got {value!r}).")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(path, f"must be a whole number from {lo} to {hi} (got {value!r}).")
        return value

    def number(self, value: Any, path: str, lo: float, what: str = "a number") -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lo:
            raise self.error(path, f"must be {what} >= {lo:g} (got {value!r}).")
        return float(value)

    def url(self, value: Any, path: str, *, optional: bool) -> str | None:
        text = self.text(value, path, optional=optional)
        if text is None:
            return None
        if not re.match(r"^https?://[^/\s]+", text):
            raise self.error(path, f"must be an http:// or https:// URL (got {text!r}).")
        return text.rstrip("/")

    def local_path(self, text: str, anchor: Path) -> Path:
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = anchor / path
        return Path(os.path.normpath(path))
