"""Separation of recordings of any length in bounded memory: decode, separate and encode in windows.

``engine.separate`` (like Demucs' ``separate_tensor``) holds the whole mix, every shifted view's
overlap-add buffer and every stem in memory at once: with four stems about 0.3 GB more per minute
of audio, 17 GB for an hour (benchmarks/RESULTS.md). This module gives the same samples (to
float32 rounding) while holding only a window of each:

Pass 1 (:func:`scan_file`)
    Streams the decoded mix once and accumulates, in float64, what Demucs' normalisation needs
    over the *whole* file: the length and the mean and (unbiased) standard deviation of the mono
    mix ``wav.mean(0)`` (Chan et al.'s pairwise update, so no sum of squares cancels), plus the
    mix energy for the residual level.

Pass 2 (:func:`separate_blocks_streaming`), one per strategy node in tree order
    Every model forward is planned up front exactly as ``engine._apply_single`` plans it: the same
    segment length, stride and padded input length per segment, the same shifted views with their
    offsets drawn from the same ``random.Random`` in the same order (the root node's bag members
    first, then each chained child depth first, replaying the draws HTDemucs' forwards make), and
    the same bag members skipped. In mix coordinates a segment of view ``v`` at view offset
    ``off`` writes output samples ``[off - trim_v, off - trim_v + chunk)`` and reads the
    normalised mix at ``[off - trim_v - delta // 2, ... + valid)`` with zeros outside the
    recording, which is exactly what Demucs' zero-padded ``TensorChunk`` reads.

    The output is cut into windows of ``W`` samples. Window ``k`` runs (batched, grouped by model
    and padded length) every segment whose first output sample falls in ``[k W, (k+1) W)``; every
    segment covering a sample before ``(k+1) W`` starts before it, so after window ``k`` those
    samples are final and are emitted. A segment's output is weighted by Demucs' triangular
    transition weight divided by the total weight its view puts on each sample (a function of
    the schedule alone, computed from the neighbouring segments), times a per-source coefficient
    ``bag_weight / bag_total / shifts``; so one rolling buffer serves every view of every bag
    member (no per-member or per-view buffers, whatever ``shifts`` and the bag size are). Emitted
    blocks are de-normalised and go straight to one writer per final stem.

    A chained node's input is its parent's output: while the parent runs, that output is spilled
    to a raw float32 file (interleaved frames, exactly the samples ``engine.run_strategy`` passes
    on) and its normalisation statistics are accumulated; the child then streams from the file.

Per stem a :class:`StreamStats` accumulates what the worker reports (frames, NaN/Inf count,
peak, sum of squares and BS.1770 integrated loudness, mirroring pyloudnorm's gating blocks: one
float per 100 ms, so 600 kB for two hours). The residual ``mix - sum(stems)`` energy is
accumulated per block; with chained nodes, whose stems appear in later passes, the partial
residual lives in a float64 scratch file updated in place by each pass.

Memory: the input window plus one segment of context (kept as the decoder's 10 s blocks), one
``(sources, 2, W + segment)`` buffer on the compute device, a 10 s slice of each stem on its way
to the encoders, and one batch of segments. Nothing grows with the recording's length except the
loudness block list. ``W`` is 30 s on the CPU (1.5-3 MB of RSS per second of window, four stems); on a
GPU it grows to hold a full batch of segments (64 x 5.85 s for htdemucs at batch 64).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from . import audio
from .engine import (
    EngineStats,
    Progress,
    _autocast,
    _center_trim,
    _keep_spectral_ops_fp32,
    _random_draws_per_forward,
    _segment_seconds,
    _sub_models,
    auto_batch_size,
    to_device,
)
from .errors import ModelError, StrategyError
from .strategy import Strategy, StrategyNode

SAMPLE_RATE = audio.SAMPLE_RATE
CHANNELS = audio.CHANNELS
DEFAULT_WINDOW_S = 30.0  # output finalised per step (more on a GPU, to fill a batch)
_EMIT_FRAMES = SAMPLE_RATE * 10  # finished output goes to the writers in slices of this size
_DECODE_FRAMES = SAMPLE_RATE * 10  # input block size asked of the decoder


class StemSink(Protocol):
    """What ``writers_factory(stem)`` returns: ``audio.StemWriter`` fits."""

    def write(self, block: np.ndarray) -> None: ...  # float32 (channels, n), finite

    def close(self) -> None: ...

    def abort(self) -> None: ...


# --------------------------------------------------------------------------------------
# Pass 1: whole-file statistics
# --------------------------------------------------------------------------------------


@dataclass
class MixStats:
    """Length, mean and M2 of the mono mix ``wav.mean(0)``, and ``sum(wav**2)``; float64 throughout."""

    frames: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    energy: float = 0.0

    def add(self, block: np.ndarray) -> None:
        n = int(block.shape[-1])
        if not n:
            return
        ref = block.mean(axis=0, dtype=np.float32).astype(np.float64)  # as torch's float32 wav.mean(0)
        block_mean = float(ref.mean())
        block_m2 = float(np.square(ref - block_mean).sum())
        total = self.frames + n
        delta = block_mean - self.mean
        self.mean += delta * n / total
        self.m2 += block_m2 + delta * delta * self.frames * n / total
        self.frames = total
        self.energy += sum(float(np.square(row, dtype=np.float64).sum()) for row in block)

    def normalisation(self) -> tuple[np.float32, np.float32]:
        """``(mean, std + 1e-8)`` in float32, as ``separate`` computes them (std unbiased)."""
        mean = np.float32(self.mean)
        std = np.float32(math.sqrt(self.m2 / (self.frames - 1))) if self.frames > 1 else np.float32("nan")
        return mean, np.float32(std + np.float32(1e-8))


def scan_file(path, block_frames: int = SAMPLE_RATE * 30) -> tuple[MixStats, audio.AudioInfo]:
    """Pass 1 over a file: its :class:`MixStats` and the ``AudioInfo`` ``decode_audio`` would give.

    Decodes in bounded memory; raises ``AudioError`` exactly where ``decode_audio`` would.
    """
    src = audio._open(path)
    counter = [0]
    stats = MixStats()
    for block in audio._decode_stream(src, block_frames, SAMPLE_RATE, CHANNELS, counter):
        stats.add(block)
    n = counter[0]
    return stats, replace(src.info, frames=n, duration_s=n / src.info.sample_rate)


# --------------------------------------------------------------------------------------
# Per-stem statistics
# --------------------------------------------------------------------------------------


class _Loudness:
    """ITU-R BS.1770-4 integrated loudness of a stream of known length, equal to
    ``audio.integrated_loudness`` (pyloudnorm's K-weighting, 400 ms blocks every 100 ms, absolute
    and relative gates) on the concatenated stream. The filters run block by block with their
    state carried over; each gating block's energy is the sum of the sub-intervals between
    block edges it spans."""

    T_G = 0.4
    STEP = 0.25  # 1 - overlap 0.75

    def __init__(self, length: int, rate: int = SAMPLE_RATE, channels: int = CHANNELS):
        import pyloudnorm
        from scipy.signal import lfilter

        self._lfilter = lfilter
        self.rate = rate
        self.length = length
        self.enabled = channels <= 5 and length >= math.ceil(self.T_G * rate)
        if not self.enabled:
            return
        meter = pyloudnorm.Meter(rate)
        self.stages = []
        for f in meter._filters.values():
            b, a = f.generate_coefficients()
            self.stages.append((np.asarray(b, np.float64), np.asarray(a, np.float64), float(f.passband_gain),
                                [np.zeros(max(len(a), len(b)) - 1) for _ in range(channels)]))
        # Block edges exactly as pyloudnorm computes them (float64 products, truncated).
        total_s = length / rate
        nblocks = int(np.round((total_s - self.T_G) / (self.T_G * self.STEP))) + 1
        j = np.arange(0, nblocks)
        lo = np.minimum((self.T_G * (j * self.STEP) * rate).astype(np.int64), length)
        hi = np.minimum((self.T_G * (j * self.STEP + 1) * rate).astype(np.int64), length)
        self.edges = np.unique(np.concatenate([lo, hi, [0, length]]))
        self.sums = np.zeros(len(self.edges) - 1)
        self.lo = np.searchsorted(self.edges, lo)
        self.hi = np.searchsorted(self.edges, hi)
        self.pos = 0

    def add(self, block: np.ndarray) -> None:
        if not self.enabled or not block.shape[1]:
            return
        sq = None
        for ch in range(block.shape[0]):  # one channel at a time: fewer float64 temporaries
            x = block[ch].astype(np.float64)
            for b, a, gain, state in self.stages:
                y, state[ch] = self._lfilter(b, a, x, zi=state[ch])
                x = gain * y
            x *= x
            sq = x if sq is None else sq + x  # channel gains are 1.0 for L and R
        p0, n = self.pos, sq.shape[0]
        first = int(np.searchsorted(self.edges, p0, side="right")) - 1  # interval holding p0
        last = int(np.searchsorted(self.edges, p0 + n, side="left"))
        cuts = self.edges[first + 1 : last] - p0  # edges strictly inside the block
        starts = np.concatenate([[0], cuts]).astype(np.int64)
        parts = np.add.reduceat(sq, starts)
        k = min(len(parts), len(self.sums) - first)
        self.sums[first : first + k] += parts[:k]
        self.pos += n

    def integrated(self) -> float | None:
        if not self.enabled:
            return None
        z = np.zeros(len(self.lo))
        for k in range(int((self.hi - self.lo).max(initial=0))):
            idx = self.lo + k
            inside = idx < self.hi
            z[inside] += self.sums[idx[inside]]
        z *= 1.0 / (self.T_G * self.rate)
        with np.errstate(divide="ignore"):
            block_lufs = -0.691 + 10.0 * np.log10(z)
        gated = block_lufs >= -70.0
        if not gated.any():
            return None
        relative = -0.691 + 10.0 * np.log10(z[gated].mean()) - 10.0
        gated = (block_lufs > relative) & (block_lufs > -70.0)
        if not gated.any():
            return None
        value = -0.691 + 10.0 * np.log10(z[gated].mean())
        return float(value) if np.isfinite(value) else None


@dataclass
class StreamStats:
    """What the worker reports about one stem, accumulated block by block (NaN/Inf written as 0)."""

    length: int  # frames the stem will have
    frames: int = 0
    nonfinite: int = 0
    peak: float = 0.0
    sum_squares: float = 0.0
    values: int = 0  # samples (channels x frames) in sum_squares
    lufs: float | None = None  # set when the stream is complete
    _loudness: _Loudness | None = field(default=None, repr=False)

    def __post_init__(self):
        if self._loudness is None:
            self._loudness = _Loudness(self.length)

    def clean(self, block: np.ndarray) -> np.ndarray:
        """Count NaN/Inf in ``block``, zero them, update the statistics; returns the cleaned block."""
        finite = np.isfinite(block)
        bad = int(block.size - np.count_nonzero(finite))
        if bad:
            self.nonfinite += bad
            block = np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
        self.frames += block.shape[1]
        if block.size:
            self.peak = max(self.peak, float(np.max(np.abs(block))))
        self.sum_squares += sum(float(np.square(row, dtype=np.float64).sum()) for row in block)
        self.values += block.size
        self._loudness.add(block)
        return block

    def finish(self) -> None:
        self.lufs = self._loudness.integrated() if self.peak > 0 else None

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_squares / self.values) if self.values else 0.0


@dataclass
class StreamResult:
    stems: dict[str, StreamStats]  # final stems, in strategy order
    length: int
    mix_energy: float
    residual_energy: float
    timings: dict[str, float]  # "separate" (model work, decoding, bookkeeping) and "encode"

    @property
    def residual_db(self) -> float | None:
        """As ``worker._residual_db``: level of mix minus the sum of the stems, in dB re the mix."""
        if self.mix_energy == 0:
            return None
        return round(10 * math.log10(max(self.residual_energy, 1e-30) / self.mix_energy), 2)


# --------------------------------------------------------------------------------------
# Planning: the same segments and shift offsets as engine._apply_single
# --------------------------------------------------------------------------------------


@dataclass
class _View:
    trim: int  # view position p is mix sample p - trim
    length: int


@dataclass
class _Member:
    model: Any
    seg_len: int
    stride: int
    fixed_valid: int | None  # HTDemucs with a segment override: every input is this long
    views: list[_View]
    coef: torch.Tensor  # (sources,) bag weight / bag total / shifts
    batch_size: int
    weight: torch.Tensor | None = None  # triangular transition weight, on the device
    _scales: dict = field(default_factory=dict)

    def scale(self, view: _View, off: int, chunk_len: int) -> torch.Tensor:
        """weight / (total weight of the view) over [off, off + chunk_len): what turns a segment's
        output into its share of the overlap-added result. Only segments near a view's ends see a
        different neighbourhood, so all others share one cached tensor."""
        key = (min(off, self.seg_len + self.stride), min(view.length - off, 2 * self.seg_len + self.stride),
               chunk_len)
        if key not in self._scales:
            self._scales[key] = self.weight[:chunk_len] / _weight_sum(self, view, off, chunk_len)
        return self._scales[key]

    def valid(self, chunk_len: int) -> int:
        if self.fixed_valid is not None:
            return self.fixed_valid
        if hasattr(self.model, "valid_length"):
            return int(self.model.valid_length(chunk_len))
        return chunk_len

    def offsets(self, view: _View, w0: int, w1: int, first: bool) -> range:
        """View offsets of the segments whose first output sample lies in [w0, w1)."""
        lo = 0 if first else w0 + view.trim
        hi = min(w1 + view.trim, view.length)
        start = -(-lo // self.stride) * self.stride
        return range(start, max(start, hi), self.stride)


@dataclass
class _NodePlan:
    node: StrategyNode
    name: str
    sources: list[str]
    members: list[_Member]


@dataclass
class _Job:
    member: int
    view: int
    offset: int  # in the view
    length: int  # output samples
    out_start: int  # mix coordinates (may be negative for a shifted view's first segment)
    in_start: int  # mix coordinates of the padded model input
    valid: int  # model input length


def _plan_node(node: StrategyNode, model: Any, strategy: Strategy, path: str, length: int,
               rng: random.Random, device: torch.device) -> _NodePlan:
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs

    missing = sorted(set(node.outputs) - set(model.sources))
    if missing:
        raise StrategyError(
            f"Strategy {strategy.name!r}: model {node.model!r} at {path} has no output(s) {missing}; "
            f"it produces {list(model.sources)}."
        )
    if model.samplerate != SAMPLE_RATE:
        raise ModelError(f"Model {node.model!r} runs at {model.samplerate} Hz; Stemset feeds 44100 Hz.")
    if model.audio_channels != CHANNELS:
        raise ModelError(f"Model expects {model.audio_channels} channels, got {CHANNELS}.")
    params = node.params
    subs = _sub_models(model)
    if isinstance(model, BagOfModels):  # the members engine._apply runs (same skipping rule)
        needed_idx = [k for k, s in enumerate(model.sources) if s in node.outputs]
        subs = [(sub, w) for sub, w in subs if any(w[k] for k in needed_idx)]
    totals = [0.0] * len(model.sources)
    for _sub, weights in subs:
        for k, w in enumerate(weights):
            totals[k] += w
    members = []
    for sub, weights in subs:
        sr = sub.samplerate
        segment = _segment_seconds(sub, params)
        seg_len = int(sr * segment)
        stride = int((1 - params.overlap) * seg_len)
        if stride <= 0:
            raise StrategyError(f"overlap {params.overlap} leaves no stride for a {segment}s segment.")
        views = []
        if params.shifts:
            max_shift = int(0.5 * sr)
            draws_per_forward = _random_draws_per_forward(sub)
            for _ in range(params.shifts):
                offset = rng.randint(0, max_shift)
                view_len = length + max_shift - offset
                views.append(_View(trim=max_shift - offset, length=view_len))
                for _ in range(len(range(0, view_len, stride)) * draws_per_forward):
                    rng.randrange(sub.crosstransformer.sin_random_shift + 1)
        else:
            views.append(_View(trim=0, length=length))
        coef = [(w / totals[k] if totals[k] else w) / (params.shifts or 1) for k, w in enumerate(weights)]
        fixed = int(params.segment * sr) if isinstance(sub, HTDemucs) and params.segment is not None else None
        members.append(_Member(
            model=sub, seg_len=seg_len, stride=stride, fixed_valid=fixed, views=views,
            coef=torch.tensor(coef, dtype=torch.float32),
            batch_size=params.batch_size or auto_batch_size(device, params.precision),
        ))
    return _NodePlan(node=node, name=path, sources=list(model.sources), members=members)


def _window_frames(window_s: float | None, plans: list[_NodePlan]) -> int:
    if window_s is not None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        return max(1, int(round(window_s * SAMPLE_RATE)))
    frames = int(DEFAULT_WINDOW_S * SAMPLE_RATE)
    for plan in plans:  # big enough to fill a batch with one window's segments
        for m in plan.members:
            frames = max(frames, -(-m.batch_size // len(m.views)) * m.stride)
    return frames


def _weight_sum(m: _Member, view: _View, off: int, chunk_len: int) -> torch.Tensor:
    """The total transition weight view ``view`` puts on its positions [off, off + chunk_len)."""
    total = torch.zeros(chunk_len, device=m.weight.device)
    end = off + chunk_len
    k = max(0, (off - m.seg_len) // m.stride + 1)  # first segment that can reach past off
    while True:
        o = k * m.stride
        if o >= end or o >= view.length:
            break
        cl = min(view.length - o, m.seg_len)
        a, b = max(o, off), min(o + cl, end)
        if b > a:
            total[a - off : b - off] += m.weight[a - o : b - o]
        k += 1
    return total


# --------------------------------------------------------------------------------------
# Pass 2: one strategy node over a stream of blocks
# --------------------------------------------------------------------------------------


class _Reader:
    """Raw mix samples from a block iterator, for any range at or after the retained start;
    zeros outside [0, length). Keeps the blocks themselves (no growing buffer to re-copy) and
    only those not yet discarded."""

    def __init__(self, blocks: Iterable[np.ndarray], length: int):
        self.blocks = iter(blocks)
        self.length = length
        self.kept: list[tuple[int, np.ndarray]] = []  # (first frame, (channels, n) block)
        self.start = 0  # frames before this were discarded
        self.end = 0  # frames read from the iterator so far

    def fill(self, upto: int) -> None:
        upto = min(upto, self.length)
        while self.end < upto:
            block = next(self.blocks, None)
            if block is None:
                raise RuntimeError(f"the input ended after {self.end} of {self.length} frames")
            block = np.asarray(block, np.float32)
            if block.ndim != 2 or block.shape[0] != CHANNELS:
                raise ValueError(f"input blocks must be ({CHANNELS}, n), got {block.shape}")
            if block.shape[1]:
                self.kept.append((self.end, block))
                self.end += block.shape[1]

    def read(self, a: int, b: int) -> np.ndarray:
        lo, hi = max(a, 0), min(b, self.length)
        if lo >= hi:
            return np.zeros((CHANNELS, b - a), np.float32)
        self.fill(hi)
        if lo < self.start:
            raise RuntimeError(f"frames from {lo} were already discarded (kept from {self.start})")
        parts = []
        for first, block in self.kept:
            last = first + block.shape[1]
            if last <= lo or first >= hi:
                continue
            parts.append(block[:, max(lo, first) - first : min(hi, last) - first])
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        if lo > a or hi < b:
            x = np.pad(x, ((0, 0), (lo - a, b - hi)))
        return x

    def discard_before(self, pos: int) -> None:
        self.start = max(self.start, pos)
        while self.kept and self.kept[0][0] + self.kept[0][1].shape[1] <= self.start:
            self.kept.pop(0)

    def finish(self) -> None:
        self.fill(self.length)
        extra = sum(b.shape[1] for b in self.blocks)
        if self.end + extra != self.length:
            raise RuntimeError(f"the input holds {self.end + extra} frames, expected {self.length}")


def _window_jobs(plan: _NodePlan, k: int, window: int, length: int) -> list[_Job]:
    w0, w1 = k * window, (k + 1) * window
    jobs = []
    for mi, m in enumerate(plan.members):
        for vi, view in enumerate(m.views):
            for off in m.offsets(view, w0, w1, first=(k == 0)):
                chunk = min(view.length - off, m.seg_len)
                valid = m.valid(chunk)
                out_start = off - view.trim
                jobs.append(_Job(mi, vi, off, chunk, out_start, out_start - (valid - chunk) // 2, valid))
    return jobs


Emit = Callable[[int, np.ndarray, "_Reader"], None]  # (first frame, (sources, 2, n) stems, reader)


def _run_node(plan: _NodePlan, blocks: Iterable[np.ndarray], length: int, mix_stats: MixStats, window: int,
              device: torch.device, emit: Emit, progress: Progress | None, stats: EngineStats) -> None:
    mean, std = mix_stats.normalisation()
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    for m in plan.members:
        model = m.model
        model.to(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if plan.node.params.precision != "fp32":
            _keep_spectral_ops_fp32(model)
        stats.models_run.append(type(model).__name__)
        w = torch.cat([torch.arange(1, m.seg_len // 2 + 1), torch.arange(m.seg_len - m.seg_len // 2, 0, -1)])
        m.weight = (w / w.max()).to(device)
        m.coef = m.coef.to(device)
    precision = plan.node.params.precision
    reader = _Reader(blocks, length)
    span = window + max(m.seg_len for m in plan.members)
    acc = torch.zeros(len(plan.sources), CHANNELS, span, device=device)
    mean_d, std_d = mean_t.to(device), std_t.to(device)
    n_windows = -(-length // window)
    jobs = _window_jobs(plan, 0, window, length)
    for k in range(n_windows):
        w0, w1 = k * window, min((k + 1) * window, length)
        groups: dict[tuple[int, int], list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.member, job.valid), []).append(job)
        for (mi, _valid), group in groups.items():
            m = plan.members[mi]
            for i in range(0, len(group), m.batch_size):
                batch = group[i : i + m.batch_size]
                x = torch.stack([_normalised(reader, j.in_start, j.valid, mean_t, std_t) for j in batch]).to(device)
                t0 = time.perf_counter()
                with torch.inference_mode(), _autocast(device, precision):
                    y = m.model(x)
                y = y.float()
                stats.forward_s += time.perf_counter() - t0
                stats.batches += 1
                stats.segments += len(batch)
                for j, y_j in zip(batch, y):
                    skip = max(0, -j.out_start)
                    if skip >= j.length:
                        continue  # a shifted view's first segment can fall wholly before the mix
                    contrib = _center_trim(y_j, j.length) * m.scale(m.views[j.view], j.offset, j.length)
                    a = j.out_start + skip - w0
                    acc[..., a : a + j.length - skip] += m.coef[:, None, None] * contrib[..., skip:]
                if progress:
                    progress(len(batch))
        for a in range(0, w1 - w0, _EMIT_FRAMES):  # de-normalise and hand over in slices
            b = min(a + _EMIT_FRAMES, w1 - w0)
            out = to_device(acc[..., a:b] * std_d + mean_d, torch.device("cpu")).numpy()
            emit(w0 + a, out, reader)
            del out
        # Slide the buffer by one window, in place (span = window + longest segment).
        tail = acc[..., window:]
        acc[..., : span - window].copy_(tail.clone() if span - window > window else tail)  # overlap?
        acc[..., span - window :].zero_()
        jobs = _window_jobs(plan, k + 1, window, length) if k + 1 < n_windows else []
        keep = min([j.in_start for j in jobs] + [w1])
        reader.discard_before(keep)
    reader.finish()


def _normalised(reader: _Reader, a: int, n: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The model input [a, a + n) of the normalised mix, zero outside the recording (as Demucs pads)."""
    lo, hi = max(a, 0), min(a + n, reader.length)
    if lo >= hi:
        return torch.zeros(CHANNELS, n)
    x = (torch.from_numpy(reader.read(lo, hi)) - mean) / std
    return F.pad(x, (lo - a, a + n - hi))


