"""Small helpers the commands share: checking a file argument, printing a table."""

from __future__ import annotations

from pathlib import Path

from gpu_worker.errors import StemsetError


def existing_file(path: Path) -> Path:
    """``path`` made absolute, or a clear error when it is not an existing file."""
    path = path.expanduser().absolute()
    if not path.is_file():
        raise StemsetError(f"{path} does not exist or is not a file.", "Check the path and try again.")
    return path


def format_table(table: list[tuple[str, ...]]) -> str:
    """A plain aligned text table; the first row is the header."""
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
