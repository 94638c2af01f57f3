"""Where the segments of a separation fall: the one segment planner of the engine and streaming.

Demucs' ``apply_model`` cuts a mix into segments of the model's length (or ``params.segment``)
every ``stride = (1 - overlap) * segment`` samples, pads each to the length the model wants, and
with ``shifts`` runs the whole schedule on several views of the mix offset by a random amount.
:func:`plan_segments` reproduces that schedule for one model (one bag member): the same segment
length, stride and padded input length, and the same shift offsets drawn from the same
``random.Random`` in the same order (replaying the draws HTDemucs' forwards make in between).
``engine.separate`` runs every segment of a plan at once; ``streaming`` runs them window by
window. Both plan through here, so they cut, pad and shift identically.

Coordinates: view position ``p`` of a view with ``trim`` is mix sample ``p - trim``; outside the
recording the mix reads as zeros, as Demucs' zero-padded ``TensorChunk`` does.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs

from .errors import StrategyError
from .strategy import SeparationParams


@dataclass(frozen=True)
class View:
    """One (shifted) view of the mix."""

    trim: int  # view position p is mix sample p - trim
    length: int


@dataclass(frozen=True)
class Segment:
    """One model forward on one padded segment, and where its output goes."""

    view: int  # index into SegmentPlan.views
    offset: int  # segment start inside the view
    length: int  # output samples it contributes
    out_start: int  # mix coordinate of its first output sample (negative early in a shifted view)
    in_start: int  # mix coordinate where the padded model input starts
    valid: int  # padded model input length
    member: int = 0  # which bag member (for callers that schedule several members together)


@dataclass
class SegmentPlan:
    """The segment schedule of one model over a mix of a given length."""

    model: Any
    seg_len: int
    stride: int
    fixed_valid: int | None  # HTDemucs with a segment override: every input is this long
    views: list[View]

    def valid(self, chunk_len: int) -> int:
        """The padded model input length for a segment of ``chunk_len`` output samples."""
        if self.fixed_valid is not None:
            return self.fixed_valid
        if hasattr(self.model, "valid_length"):
            return int(self.model.valid_length(chunk_len))
        return chunk_len

    def segment(self, view: int, offset: int, member: int = 0) -> Segment:
        v = self.views[view]
        chunk = min(v.length - offset, self.seg_len)
        valid = self.valid(chunk)
        out_start = offset - v.trim
        return Segment(view, offset, chunk, out_start, out_start - (valid - chunk) // 2, valid, member)

    def segments(self) -> list[Segment]:
        """Every segment of every view, view by view."""
        return [self.segment(v, off) for v, view in enumerate(self.views) for off in range(0, view.length, self.stride)]

    def offsets(self, view: View, w0: int, w1: int, first: bool) -> range:
        """View offsets of the segments whose first output sample lies in mix range [w0, w1)
        (``first``: also those before w0, i.e. everything from the view's start)."""
        lo = 0 if first else w0 + view.trim
        hi = min(w1 + view.trim, view.length)
        start = -(-lo // self.stride) * self.stride
        return range(start, max(start, hi), self.stride)

    def window_segments(self, w0: int, w1: int, first: bool, member: int = 0) -> list[Segment]:
        """The segments whose first output sample lies in [w0, w1), view by view."""
        return [
            self.segment(v, off, member)
            for v, view in enumerate(self.views)
            for off in self.offsets(view, w0, w1, first)
        ]

    def weight_sum(self, weight: torch.Tensor, view: View, off: int, chunk_len: int) -> torch.Tensor:
        """The total transition ``weight`` the view's segments put on its positions [off, off + chunk_len)."""
        total = torch.zeros(chunk_len, device=weight.device)
        end = off + chunk_len
        k = max(0, (off - self.seg_len) // self.stride + 1)  # first segment that can reach past off
        while True:
            o = k * self.stride
            if o >= end or o >= view.length:
                break
            cl = min(view.length - o, self.seg_len)
            a, b = max(o, off), min(o + cl, end)
            if b > a:
                total[a - off : b - off] += weight[a - o : b - o]
            k += 1
        return total


def is_bag(model: Any) -> bool:
    return isinstance(model, BagOfModels)


def sub_models(model: Any) -> list[tuple[Any, list[float]]]:
    """``(member, per-source weights)`` of a bag, or the model itself with weight 1 per source."""
    if is_bag(model):
        return list(zip(model.models, model.weights, strict=True))
    return [(model, [1.0] * len(model.sources))]


def bag_members(model: Any, needed_sources: Iterable[str] | None) -> list[tuple[Any, list[float]]]:
    """The members that contribute to a kept source (e.g. htdemucs_ft runs one specialist per
    kept stem); a plain model is its own one member."""
    subs = sub_models(model)
    if not is_bag(model):
        return subs
    needed = set(needed_sources) if needed_sources is not None else set(model.sources)
    needed_idx = [k for k, s in enumerate(model.sources) if s in needed]
    return [(sub, weights) for sub, weights in subs if any(weights[k] for k in needed_idx)]


def segment_seconds(model: Any, params: SeparationParams) -> float:
    return float(params.segment if params.segment is not None else model.segment)


def transition_weight(seg_len: int) -> torch.Tensor:
    """Demucs' triangular overlap-add weight for one segment, peak 1 (on the CPU)."""
    weight = torch.cat([torch.arange(1, seg_len // 2 + 1), torch.arange(seg_len - seg_len // 2, 0, -1)])
    return weight / weight.max()


def random_draws_per_forward(model: Any) -> int:
    """How many times one forward of ``model`` draws from Python's ``random`` (Demucs 4.1)."""
    cross = getattr(model, "crosstransformer", None)
    return 1 if cross is not None and getattr(cross, "emb", None) == "sin" else 0


def plan_segments(model: Any, params: SeparationParams, length: int, rng: random.Random) -> SegmentPlan:
    """One model's schedule over ``length`` samples; draws its shift offsets from ``rng``."""
    sr = model.samplerate
    segment = segment_seconds(model, params)
    seg_len = int(sr * segment)
    stride = int((1 - params.overlap) * seg_len)
    if stride <= 0:
        raise StrategyError(f"overlap {params.overlap} leaves no stride for a {segment}s segment.")
    views = []
    if params.shifts:
        max_shift = int(0.5 * sr)
        draws_per_forward = random_draws_per_forward(model)
        for _ in range(params.shifts):
            offset = rng.randint(0, max_shift)
            view_len = length + max_shift - offset
            views.append(View(trim=max_shift - offset, length=view_len))
            # Demucs draws the next offset after this view's forwards, each of which (HTDemucs'
            # sinusoidal embedding) draws from the same generator: replay those draws so a seed
            # gives Demucs' exact offsets.
            for _ in range(len(range(0, view_len, stride)) * draws_per_forward):
                rng.randrange(model.crosstransformer.sin_random_shift + 1)
    else:
        views.append(View(trim=0, length=length))
    fixed = int(params.segment * sr) if isinstance(model, HTDemucs) and params.segment is not None else None
    return SegmentPlan(model=model, seg_len=seg_len, stride=stride, fixed_valid=fixed, views=views)


def count_segments(model: Any, length: int, params: SeparationParams) -> int:
    """How many segment forward passes separating ``length`` samples with ``model`` takes
    (for progress bars: with shifts, the offsets are not drawn yet, so this bounds them)."""
    total = 0
    for sub, _weights in sub_models(model):
        seg_len = int(sub.samplerate * segment_seconds(sub, params))
        stride = max(1, int((1 - params.overlap) * seg_len))
        if params.shifts:
            max_shift = int(0.5 * sub.samplerate)
            # Each shifted view is between length and length + max_shift samples long.
            per_shift = -(-(length + max_shift // 2) // stride)
            total += params.shifts * per_shift
        else:
            total += -(-length // stride)
    return total
