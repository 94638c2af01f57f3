"""The `stemset` command line (:mod:`.main`), one module per command or group of commands.

Command modules import only config and core at their top; Dagster (through ``defs``), the web
API and the audio stack are imported inside the commands that need them, so `stemset --help`
and `stemset separate` start fast.
"""
