"""Stemset's separation engine: audio I/O, Demucs inference, the job contract and its worker.

This package imports no Dagster: it runs the same way in-process, behind HTTP and on Modal.
"""

ENGINE_VERSION = "1"
"""Bumped whenever a change alters the samples the engine writes (part of every fingerprint)."""
