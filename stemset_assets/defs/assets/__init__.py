"""Assets: ``recording`` (per input), ``stems_<strategy>`` (per strategy) and ``catalog``."""
