"""Channel layouts and the downmix to the engine's one or two channels (ITU-R BS.775 style)."""

from __future__ import annotations

import math

import numpy as np

from .info import CHANNELS

_H = 1.0 / math.sqrt(2.0)
# FFmpeg channel names -> (gain into left, gain into right), ITU-R BS.775 style.
CHANNEL_GAINS: dict[str, tuple[float, float]] = {
    **{n: (1.0, 0.0) for n in ("FL", "FLC", "WL", "DL", "BFL")},
    **{n: (0.0, 1.0) for n in ("FR", "FRC", "WR", "DR", "BFR")},
    **{n: (_H, _H) for n in ("FC", "BC", "TC", "TFC", "TBC", "BFC")},
    **{n: (_H, 0.0) for n in ("BL", "SL", "TFL", "TBL", "TSL", "SDL")},
    **{n: (0.0, _H) for n in ("BR", "SR", "TFR", "TBR", "TSR", "SDR")},
    **{n: (0.0, 0.0) for n in ("LFE", "LFE2")},
}
# WAVE_FORMAT_EXTENSIBLE dwChannelMask bits, in order.
WAV_MASK_NAMES = (
    "FL", "FR", "FC", "LFE", "BL", "BR", "FLC", "FRC", "BC",
    "SL", "SR", "TC", "TFL", "TFC", "TFR", "TBL", "TBC", "TBR",
)  # fmt: skip
# Channel orders fixed by the FLAC and Vorbis specifications (libsndfile does not reorder).
FLAC_ORDER = {
    3: ("FL", "FR", "FC"),
    4: ("FL", "FR", "BL", "BR"),
    5: ("FL", "FR", "FC", "BL", "BR"),
    6: ("FL", "FR", "FC", "LFE", "BL", "BR"),
    7: ("FL", "FR", "FC", "LFE", "BC", "SL", "SR"),
    8: ("FL", "FR", "FC", "LFE", "BL", "BR", "SL", "SR"),
}
VORBIS_ORDER = {
    3: ("FL", "FC", "FR"),
    4: ("FL", "FR", "BL", "BR"),
    5: ("FL", "FC", "FR", "BL", "BR"),
    6: ("FL", "FC", "FR", "BL", "BR", "LFE"),
    7: ("FL", "FC", "FR", "SL", "SR", "BC", "LFE"),
    8: ("FL", "FC", "FR", "SL", "SR", "BL", "BR", "LFE"),
}


def downmix_matrix(channels: int, layout: tuple[str, ...] | None, target: int = CHANNELS) -> np.ndarray | None:
    """The ``(target, channels)`` mixing matrix, or None when no mixing is needed.

    * mono -> stereo: the channel is duplicated; stereo -> mono: the mean of L and R.
    * more than two channels with a known layout (WAVEX channel mask, FLAC/Vorbis order,
      FFmpeg layout): ITU-R BS.775-style. Front L/R go to their side at 1.0, centre channels
      to both sides at 0.707, surround/back/top channels to their side at 0.707, LFE is
      dropped. Each output row is then scaled so its gains sum to 1, so the downmix can never
      clip (a 5.1 file gets L = (FL + 0.707 FC + 0.707 BL) / 2.414).
    * more than two channels without a layout (e.g. a multitrack recorder's plain WAV, whose
      channels are independent microphones): even-indexed channels (1st, 3rd, ...) are
      averaged into L and odd-indexed into R, so every track is kept.
    * to mono from more than two channels: the mean of the stereo downmix's two rows.
    """
    if target not in (1, 2):
        raise ValueError(f"target channels must be 1 or 2, got {target}")
    if channels == target:
        return None
    if channels == 1:
        return np.ones((target, 1), np.float32)
    if channels == 2:
        stereo = np.eye(2, dtype=np.float64)
    else:
        stereo = np.zeros((2, channels), np.float64)
        if layout is not None and len(layout) == channels and all(n in CHANNEL_GAINS for n in layout):
            for i, name in enumerate(layout):
                stereo[:, i] = CHANNEL_GAINS[name]
        if not (stereo.sum(axis=1) > 0).all():  # unknown layout (or one with no L/R content)
            stereo[:] = 0.0
            stereo[0, 0::2] = 1.0
            stereo[1, 1::2] = 1.0
        stereo /= stereo.sum(axis=1, keepdims=True)
    if target == 1:
        return stereo.mean(axis=0, keepdims=True).astype(np.float32)
    return stereo.astype(np.float32)
