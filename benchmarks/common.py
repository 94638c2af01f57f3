"""Shared pieces of the benchmarks: the release htdemucs architecture and a synthetic mix."""

from __future__ import annotations

import json
import platform
import sys
from fractions import Fraction
from pathlib import Path

import torch
import yaml

from gpu_worker.process_memory import peak_rss_mb  # noqa: F401  (re-exported for the benchmarks)

# The released htdemucs: HTDemucs defaults with a 512-channel bottleneck before the cross
# transformer and a 7.8 s segment (41.5 M parameters, like the published checkpoint).
# Speed does not depend on weight values, so random weights stand in for the real ones.
RELEASE_HTDEMUCS = dict(sources=["drums", "bass", "other", "vocals"], bottom_channels=512, segment=Fraction(39, 5))


def release_htdemucs(seed: int = 0):
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(seed)
    return HTDemucs(**RELEASE_HTDEMUCS).eval()


def write_release_repo(folder: Path) -> Path:
    """A Demucs repo folder holding the release architecture as `htdemucs` (random weights)."""
    from demucs.states import get_state, save_with_checksum

    folder.mkdir(parents=True, exist_ok=True)
    if not list(folder.glob("955717e8-*.th")):
        model = release_htdemucs()
        args, kwargs = model._init_args_kwargs
        save_with_checksum(
            {
                "klass": type(model),
                "args": args,
                "kwargs": kwargs,
                "state": get_state(model, None, half=False),
                "training_args": {},
            },
            folder / "955717e8.th",
        )
    (folder / "htdemucs.yaml").write_text(yaml.safe_dump({"models": ["955717e8"]}))
    return folder


def synthetic_mix(seconds: float, seed: int = 0, sr: int = 44100) -> torch.Tensor:
    """A deterministic music-like stereo mix: bass line, chord, noise-burst drums."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sr)
    t = torch.arange(n, dtype=torch.float64) / sr
    bass = 0.3 * torch.sin(2 * torch.pi * 55 * (1 + (t // 2 % 4) / 4) * t)
    chord = sum(0.1 * torch.sin(2 * torch.pi * f * t) for f in (261.6, 329.6, 392.0))
    beat = ((t * 2) % 1 < 0.05).double() * torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    mono = (bass + chord + beat).float()
    return torch.stack([mono, 0.9 * mono + 0.01 * torch.randn(n, generator=g)])


def machine() -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
