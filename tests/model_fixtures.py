"""Tiny real Demucs models for the tests (built by gpu_worker.demo_models, loaded by Demucs' loader)."""

from gpu_worker.demo_models import (  # noqa: F401
    SOURCES4,
    SOURCES6,
    make_model_repo,
    save_model,
    tiny_hdemucs,
    tiny_htdemucs,
)