# --------------------------------------------------------------------------------------
# Spills and the residual
# --------------------------------------------------------------------------------------


class _Spill:
    """A chained node's input: raw float32 interleaved frames on disk, with its MixStats."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.stats = MixStats()

    def write(self, block: np.ndarray) -> None:
        self.stats.add(block)
        self.file.write(np.ascontiguousarray(block.T, dtype=np.float32).tobytes())

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as fh:
            while True:
                x = np.fromfile(fh, dtype=np.float32, count=frames * CHANNELS)
                if not x.size:
                    return
                yield x.reshape(-1, CHANNELS).T

    def remove(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class _Residual:
    """sum((mix - sum of final stems)**2) in float64. When some stems come from later passes the
    partial residual is kept in a float64 scratch file, updated in place pass by pass."""

    def __init__(self, path: Path | None):
        self.energy = 0.0
        self.path = path
        self.file = open(path, "w+b") if path is not None else None

    def update(self, pos: int, mix: np.ndarray | None, stems: np.ndarray, last: bool) -> None:
        """``stems``: float64 (channels, n) sum of this pass's final stems; ``mix`` on the first pass."""
        if mix is not None:
            stems -= mix  # in place: stems now holds -(residual)
        else:
            self.file.seek(pos * CHANNELS * 8)
            stems -= np.fromfile(self.file, dtype=np.float64, count=stems.size).reshape(-1, CHANNELS).T
        if last:
            self.energy += sum(float(np.dot(row, row)) for row in stems)
        else:
            self.file.seek(pos * CHANNELS * 8)
            self.file.write(np.ascontiguousarray(-stems.T).tobytes())

    def remove(self) -> None:
        if self.file is not None:
            self.file.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def separate_blocks_streaming(
    strategy: Strategy,
    open_blocks: Callable[[int], Iterable[np.ndarray]],
    mix_stats: MixStats,
    writers_factory: Callable[[str], StemSink],
    load: Callable[[str], Any],
    device: torch.device,
    *,
    seed: int | None = None,
    window_s: float | None = None,
    progress: Progress | None = None,
    stats: EngineStats | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
) -> StreamResult:
    """Run ``strategy`` over a mix that ``open_blocks(frames)`` streams as float32 ``(2, n)`` blocks
    (any sizes; ``frames`` is a suggestion), with ``mix_stats`` from a first pass over the same
    blocks. Final stems go to ``writers_factory(stem)`` writers (closed here, aborted on error),
    NaN/Inf written as zeros. Equal to ``engine.run_strategy`` with the same ``seed``.
    ``window_s`` (default: 30 s, or more where a batch of segments needs it) sets the memory.
    Chained nodes spill their input to ``tmpdir`` (default: a new temporary folder)."""
    length = mix_stats.frames
    if length <= 0:
        raise ValueError("cannot separate an empty mix")
    stats = stats or EngineStats()
    rng = random.Random(seed) if seed is not None else random.Random()
    started = time.perf_counter()
    encode_s = 0.0

    # Plan every node first, in run_strategy's order, so the shift offsets are drawn as it draws them.
    nodes: list[tuple[StrategyNode, str]] = []

    def walk(node: StrategyNode, path: str) -> None:
        nodes.append((node, path))
        for source, target in node.outputs.items():
            if isinstance(target, StrategyNode):
                walk(target, f"{path}.{source}")

    walk(strategy.root, strategy.name)
    plans = [_plan_node(node, load(node.model), strategy, path, length, rng, device) for node, path in nodes]
    window = _window_frames(window_s, plans)

    own_tmp = tmpdir is None
    scratch = Path(tempfile.mkdtemp(prefix="stemset-stream-") if own_tmp else tmpdir)
    chained = len(plans) > 1
    results = {name: StreamStats(length) for name in strategy.stems}
    writers: dict[str, StemSink] = {}
    spills: dict[int, _Spill] = {}  # id(child node) -> its input
    residual = _Residual(scratch / f"residual-{os.getpid()}-{id(plans)}.f64" if chained else None)
    try:
        for name in strategy.stems:
            writers[name] = writers_factory(name)
        for index, plan in enumerate(plans):
            node = plan.node
            last = index == len(plans) - 1
            if index == 0:
                node_stats = mix_stats
                blocks = open_blocks(min(window, _DECODE_FRAMES))
            else:
                spill = spills[id(node)]  # stays listed (and removed in `finally`) until done
                spill.close()
                node_stats, blocks = spill.stats, spill.blocks(min(window, _DECODE_FRAMES))
            for source, target in node.outputs.items():
                if isinstance(target, StrategyNode):
                    spills[id(target)] = _Spill(scratch / f"{plan.name}.{source}-{os.getpid()}.f32")
            routes = [(k, node.outputs.get(s)) for k, s in enumerate(plan.sources) if s in node.outputs]

            def emit(pos: int, out: np.ndarray, reader: _Reader, routes=routes, first=(index == 0),
                     last=last) -> None:
                nonlocal encode_s
                t0 = time.perf_counter()
                total = np.zeros((CHANNELS, out.shape[-1]), np.float64)
                for k, target in routes:
                    if isinstance(target, StrategyNode):
                        spills[id(target)].write(out[k])
                    else:
                        clean = results[target].clean(out[k])
                        writers[target].write(clean)
                        total += clean
                mix = reader.read(pos, pos + out.shape[-1]) if first else None
                residual.update(pos, mix, total, last)
                del total
                encode_s += time.perf_counter() - t0

            _run_node(plan, blocks, length, node_stats, window, device, emit, progress, stats)
            if index:
                spills.pop(id(node)).remove()
            t0 = time.perf_counter()
            for k, target in routes:
                if isinstance(target, str):
                    results[target].finish()
                    writers.pop(target).close()
            encode_s += time.perf_counter() - t0
    except BaseException:
        for writer in writers.values():
            try:
                writer.abort()
            except Exception:
                pass
        raise
    finally:
        for spill in spills.values():
            spill.remove()
        residual.remove()
        if own_tmp:
            shutil.rmtree(scratch, ignore_errors=True)
    total_s = time.perf_counter() - started
    return StreamResult(stems=results, length=length, mix_energy=mix_stats.energy,
                        residual_energy=residual.energy,
                        timings={"separate": total_s - encode_s, "encode": encode_s})


