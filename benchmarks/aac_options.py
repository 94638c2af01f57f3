"""CPU time and a quality proxy of FFmpeg's AAC encoder options, per 60 s stereo stem.

    python benchmarks/aac_options.py --json            # all variants, 60 s signals
    python benchmarks/aac_options.py --seconds 20 --variants twoloop,fast

Each variant encodes every test signal the way the worker writes m4a (PyAV, ipod muxer,
``movie_timescale`` = the rate), single thread, timed with ``time.process_time()``; the file is
decoded back with the worker's reader (which trims the AAC padding to the exact length) and
compared with the source:

* ``snr_db``: waveform signal-to-error ratio. Not perceptual: a coder that moves noise under the
  masking threshold can score lower and sound the same.
* Band figures: source, decoded file and error cut into 2048-sample Hann frames (hop 1024),
  the spectra summed into 1/3-octave bands from 63 Hz to 16 kHz; frame-bands averaged with
  weights 1.0 for 1-8 kHz, 0.5 for 250 Hz-1 kHz and 8-12.5 kHz, 0.25 elsewhere.
  ``band_nsr_db``: error energy relative to the signal in the same band (bands above -90 dB).
  ``nmr_db``: error energy relative to a mask: the signal spread over the bands around it
  (-27 dB per band downwards, -12 dB upwards) minus 13 dB. ``over_mask``: the fraction of
  frame-bands whose error exceeds that mask, i.e. where coding noise may be audible.
  ``level_err_db``: mean absolute difference of decoded and source band levels (what noise
  substitution preserves while the waveform figures count it as error). Lower is better for all.

Signals (``--seconds`` each, stereo, 44.1 kHz): ``music`` (tests/audio_fixtures.music_like: bass,
chord pad, kick and hats), ``drums`` (benchmarks/common.synthetic_mix: noise-burst drums over bass
and chord), ``tones`` (sustained partials with vibrato, the hardest case for quantisation noise),
``pink`` (pink noise, slowly modulated).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_worker.audio.decode import decode_audio  # noqa: E402
from gpu_worker.audio.encode import _FFmpegSink  # noqa: E402 - the worker's own m4a sink

SR = 44100
# name -> (FFmpeg encoder options, kbit/s)
VARIANTS: dict[str, tuple[dict[str, str], int]] = {
    "twoloop": ({"aac_coder": "twoloop"}, 192),
    "fast": ({"aac_coder": "fast"}, 192),
    "fast_224k": ({"aac_coder": "fast"}, 224),
    "fast_256k": ({"aac_coder": "fast"}, 256),
    "twoloop_160k": ({"aac_coder": "twoloop"}, 160),
    "twoloop_128k": ({"aac_coder": "twoloop"}, 128),
    "twoloop_no_is": ({"aac_coder": "twoloop", "aac_is": "0"}, 192),
    "twoloop_no_pns": ({"aac_coder": "twoloop", "aac_pns": "0"}, 192),
    "twoloop_no_tns": ({"aac_coder": "twoloop", "aac_tns": "0"}, 192),
    "twoloop_no_ms": ({"aac_coder": "twoloop", "aac_ms": "0"}, 192),
    "fast_no_pns": ({"aac_coder": "fast", "aac_pns": "0"}, 192),
    "fast_no_tns": ({"aac_coder": "fast", "aac_tns": "0"}, 192),
    "twoloop_ltp": ({"aac_coder": "twoloop", "profile": "aac_ltp", "aac_ltp": "1"}, 192),
    "twoloop_main_pred": ({"aac_coder": "twoloop", "profile": "aac_main", "aac_pred": "1"}, 192),
}


def signals(seconds: float) -> dict[str, np.ndarray]:
    from benchmarks.common import synthetic_mix
    from tests.audio_fixtures import music_like

    n = int(seconds * SR)
    t = np.arange(n) / SR
    rng = np.random.default_rng(0)
    vib = 1 + 0.004 * np.sin(2 * np.pi * 5.5 * t)
    tones = sum(
        a * np.sin(2 * np.pi * f * np.cumsum(vib) / SR)
        for f, a in ((440, 0.2), (880, 0.1), (1320, 0.06), (2640, 0.03), (5280, 0.01))
    )
    tones = tones * (0.5 + 0.5 * np.sin(2 * np.pi * 0.2 * t) ** 2)
    white = rng.standard_normal((2, n))
    spec = np.fft.rfft(white, axis=1)
    spec /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / SR), 20.0))  # 1/f power
    pink = np.fft.irfft(spec, n, axis=1)
    pink *= 0.1 / pink.std() * (0.6 + 0.4 * np.sin(2 * np.pi * 0.1 * t))
    return {
        "music": music_like(seconds, seed=0).astype(np.float32),
        "drums": (synthetic_mix(seconds, seed=1).numpy() * 0.8).astype(np.float32),
        "tones": np.stack([tones, 0.8 * tones]).astype(np.float32),
        "pink": pink.astype(np.float32),
    }


def stem_signals(seconds: float) -> dict[str, np.ndarray]:
    """Four stem-like signals, what a separated song gives the encoder: ``bass`` (a saw-like line,
    eight harmonics), ``drums`` (kick sweep, snare and hi-hat noise bursts), ``vocals`` (a sung
    melody: 30 harmonics with vibrato through three formants, breath noise, phrase gaps), ``other``
    (a chord pad of saw-like notes). Each has a -60 dB noise floor, as separation leaves."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    rng = np.random.default_rng(1)
    beat = (t % 0.5) / 0.5  # 120 bpm, position within the beat
    step = (t // 0.5).astype(int)

    def harmonic(f0: np.ndarray, count: int, amp=lambda k, f: 1.0 / k) -> np.ndarray:
        phase = 2 * np.pi * np.cumsum(f0) / SR
        return sum(amp(k, k * f0) * np.sin(k * phase) * (k * f0 < SR / 2) for k in range(1, count + 1))

    bass = 0.25 * harmonic(np.array([55.0, 73.42, 82.41, 61.74])[step // 4 % 4], 8) * np.exp(-2.5 * beat)
    kick = np.sin(2 * np.pi * np.cumsum(50 + 70 * np.exp(-30 * beat)) / SR) * np.exp(-12 * beat)
    noise = rng.standard_normal(n)
    snare = np.diff(noise, prepend=0) * np.exp(-18 * beat) * (step % 2 == 1)
    hat = np.diff(np.diff(noise[::-1], prepend=0), prepend=0) * np.exp(-60 * ((t % 0.25) / 0.25))
    drums = 0.5 * kick + 0.25 * snare + 0.08 * hat
    f0 = np.array([220.0, 246.94, 261.63, 293.66, 329.63, 293.66, 261.63, 246.94])[step % 8]
    f0 = f0 * (1 + 0.006 * np.sin(2 * np.pi * 5.5 * t))

    def formants(k, f):
        return sum(
            g * np.exp(-(((f - c) / w) ** 2)) for c, w, g in ((700, 150, 1.0), (1200, 200, 0.6), (2600, 300, 0.3))
        )

    sung = harmonic(f0, 30, formants) * ((t % 4) < 3.2)  # a breath every four seconds
    vocals = 0.3 * sung / (np.abs(sung).max() + 1e-9) + 0.003 * noise * ((t % 4) >= 3.2)
    pad = sum(harmonic(np.full(n, f * d), 10) for f in (220.0, 277.18, 329.63) for d in (0.997, 1.003))
    other = 0.4 * pad / np.abs(pad).max() * (0.6 + 0.4 * np.sin(2 * np.pi * 0.25 * t) ** 2)
    out = {}
    for name, mono in (("bass", bass), ("drums", drums), ("vocals", vocals), ("other", other)):
        floor = 1e-3 * rng.standard_normal((2, n))
        out[name] = (np.stack([mono, 0.95 * np.roll(mono, 7)]) + floor).astype(np.float32)
    return out


def encode(x: np.ndarray, path: Path, options: dict[str, str], kbps: int) -> float:
    """Process CPU seconds to encode ``x`` the way the worker does (30 s blocks)."""
    t0 = time.process_time()
    sink = _FFmpegSink(path, "m4a", kbps, SR, x.shape[0], options)
    for i in range(0, x.shape[1], SR * 30):
        sink.write(np.ascontiguousarray(x[:, i : i + SR * 30].T))
    sink.close()
    return time.process_time() - t0


def _bands() -> tuple[np.ndarray, np.ndarray]:
    """Bin -> band index (-1: outside), and each band's weight."""
    freqs = np.fft.rfftfreq(2048, 1 / SR)
    centres = 1000 * 2.0 ** (np.arange(-12, 13) / 3)  # 63 Hz .. 16 kHz
    index = np.full(freqs.shape, -1)
    for b, fc in enumerate(centres):
        index[(freqs >= fc * 2 ** (-1 / 6)) & (freqs < fc * 2 ** (1 / 6))] = b
    weight = np.where((centres >= 1000) & (centres <= 8000), 1.0, 0.25)
    weight[((centres >= 250) & (centres < 1000)) | ((centres > 8000) & (centres <= 12500))] = 0.5
    return index, weight


def band_energy(x: np.ndarray, index: np.ndarray, nbands: int) -> np.ndarray:
    """(channels * frames, bands) energy of 2048-sample Hann frames, hop 1024, full-scale sine = 0 dB."""
    win = np.hanning(2048)
    frames = np.lib.stride_tricks.sliding_window_view(x, 2048, axis=-1)[:, ::1024]
    spec = np.abs(np.fft.rfft(frames * win, axis=-1)) ** 2 / (win.sum() / 2) ** 2
    spec = spec.reshape(-1, spec.shape[-1])
    out = np.zeros((spec.shape[0], nbands))
    for b in range(nbands):
        out[:, b] = spec[:, index == b].sum(axis=1)
    return out


def _spread(nbands: int) -> np.ndarray:
    """``[maskee, masker]`` power gain of a simple spreading function over 1/3-octave bands (about
    one critical band each above 500 Hz): -27 dB per band below a masker, -12 dB per band above
    it (masking spreads upwards), and the ~13 dB a masker's own band lets noise sit below it."""
    i, j = np.meshgrid(np.arange(nbands), np.arange(nbands), indexing="ij")
    att_db = np.where(i < j, 27.0 * (j - i), 12.0 * (i - j)) + 13.0
    return 10 ** (-att_db / 10)


def quality(src: np.ndarray, dec: np.ndarray) -> dict:
    src = src.astype(np.float64)
    err = dec.astype(np.float64) - src
    snr = 10 * np.log10(np.sum(src**2) / max(np.sum(err**2), 1e-30))
    index, weight = _bands()
    s = band_energy(src, index, len(weight))
    e = band_energy(err, index, len(weight))
    d = band_energy(dec.astype(np.float64), index, len(weight))
    mask = s @ _spread(len(weight)).T  # (frames, bands): what the signal around each band masks
    w = np.broadcast_to(weight, s.shape)
    active = s > 1e-9  # the band carries signal (above -90 dB)
    audible = mask > 1e-9
    nsr = 10 * np.log10(np.maximum(e[active], 1e-30) / s[active])
    nmr = 10 * np.log10(np.maximum(e[audible], 1e-30) / mask[audible])
    level = np.abs(10 * np.log10(np.maximum(d[active], 1e-30) / s[active]))

    def mean(x, where):
        return float(np.sum(w[where] * x) / np.sum(w[where]))

    return {
        "snr_db": round(float(snr), 2),
        "band_nsr_db": round(mean(nsr, active), 2),
        "nmr_db": round(mean(nmr, audible), 2),
        "over_mask": round(mean(nmr > 0, audible), 4),
        "level_err_db": round(mean(level, active), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    ap.add_argument("--repeat", type=int, default=2, help="encodes per signal; the least CPU time counts")
    ap.add_argument(
        "--signals", choices=["test", "stems"], default="test", help="the test signals, or four stem-like ones"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sigs = signals(args.seconds) if args.signals == "test" else stem_signals(args.seconds)
    tmp = Path(tempfile.mkdtemp(prefix="aac-bench-"))
    encode(
        next(iter(sigs.values()))[:, : SR * 2], tmp / "warm.m4a", {}, 192
    )  # the encoder's tables built off the clock
    rows = []
    for name in args.variants.split(","):
        options, kbps = VARIANTS[name]
        row: dict = {"variant": name, "options": options, "target_kbps": kbps, "signals": {}}
        cpu = 0.0
        for sig, x in sigs.items():
            path = tmp / f"{name}-{sig}.m4a"
            try:
                cpu_s = min(encode(x, path, options, kbps) for _ in range(args.repeat))
            except Exception as err:  # noqa: BLE001 - an option this FFmpeg lacks: say so, go on
                row["error"] = f"{type(err).__name__}: {err}"
                break
            cpu += cpu_s
            dec, _ = decode_audio(path)
            assert dec.shape == x.shape, (dec.shape, x.shape)
            row["signals"][sig] = {"cpu_s": round(cpu_s, 3), "bytes": path.stat().st_size, **quality(x, dec)}
            path.unlink()
        if "error" not in row:
            per = [row["signals"][s] for s in sigs]
            row["cpu_s_per_60s_stem"] = round(cpu / len(sigs) * 60 / args.seconds, 3)
            row["x_realtime_per_core"] = round(args.seconds * len(sigs) / cpu, 1)
            row["kbps"] = round(sum(p["bytes"] for p in per) * 8 / len(per) / args.seconds / 1000, 1)
            for k in ("snr_db", "band_nsr_db", "nmr_db", "over_mask", "level_err_db"):
                row[k] = round(float(np.mean([p[k] for p in per])), 4 if k == "over_mask" else 3)
        rows.append(row)
        if not args.json:
            print(json.dumps({k: v for k, v in row.items() if k != "signals"}), flush=True)
    result = {
        "benchmark": "aac_options",
        "seconds": args.seconds,
        "signal_set": args.signals,
        "signals": list(sigs),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
