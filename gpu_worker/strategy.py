"""Separation strategies: the seed's tree format, its validation and its fingerprint.

A node is ``{_: <model>, <model output>: <stem name> | <child node>, __params: {...}}``.
A model output mapped to a string is kept under that stem name; mapped to a node, it is fed
to that node's model (chaining); not named at all, it is dropped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import ENGINE_VERSION
from .errors import ModelError, StrategyError

PRECISIONS = ("fp32", "bf16", "fp16")
STEM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,127}$")
PARAM_NAMES = ("shifts", "overlap", "segment", "precision", "batch_size")
_FOUR = ("drums", "bass", "other", "vocals")
# The outputs of Demucs' released models, so a misspelt output is caught when the config is read
# (other models are checked when they load: check_node_model).
RELEASED_SOURCES = {
    **dict.fromkeys(("htdemucs", "htdemucs_ft", "hdemucs_mmi", "mdx", "mdx_extra", "mdx_q", "mdx_extra_q"), _FOUR),
    "htdemucs_6s": (*_FOUR, "guitar", "piano"),
}


def _nearest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; the nearest valid one is {close[0]!r}" if close else ""


@dataclass(frozen=True)
class SeparationParams:
    """How one model is applied. Defaults are Demucs' own (`demucs.api.Separator`)."""

    shifts: int = 1
    overlap: float = 0.25
    segment: float | None = None  # seconds; None = the model's own segment
    precision: str = "fp32"
    batch_size: int | None = None  # segments per forward pass; None = chosen from memory

    def output_affecting(self) -> dict[str, Any]:
        """The params that change the samples written (batch size only changes speed)."""
        return {
            "shifts": self.shifts,
            "overlap": round(float(self.overlap), 6),
            "segment": None if self.segment is None else round(float(self.segment), 6),
            "precision": self.precision,
        }


@dataclass(frozen=True)
class StrategyNode:
    model: str
    outputs: Mapping[str, str | StrategyNode]
    params: SeparationParams = field(default_factory=SeparationParams)

    def walk(self) -> Iterator[StrategyNode]:
        yield self
        for target in self.outputs.values():
            if isinstance(target, StrategyNode):
                yield from target.walk()


@dataclass(frozen=True)
class Strategy:
    name: str
    root: StrategyNode

    @property
    def stems(self) -> list[str]:
        """Final stem names, in tree order."""
        names: list[str] = []

        def collect(node: StrategyNode) -> None:
            for target in node.outputs.values():
                if isinstance(target, StrategyNode):
                    collect(target)
                else:
                    names.append(target)

        collect(self.root)
        return names

    @property
    def models(self) -> list[str]:
        seen: list[str] = []
        for node in self.root.walk():
            if node.model not in seen:
                seen.append(node.model)
        return seen

    def normalised(self) -> dict[str, Any]:
        """The tree with defaults filled in and keys sorted: what the fingerprint hashes."""

        def norm(node: StrategyNode) -> dict[str, Any]:
            out: dict[str, Any] = {"_": node.model, "__params": node.params.output_affecting()}
            for source in sorted(node.outputs):
                target = node.outputs[source]
                out[source] = norm(target) if isinstance(target, StrategyNode) else target
            return out

        return norm(self.root)

    def to_tree(self) -> dict[str, Any]:
        """The tree in config form (params included in full); parse_strategy inverts it."""

        def tree(node: StrategyNode) -> dict[str, Any]:
            out: dict[str, Any] = {"_": node.model}
            for source, target in node.outputs.items():
                out[source] = tree(target) if isinstance(target, StrategyNode) else target
            out["__params"] = asdict(node.params)
            return out

        return tree(self.root)


def check_node_model(strategy_name: str, node: StrategyNode, model: Any, path: str) -> None:
    """Check that a loaded model can serve ``node``: it has every output the node names, at 44.1 kHz."""
    missing = sorted(set(node.outputs) - set(model.sources))
    if missing:
        raise StrategyError(
            f"Strategy {strategy_name!r}: model {node.model!r} at {path} has no output(s) {missing}; "
            f"it produces {list(model.sources)}."
        )
    if model.samplerate != 44100:
        raise ModelError(f"Model {node.model!r} runs at {model.samplerate} Hz; Stemset feeds 44100 Hz.")


