"""``python -m stemset_assets.cli``: the same as the `stemset` command."""

from .main import entry

entry()
