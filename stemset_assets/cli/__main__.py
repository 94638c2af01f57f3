"""``python -m stemset_assets.cli``: the same as the `stemset` command."""

import sys

from .main import main

sys.exit(main())
