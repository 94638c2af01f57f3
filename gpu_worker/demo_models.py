"""Tiny real Demucs models with random weights, saved in Demucs' own repo format.

They let the whole pipeline run where no real weights can be downloaded (the tests, an offline
demo: `python -m gpu_worker.demo_models DIR`); their stems are noise. `make_model_repo(folder)`
writes a local repo with the names the shipped config uses:
`htdemucs` (one HTDemucs), `htdemucs_ft` (a bag of four with one-hot weights, like the
release), `htdemucs_6s` (six sources) and `hdemucs_mmi` (a hybrid HDemucs), all tiny and
randomly initialised with fixed seeds so every test run sees the same weights.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import torch
import yaml
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.states import get_state, save_with_checksum

SOURCES4 = ["drums", "bass", "other", "vocals"]
SOURCES6 = ["drums", "bass", "other", "vocals", "guitar", "piano"]


def tiny_htdemucs(sources=SOURCES4, seed=0, segment=Fraction(1, 1), t_layers=1, t_heads=1):
    """``t_layers=2`` adds a cross-attention layer after the first self-attention one."""
    torch.manual_seed(seed)
    return HTDemucs(
        sources=list(sources),
        channels=4,
        depth=2,
        nfft=512,
        t_layers=t_layers,
        t_heads=t_heads,
        t_hidden_scale=1.0,
        dconv_depth=1,
        dconv_comp=2,
        bottom_channels=0,
        segment=segment,
    ).eval()


def tiny_hdemucs(sources=SOURCES4, seed=0):
    torch.manual_seed(seed)
    return HDemucs(sources=list(sources), channels=4, depth=3, nfft=256, dconv_depth=1, dconv_comp=2, segment=1).eval()


def save_model(model, folder: Path, sig: str) -> Path:
    """Save as Demucs' `save_with_checksum` does: `<sig>-<sha256[:8]>.th` with klass/args/kwargs/state."""
    for old in folder.glob(f"{sig}-*.th"):
        old.unlink()  # Demucs refuses a repo with two files for one signature
    args, kwargs = model._init_args_kwargs
    package = {
        "klass": model.__class__,
        "args": args,
        "kwargs": kwargs,
        "state": get_state(model, None, half=False),
        "training_args": {},
    }
    save_with_checksum(package, folder / f"{sig}.th")
    return next(folder.glob(f"{sig}-*.th"))


def make_model_repo(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(tiny_htdemucs(seed=1), folder, "a1b2c3d4")
    (folder / "htdemucs.yaml").write_text(yaml.safe_dump({"models": ["a1b2c3d4"]}))
    ft = []
    for k in range(4):
        sig = f"f7e0c4b{k}"
        save_model(tiny_htdemucs(seed=10 + k), folder, sig)
        ft.append(sig)
    weights = [[1.0 if i == k else 0.0 for i in range(4)] for k in range(4)]
    (folder / "htdemucs_ft.yaml").write_text(yaml.safe_dump({"models": ft, "weights": weights}))
    save_model(tiny_htdemucs(SOURCES6, seed=20), folder, "5c90dfd2")
    (folder / "htdemucs_6s.yaml").write_text(yaml.safe_dump({"models": ["5c90dfd2"]}))
    save_model(tiny_hdemucs(seed=30), folder, "75fc33f5")
    (folder / "hdemucs_mmi.yaml").write_text(yaml.safe_dump({"models": ["75fc33f5"]}))
    # A bag mixing two members with soft weights: exercises per-source weighted averaging.
    save_model(tiny_htdemucs(seed=40), folder, "b0a9e1e1")
    save_model(tiny_htdemucs(seed=41), folder, "b0a9e1e2")
    (folder / "tiny_bag.yaml").write_text(
        yaml.safe_dump({"models": ["b0a9e1e1", "b0a9e1e2"], "weights": [[1.0, 0.5, 2.0, 1.0], [1.0, 1.5, 1.0, 0.0]]})
    )
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m gpu_worker.demo_models FOLDER")
    print(make_model_repo(Path(sys.argv[1])))