def parse_strategy(name: str, tree: Any, where: str = "strategies") -> Strategy:
    """Validate a strategy tree from config. Errors name the key path, e.g. ``strategies.x.vocals``."""
    if not isinstance(name, str) or not STEM_NAME.match(name):
        raise StrategyError(
            f"Strategy name {name!r} at {where} is not usable as an asset key.",
            "Use lower-case letters, digits and underscores, starting with a letter.",
        )
    root = _parse_node(tree, f"{where}.{name}", SeparationParams())
    strategy = Strategy(name, root)
    stems = strategy.stems
    if not stems:
        raise StrategyError(
            f"Strategy {name!r} ({where}.{name}) keeps no stem.",
            "Map at least one model output to a stem name, e.g. `vocals: vocals`.",
        )
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise StrategyError(
            f"Strategy {name!r} ({where}.{name}) writes stem name(s) {dupes} more than once.",
            "Give every kept output its own stem name.",
        )
    return strategy


def _parse_node(tree: Any, path: str, inherited: SeparationParams) -> StrategyNode:
    if not isinstance(tree, Mapping):
        raise StrategyError(
            f"{path} must be a mapping like {{_: htdemucs, vocals: vocals}}, got {type(tree).__name__}."
        )
    model = tree.get("_")
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise StrategyError(
            f"{path}._ must name a Demucs model (htdemucs, htdemucs_ft, htdemucs_6s, ...), got {model!r}."
        )
    params = _parse_params(tree.get("__params"), f"{path}.__params", inherited)
    outputs: dict[str, str | StrategyNode] = {}
    for key, target in tree.items():
        if key in ("_", "__params"):
            continue
        if not isinstance(key, str) or not STEM_NAME.match(key):
            raise StrategyError(f"{path}: {key!r} is not a model output name.")
        known = RELEASED_SOURCES.get(model)
        if known is not None and key not in known:
            raise StrategyError(
                f"{path}.{key}: model {model!r} has no output {key!r}{_nearest(key, (*known, '__params'))}.",
                f"{model} produces {', '.join(known)}; `_` names the model and `__params` holds its parameters.",
            )
        if isinstance(target, str):
            if not STEM_NAME.match(target):
                raise StrategyError(
                    f"{path}.{key}: stem name {target!r} is not usable in file names and asset keys.",
                    "Use lower-case letters, digits and underscores, starting with a letter.",
                )
            outputs[key] = target
        elif isinstance(target, Mapping):
            # A child inherits its parent's params unless it sets its own.
            outputs[key] = _parse_node(target, f"{path}.{key}", params)
        else:
            raise StrategyError(f"{path}.{key} must be a stem name or a child node, got {target!r}.")
    return StrategyNode(model=model, outputs=outputs, params=params)


def _parse_params(raw: Any, path: str, inherited: SeparationParams) -> SeparationParams:
    if raw is None:
        return inherited
    if not isinstance(raw, Mapping):
        raise StrategyError(f"{path} must be a mapping of separation parameters.")
    unknown = sorted(str(k) for k in set(raw) - set(PARAM_NAMES))
    if unknown:
        raise StrategyError(
            f"{path}.{unknown[0]}: unknown parameter {unknown[0]!r}{_nearest(unknown[0], PARAM_NAMES)}"
            f" (known: {', '.join(sorted(PARAM_NAMES))}).",
        )
    params = replace(inherited, **dict(raw))
    if not isinstance(params.shifts, int) or isinstance(params.shifts, bool) or not 0 <= params.shifts <= 20:
        raise StrategyError(f"{path}.shifts must be a whole number from 0 to 20, got {params.shifts!r}.")
    if not isinstance(params.overlap, (int, float)) or not 0 <= params.overlap < 1:
        raise StrategyError(f"{path}.overlap must be a number in [0, 1), got {params.overlap!r}.")
    if params.segment is not None and (
        not isinstance(params.segment, (int, float)) or not 0.5 <= params.segment <= 600
    ):
        raise StrategyError(f"{path}.segment must be seconds between 0.5 and 600, got {params.segment!r}.")
    if params.precision not in PRECISIONS:
        raise StrategyError(f"{path}.precision must be one of {list(PRECISIONS)}, got {params.precision!r}.")
    if params.batch_size is not None and (
        not isinstance(params.batch_size, int) or isinstance(params.batch_size, bool) or params.batch_size < 1
    ):
        raise StrategyError(f"{path}.batch_size must be a positive whole number, got {params.batch_size!r}.")
    return params


def fingerprint(strategy: Strategy, model_identities: Mapping[str, str] | None = None) -> str:
    """A short stable hash of what decides a strategy's output samples.

    Covers the normalised tree (models, routing, stem names, output-affecting params), the
    identity of each model (e.g. its weight signatures) and the engine version. Cosmetic
    edits (key order, comments, batch size, defaults written out) leave it unchanged.
    """
    identities = model_identities or {}
    payload = {
        "engine": ENGINE_VERSION,
        "tree": strategy.normalised(),
        "models": {m: identities.get(m, m) for m in sorted(strategy.models)},
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
