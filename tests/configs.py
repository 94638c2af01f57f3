"""config.yaml text for tests: local storage, the tiny models, profile ``h4n`` running
``htdemucs`` into FLAC. Tests add or replace sections as YAML text."""

from __future__ import annotations

from pathlib import Path

HTDEMUCS = "htdemucs: {_: htdemucs, drums: drums, bass: bass, other: other, vocals: vocals}"


def tiny_config_yaml(
    repo: str | Path,
    root: str | Path = "./media",
    *,
    storage: str | None = None,
    sections: str = "",
    strategies: tuple[str, ...] = (),
) -> str:
    """The YAML: ``storage`` replaces the local block, ``sections`` is appended top-level YAML
    (e.g. ``gpu:`` or ``api:``), ``strategies`` are extra one-line strategy entries."""
    storage = storage or f"storage:\n  backend: local\n  local: {{root: {root}}}\n"
    extra = "".join(f"  {line}\n" for line in strategies)
    return (
        f"{storage}models:\n  repo: {repo}\n{sections}"
        "profiles:\n  h4n:\n    description: Zoom H4n stereo takes\n    strategies: [htdemucs]\n"
        f"    output: {{format: flac}}\nstrategies:\n  {HTDEMUCS}\n{extra}"
    )
