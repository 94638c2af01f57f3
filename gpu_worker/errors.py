"""User-facing errors: each says what went wrong and how to fix it, in one paragraph."""

from __future__ import annotations


class StemsetError(Exception):
    """An error a user can act on. ``str(err)`` is the whole message, hint included."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message.rstrip()
        self.hint = hint
        super().__init__(self.message if not hint else f"{self.message} {hint}")


class AudioError(StemsetError):
    """The input could not be decoded, or decoded to something unusable (empty, NaN)."""


class EncodeError(StemsetError):
    """A stem could not be encoded in the requested format."""


class StrategyError(StemsetError):
    """A strategy tree in the config is malformed or names an unknown model output."""


class ModelError(StemsetError):
    """A Demucs model could not be found or loaded."""


class ConfigError(StemsetError):
    """config.yaml is missing, malformed, or refers to an unset environment variable."""


class StorageError(StemsetError):
    """An object could not be read from or written to the media store."""


class JobError(StemsetError):
    """A separation job is malformed or was written by an incompatible version."""
