"""Synthetic audio for tests: tones, a deterministic music-like mix, and a writer for many formats.

Arrays are float32 shaped ``(channels, frames)``, like ``gpu_worker.audio``. The writer uses
soundfile and PyAV directly (not the code under test), so fixtures are independent of it.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf

# extension/format -> (soundfile format, default subtype)
_SNDFILE = {
    "wav": ("WAV", "PCM_16"),
    "wavex": ("WAVEX", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "aiff": ("AIFF", "PCM_16"),
}
# format -> (FFmpeg muxer, encoder, muxer options)
_FFMPEG = {
    "opus": ("ogg", "libopus", {}),
    "m4a": ("ipod", "aac", {"movflags": "+faststart"}),
    "m4a-moov-at-end": ("ipod", "aac", {}),
    "webm": ("webm", "libopus", {}),
}
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def tone(freq: float, seconds: float, sr: int = 44100, channels: int = 2, amp: float = 0.5) -> np.ndarray:
    """A sine of ``freq`` Hz on every channel, ``(channels, round(seconds * sr))`` float32."""
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[None, :], channels, axis=0)


def music_like(seconds: float, sr: int = 44100, channels: int = 2, seed: int = 0) -> np.ndarray:
    """A deterministic band-ish mix: bass line, an A-major chord pad, kick and hi-hat bursts.

    Stereo puts the chord slightly left and the hats slightly right; extra channels get
    scaled, delayed copies. Peak is normalised to 0.8.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    beat = 0.5  # 120 bpm
    # bass: root notes A1/D2/E2 alternating per bar, with a second harmonic
    bar = (t // (4 * beat)).astype(int) % 3
    f_bass = np.array([55.0, 73.42, 82.41])[bar]
    phase = 2 * np.pi * np.cumsum(f_bass) / sr
    bass = 0.35 * np.sin(phase) + 0.1 * np.sin(2 * phase)
    # chord pad: A3 C#4 E4 with a slow swell
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63)) * 0.12
    chord *= 0.6 + 0.4 * np.sin(2 * np.pi * 0.25 * t) ** 2
    # kick on every beat: a decaying 60 Hz thump
    since_beat = t % beat
    kick = 0.6 * np.sin(2 * np.pi * 60 * since_beat) * np.exp(-since_beat * 25)
    # hats on eighth notes: short noise bursts with a crude high-pass
    noise = rng.standard_normal(n)
    noise = np.diff(noise, prepend=0.0)
    since_eighth = t % (beat / 2)
    hats = 0.08 * noise * np.exp(-since_eighth * 120)
    left = bass + 1.2 * chord + kick + 0.8 * hats
    right = bass + 0.8 * chord + kick + 1.2 * hats
    outs = [0.5 * (left + right)] if channels == 1 else [left, right]
    for k in range(2, channels):
        outs.append(np.roll(left if k % 2 == 0 else right, 37 * k) * (0.7 - 0.05 * k))
    x = np.stack(outs[:channels])
    peak = np.max(np.abs(x)) or 1.0
    return (0.8 * x / peak).astype(np.float32)


def write_audio(
    path, wav: np.ndarray, sr: int, fmt: str | None = None, subtype: str | None = None, bitrate_kbps: int = 160
) -> Path:
    """Write ``(channels, n)`` ``wav`` at ``sr`` to ``path``; ``fmt`` defaults to the extension.

    soundfile formats: wav, wavex, flac, ogg (Vorbis), mp3, aiff (``subtype`` as in soundfile,
    e.g. "PCM_24", "FLOAT"). PyAV formats: opus (Ogg Opus; sr must be 8/12/16/24/48 kHz),
    m4a (AAC in MP4 with the moov atom first), m4a-moov-at-end, webm (Opus; 48 kHz).
    """
    path = Path(path)
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 1:
        wav = wav[None, :]
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt in _SNDFILE:
        sf_format, default_subtype = _SNDFILE[fmt]
        sf.write(str(path), wav.T, sr, format=sf_format, subtype=subtype or default_subtype)
        return path
    if fmt not in _FFMPEG:
        raise ValueError(f"write_audio: unknown format {fmt!r}")
    muxer, codec, options = _FFMPEG[fmt]
    channels = wav.shape[0]
    layout = _LAYOUTS[channels]
    options = dict(options)
    if muxer == "ipod":
        options["movie_timescale"] = str(sr)  # exact length in the edit list
    with av.open(str(path), "w", format=muxer, options=options) as container:
        stream = container.add_stream(codec, rate=sr, layout=layout)
        stream.bit_rate = bitrate_kbps * 1000 * max(1, channels // 2)
        step = 8192
        for i in range(0, wav.shape[1], step):
            block = np.ascontiguousarray(wav[:, i : i + step])
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
            frame.sample_rate = sr
            frame.time_base = Fraction(1, sr)
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def amp_at(x: np.ndarray, freq: float, sr: int) -> float:
    """Amplitude of the ``freq`` Hz component of a 1-D signal holding whole cycles of it."""
    t = np.arange(x.shape[-1]) / sr
    return float(2 * abs(np.dot(x.astype(np.float64), np.exp(-2j * np.pi * freq * t))) / x.shape[-1])


def peak_freq(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.shape[-1])))
    return float(np.argmax(spec) * sr / x.shape[-1])


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    err = test.astype(np.float64) - ref
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum(err**2)))
