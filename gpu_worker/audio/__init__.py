"""Audio I/O for the engine: probe, streaming decode and encode, measurements.

Everything here works on float32 arrays shaped ``(channels, frames)``.

Decoding
    Two readers, chosen by what can open the file (one code path per family):

    * **libsndfile** (``soundfile``) for what it reads natively: WAV/WAVEX/RF64/W64, AIFF,
      CAF, FLAC, Ogg Vorbis and MP3 (with LAME/Xing gapless trimming).
    * **FFmpeg** (``av``) for everything else: Ogg Opus, MP4/M4A (AAC, ALAC), WebM/Matroska,
      ADTS AAC, ... and anything libsndfile refuses.

    Source blocks are downmixed to the target channel count first (see
    :func:`~.channels.downmix_matrix`), then resampled with ``soxr.ResampleStream`` (quality ``HQ``).
    :func:`iter_decode` streams in bounded memory; :func:`decode_audio` is built on the same
    generator, so both give identical samples. The output length is exact:
    ``resampled_length(frames, source_rate, target_rate) == round(frames * target / source)``
    where ``frames`` is the exact number of frames in the source (what :func:`probe_audio`
    reports). libsndfile reports exact counts for PCM, FLAC and Ogg Vorbis from the header;
    for MP3 and the FFmpeg family :func:`probe_audio` decodes the file once to count them,
    because container durations there are estimates (WebM stores milliseconds, ADTS has none).

Bad input raises :class:`~gpu_worker.errors.AudioError` naming the file:
    missing or empty files, non-audio files, zero audio frames, more than
    ``MAX_CHANNELS`` channels, NaN/Inf samples, and truncated *compressed* files (FLAC that
    loses sync, MP3 shorter than its Xing header says, Ogg whose last page is cut off, MP4 or
    WebM shorter than their declared duration, decoder errors). A PCM WAV cut mid-stream
    decodes the intact part and emits an :class:`AudioWarning` saying how much is missing;
    an Ogg file that ends on a page boundary without an end-of-stream flag decodes with a
    warning too.

Modules, by idea (import the one you need; this package re-exports nothing):

* :mod:`.info`: the sample format (``SAMPLE_RATE``, ``CHANNELS``), limits, ``AudioInfo``, ``AudioWarning``;
* :mod:`.source`: opening a file (which reader, what the header claims, bad-input checks);
* :mod:`.decode`: ``probe_audio``, ``decode_audio``, ``iter_decode``;
* :mod:`.channels` and :mod:`.resample`: downmix and sample-rate conversion;
* :mod:`.encode`: ``StemWriter`` and ``encode_audio`` (wav, flac, opus, m4a);
* :mod:`.analyse`: loudness, peaks and waveform overviews.
"""
