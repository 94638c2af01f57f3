"""gpu_worker.audio: bad input (not audio, empty, truncated, too many channels, NaN) gets an
AudioError that names the file.

All fixtures are synthesised here and written to tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import soundfile as sf

from gpu_worker.audio.decode import decode_audio, iter_decode, probe_audio
from gpu_worker.audio.info import SAMPLE_RATE, AudioWarning
from gpu_worker.errors import AudioError

try:
    from tests.audio_fixtures import music_like, tone, write_audio
except ImportError:  # tests/ is on sys.path instead of the repo root
    from audio_fixtures import music_like, tone, write_audio

# A healthy file must decode without AudioWarning; tests that expect one use pytest.warns.
pytestmark = pytest.mark.filterwarnings("error::gpu_worker.audio.info.AudioWarning")

SR = SAMPLE_RATE


# --------------------------------------------------------------------------------------
# Bad input: AudioError naming the file
# --------------------------------------------------------------------------------------


def _png_bytes() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(8) for _ in range(8))
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _assert_rejected(path, *fragments):
    for call in (lambda: decode_audio(path), lambda: list(iter_decode(path))):
        with pytest.raises(AudioError) as err:
            call()
        msg = str(err.value)
        assert path.name in msg
        for fragment in fragments:
            assert fragment in msg, msg
    return msg


def test_rejects_text_renamed_wav(tmp_path):
    path = tmp_path / "notes_text.wav"
    path.write_text("setlist: intro, verse, chorus\n" * 50)
    _assert_rejected(path, "not an audio file", "text file")
    with pytest.raises(AudioError, match="notes_text.wav"):
        probe_audio(path)


def test_rejects_png_renamed_wav(tmp_path):
    path = tmp_path / "cover_art.wav"
    path.write_bytes(_png_bytes())
    _assert_rejected(path, "PNG image")


def test_rejects_random_bytes_mp3(tmp_path):
    path = tmp_path / "noise_bytes.mp3"
    path.write_bytes(np.random.default_rng(0).bytes(50000))
    _assert_rejected(path, "not an audio file")


def test_rejects_empty_missing_and_folder(tmp_path):
    empty = tmp_path / "empty_take.wav"
    empty.write_bytes(b"")
    _assert_rejected(empty, "empty (0 bytes)")
    _assert_rejected(tmp_path / "never_uploaded.flac", "does not exist")
    folder = tmp_path / "a_folder.wav"
    folder.mkdir()
    _assert_rejected(folder, "not a regular file")


def test_rejects_zero_frames(tmp_path):
    wav = tmp_path / "silent_header.wav"
    sf.write(str(wav), np.zeros((0, 2), np.float32), 44100)
    _assert_rejected(wav, "0 frames")
    with pytest.raises(AudioError, match="silent_header.wav"):
        probe_audio(wav)
    flac = tmp_path / "zero_frames.flac"  # FFmpeg writes a FLAC header with no frames
    with av.open(str(flac), "w", format="flac") as c:
        s = c.add_stream("flac", rate=44100, layout="stereo")
        for packet in s.encode(None):
            c.mux(packet)
    _assert_rejected(flac, "0 frames")


def test_rejects_too_many_channels(tmp_path):
    path = tmp_path / "forty_ch.wav"
    sf.write(str(path), np.zeros((100, 40), np.float32), 44100)
    _assert_rejected(path, "40 audio channels")


def test_rejects_nan_in_float_wav(tmp_path):
    x = tone(440, 2.0, sr=48000)
    x[0, 24000] = np.nan
    x[1, 72000:72003] = -np.inf
    path = tmp_path / "broken_render.wav"
    write_audio(path, x, 48000, "wav", "FLOAT")
    msg = _assert_rejected(path, "4 non-finite", "0.500 s", "1.500 s")
    assert "NaN" in msg
    info = probe_audio(path)  # the header is fine; only decoding sees the samples
    assert info.frames == x.shape[1]


def _truncate(path, keep=0.6):
    data = path.read_bytes()
    cut = path.with_name("cut_" + path.name)
    cut.write_bytes(data[: int(len(data) * keep) + 3])
    return cut


@pytest.mark.parametrize("fmt", ["flac", "mp3", "ogg", "opus", "m4a", "m4a-moov-at-end", "webm"])
def test_rejects_truncated_compressed_files(tmp_path, fmt):
    sr = 48000 if fmt in ("opus", "webm") else 44100
    ext = "m4a" if fmt.startswith("m4a") else fmt
    full = write_audio(tmp_path / f"take.{ext}", music_like(3.0, sr), sr, fmt)
    assert decode_audio(full)[0].shape[1] == 3 * SR  # the complete file is fine
    cut = _truncate(full)
    msg = _assert_rejected(cut, "truncated")
    assert "upload" in msg  # says how to fix it


def test_truncated_wav_decodes_intact_part_with_warning_when_accepted(tmp_path, monkeypatch):
    x = music_like(2.0)
    full = write_audio(tmp_path / "take.wav", x, SR, "wav", "PCM_16")
    cut = _truncate(full, keep=0.5)
    _assert_rejected(cut, "truncated", "50.0%")  # by default a WAV cut in half is an error (issue 14)
    monkeypatch.setenv("STEMSET_MIN_DECODED_FRACTION", "0")  # accepted knowingly
    present = (cut.stat().st_size - 44) // 4  # 44-byte header, 4 bytes per stereo 16-bit frame
    with pytest.warns(AudioWarning, match="cut_take.wav.*truncated"):
        wav, info = decode_audio(cut)
    assert info.frames == present and wav.shape == (2, present)
    np.testing.assert_allclose(wav, x[:, :present], atol=1 / 32768)


def test_ogg_ending_on_a_page_boundary_decodes_with_warning(tmp_path):
    full = write_audio(tmp_path / "take.ogg", music_like(3.0), SR, "ogg")
    data = full.read_bytes()
    cut = tmp_path / "page_cut.ogg"
    cut.write_bytes(data[: data.rfind(b"OggS")])  # drop the final (end-of-stream) page
    with pytest.warns(AudioWarning, match="page_cut.ogg.*end-of-stream"):
        wav, info = decode_audio(cut)
    assert 0 < wav.shape[1] < 3 * SR
