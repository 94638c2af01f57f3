"""Finding and loading Demucs models: by name through Demucs' own loader, cached per process.

Weights come from a local Demucs repo folder (``<sig>.th`` files plus ``<name>.yaml`` bags,
the layout ``demucs --repo`` reads) when one is configured, else from Demucs' own download.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelError
from .hashing import file_sha256 as _sha256

REPO_HINT = (
    "Point Stemset at a local Demucs model folder: set `models.repo` in config.yaml or the "
    "STEMSET_MODEL_REPO environment variable to a folder holding the model's `.th` files and "
    "its bag `.yaml` (the layout `demucs --repo` reads), e.g. copied from a machine with network "
    "access after running `demucs -n <model>` once."
)

_lock = threading.Lock()
_cache: dict[tuple[str, str | None], Any] = {}


def load_model(name: str, repo: str | Path | None = None) -> Any:
    """A Demucs model or bag of models, in eval mode on the CPU. Loaded once per process."""
    repo_path = Path(repo).expanduser().resolve() if repo else None
    key = (name, str(repo_path) if repo_path else None)
    with _lock:
        if key not in _cache:
            _cache[key] = _load_uncached(name, repo_path)
        return _cache[key]


def _load_uncached(name: str, repo: Path | None) -> Any:
    from demucs.pretrained import get_model  # lazy: demucs loads torch (~1.5 s); fingerprints need neither
    from demucs.repo import ModelLoadingError

    if repo is not None:
        if not repo.is_dir():
            raise ModelError(f"The model repo folder {repo} does not exist or is not a folder.", REPO_HINT)
        available = available_models(repo)
        if name not in available:
            raise ModelError(
                f"Model {name!r} is not in the model repo {repo} "
                f"(it has: {', '.join(sorted(available)) or 'nothing'}).",
                REPO_HINT,
            )
    try:
        model = get_model(name=name, repo=repo)
    except ModelLoadingError as err:
        raise ModelError(f"Demucs could not load model {name!r}: {str(err).rstrip('.')}.", REPO_HINT) from err
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        where = f"from {repo}" if repo else "from Demucs' download servers (no network?)"
        raise ModelError(
            f"Could not load model {name!r} {where}: {type(err).__name__}: {str(err).rstrip('.')}.", REPO_HINT
        ) from err
    except SystemExit as err:  # demucs.utils.fatal exits the process; keep ours alive
        raise ModelError(f"Demucs refused to load model {name!r}.", REPO_HINT) from err
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def available_models(repo: Path) -> set[str]:
    """Names loadable from a local repo: bag yamls and single-model signatures."""
    names = set()
    for file in repo.iterdir():
        if file.suffix == ".yaml":
            names.add(file.stem)
        elif file.suffix == ".th":
            names.add(file.stem.rsplit("-", 1)[0] if "-" in file.stem else file.stem)
    return names


def model_identity(name: str, repo: str | Path | None = None) -> str:
    """What distinguishes these weights from others of the same name, for fingerprints.

    For a local repo: the bag's signatures and weights plus each file's checksum suffix (or a hash
    of the file when it has none). For Demucs' download: the signatures of Demucs' own bag file.
    """
    if repo:
        repo = Path(repo)
        bag_file = repo / f"{name}.yaml"
        if bag_file.is_file():
            bag = yaml.safe_load(bag_file.read_text()) or {}
            parts = [_file_identity(repo, sig) for sig in bag.get("models", [])]
            return f"{name}:{parts}:{bag.get('weights')}:{bag.get('segment')}"
        return f"{name}:{_file_identity(repo, name)}"
    bag_file = _demucs_remote_root() / f"{name}.yaml"
    if bag_file.is_file():
        bag = yaml.safe_load(bag_file.read_text()) or {}
        return f"{name}:{bag.get('models')}:{bag.get('weights')}:{bag.get('segment')}"
    return name


def _demucs_remote_root() -> Path:
    """``demucs.pretrained.REMOTE_ROOT`` (Demucs' own bag files), found without importing Demucs
    (and torch with it), so fingerprints are cheap to compute where Dagster loads definitions."""
    spec = importlib.util.find_spec("demucs")
    if spec is None or not spec.submodule_search_locations:
        return Path("/nonexistent-demucs")
    return Path(next(iter(spec.submodule_search_locations))) / "remote"


def _file_identity(repo: Path, sig: str) -> str:
    for file in sorted(repo.glob(f"{sig}*.th")):
        stem = file.stem
        if stem == sig:
            return f"{sig}:sha256:{_sha256(file)[:16]}"
        if stem.startswith(sig + "-"):
            return stem
    return f"{sig}:missing"