def separate_file_streaming(
    strategy: Strategy,
    input_path,
    writers_factory: Callable[[str], StemSink],
    load: Callable[[str], Any],
    device: torch.device,
    *,
    seed: int | None = None,
    window_s: float | None = None,
    progress: Progress | None = None,
    stats: EngineStats | None = None,
    mix_stats: MixStats | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
) -> StreamResult:
    """Separate an audio file in bounded memory: pass 1 (:func:`scan_file`, skipped when
    ``mix_stats`` is given) and pass 2 decoding it again with ``audio.iter_decode``, whose samples
    are exactly ``decode_audio``'s. Output equals ``run_strategy(strategy, decode_audio(path))``."""
    if mix_stats is None:
        mix_stats, _info = scan_file(input_path)

    def blocks(frames: int) -> Iterator[np.ndarray]:
        with warnings.catch_warnings():  # pass 1 already warned about this file (e.g. a cut-off WAV)
            warnings.simplefilter("ignore", audio.AudioWarning)
            src = audio._open(input_path)
        yield from audio._decode_stream(src, frames, SAMPLE_RATE, CHANNELS, [0])

    return separate_blocks_streaming(
        strategy, blocks, mix_stats,
        writers_factory, load, device, seed=seed, window_s=window_s, progress=progress, stats=stats,
        tmpdir=tmpdir)


def tensor_blocks(wav: np.ndarray | torch.Tensor, frames: int) -> Iterator[np.ndarray]:
    """A ``(2, n)`` array as a stream of blocks (for tests and in-memory callers)."""
    x = wav.numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    for i in range(0, x.shape[1], frames):
        yield np.ascontiguousarray(x[:, i : i + frames], dtype=np.float32)


def mix_stats_of(wav: np.ndarray | torch.Tensor, frames: int = SAMPLE_RATE * 30) -> MixStats:
    stats = MixStats()
    for block in tensor_blocks(wav, frames):
        stats.add(block)
    return stats
