"""Small PNGs for the Dagster UI: a recording's waveform and the catalog's cost over time.

Rendered with matplotlib's object API on the Agg canvas (no pyplot, no display, thread-safe),
imported inside the functions so loading the definitions stays fast.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from collections.abc import Sequence

import numpy as np

WAVE_COLOR = "#3b6fd8"


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib costs start-up time

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def waveform_png(peaks: np.ndarray, duration_s: float, title: str = "") -> bytes:
    """An 8 x 1.6 inch waveform from ``(n, 2)`` (min, max) peaks spanning ``duration_s``."""
    from matplotlib.figure import Figure  # lazy: matplotlib costs start-up time

    peaks = np.asarray(peaks, dtype=np.float32).reshape(-1, 2)
    t = np.linspace(0.0, max(duration_s, 1e-9), num=len(peaks), endpoint=False)
    fig = Figure(figsize=(8, 1.6))
    ax = fig.add_axes((0.06, 0.22, 0.92, 0.62))
    ax.fill_between(t, peaks[:, 0], peaks[:, 1], color=WAVE_COLOR, linewidth=0, step="post")
    ax.set_xlim(0, max(duration_s, 1e-9))
    ax.set_ylim(-1.0, 1.0)
    ax.set_yticks([-1, 0, 1])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("seconds", fontsize=7, labelpad=1)
    if title:
        ax.set_title(title, fontsize=8, loc="left")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png(fig)


def cost_over_time_png(times: Sequence[float], costs: Sequence[float], gpu_seconds: Sequence[float]) -> bytes:
    """Cumulative US$ and GPU hours against the time each stem set was made (epoch seconds)."""
    from matplotlib.figure import Figure  # lazy: matplotlib costs start-up time

    order = np.argsort(np.asarray(times, dtype=float))
    when = [dt.datetime.fromtimestamp(float(times[i]), tz=dt.timezone.utc) for i in order]
    cum_cost = np.cumsum(np.asarray(costs, dtype=float)[order]) if len(order) else np.array([])
    cum_hours = np.cumsum(np.asarray(gpu_seconds, dtype=float)[order]) / 3600.0 if len(order) else np.array([])
    fig = Figure(figsize=(8, 2.6))
    ax = fig.add_axes((0.08, 0.2, 0.82, 0.68))
    ax.step(when, cum_cost, where="post", color="#c0392b", label="US$ (cumulative)")
    ax.set_ylabel("US$", fontsize=8, color="#c0392b")
    ax.tick_params(labelsize=7)
    ax2 = ax.twinx()
    ax2.step(when, cum_hours, where="post", color=WAVE_COLOR, label="GPU/CPU hours (cumulative)")
    ax2.set_ylabel("hours", fontsize=8, color=WAVE_COLOR)
    ax2.tick_params(labelsize=7)
    ax.set_title("Separation cost over time", fontsize=9, loc="left")
    fig.autofmt_xdate()
    return _png(fig)


def inline_markdown_image(png: bytes, alt: str) -> str:
    """Markdown that shows ``png`` inline (a data URI), for MetadataValue.md."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
