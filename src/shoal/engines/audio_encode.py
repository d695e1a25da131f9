"""int16 mono PCM → the bytes of a speech response format, incrementally, so a response can stream.

    encoder = AudioEncoder("mp3", 22050)
    for pcm in chunks:
        send(encoder.feed(pcm))       # may be b"" while an encoder buffers a frame
    send(encoder.finish())

"wav" streams with the unknown-size convention (0xFFFFFFFF in the RIFF and data sizes, which ffmpeg,
browsers and Python's wave module read to the end of the data); `encode_whole` writes the real sizes.
"pcm" is the raw samples. "mp3", "flac", "opus" (Ogg Opus, at 48 kHz as Opus requires) and "aac"
(ADTS) go through PyAV (FFmpeg), imported only when one of them is asked for.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from typing import Any

from shoal.errors import InvalidRequest

MEDIA_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}
FORMATS: tuple[str, ...] = tuple(MEDIA_TYPES)

# format → (FFmpeg muxer, encoder, the encoder's sample format, fixed output rate or None, muxer options)
_CODECS: dict[str, tuple[str, str, str, int | None, dict[str, str]]] = {
    "mp3": ("mp3", "libmp3lame", "s16p", None, {}),
    "flac": ("flac", "flac", "s16", None, {}),
    # 100 ms Ogg pages: at most that much audio waits for the next sentence (the default is 1 s)
    "opus": ("ogg", "libopus", "s16", 48000, {"page_duration": "100000"}),
    "aac": ("adts", "aac", "fltp", None, {}),
}
_UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(
    sample_rate: int, data_bytes: int | None = None, channels: int = 1, sample_width: int = 2
) -> bytes:
    """A 44-byte PCM WAV header; data_bytes None writes the unknown-size (streaming) convention."""
    block_align = channels * sample_width
    if data_bytes is None:
        riff_size = data_size = _UNKNOWN_SIZE
    else:
        data_size = data_bytes
        riff_size = min(36 + data_bytes, _UNKNOWN_SIZE)
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack(
            "<IHHIIHH",
            16,
            1,  # PCM
            channels,
            sample_rate,
            sample_rate * block_align,
            block_align,
            sample_width * 8,
        )
        + b"data"
        + struct.pack("<I", min(data_size, _UNKNOWN_SIZE))
    )


class _StreamSink:
    """A write-only, unseekable file for FFmpeg: muxers then write everything in order (no seeking back
    to patch a header), and what has been written so far can be handed out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class AudioEncoder:
    """Encodes int16 little-endian mono PCM at sample_rate into format, chunk by chunk.

    rate: resample the output to this rate (e.g. 24000 for OpenAI's "pcm", which clients assume is
    24 kHz); None keeps sample_rate (Opus is always 48 kHz)."""

    def __init__(
        self, format: str, sample_rate: int, rate: int | None = None, *, _whole: bool = False
    ) -> None:
        """_whole (encode_whole's, PyAV formats): write to a seekable buffer, return it all at finish."""
        if format not in MEDIA_TYPES:
            raise InvalidRequest(f"unknown response_format {format!r}; supported: {', '.join(FORMATS)}")
        if sample_rate <= 0 or (rate is not None and rate <= 0):
            raise ValueError("sample rates must be positive")
        self.format = format
        self.media_type = MEDIA_TYPES[format]
        self.sample_rate = sample_rate
        self._whole = _whole
        self._odd = b""  # a trailing half sample, kept for the next feed
        self._header_sent = False
        self._finished = False
        self._in_samples = 0
        self._out_samples = 0
        self._container: Any = None
        self._stream: Any = None
        self._resampler: Any = None
        self._sink: Any = None
        self.output_rate = rate or sample_rate
        if format in _CODECS:
            self._open_av(rate)
        elif self.output_rate != sample_rate:
            import av

            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.output_rate)

    def _open_av(self, rate: int | None) -> None:
        import av

        muxer, codec, sample_format, fixed_rate, options = _CODECS[self.format]
        self.output_rate = fixed_rate or rate or self.sample_rate
        # whole files go to a seekable buffer so muxers can patch their headers (FLAC's STREAMINFO
        # sample count and MD5, MP3's Xing frame); streams go to a sink that cannot seek
        self._sink = io.BytesIO() if self._whole else _StreamSink()
        container_options = {} if self._whole else {"flush_packets": "1"}
        self._container = av.open(
            self._sink, mode="w", format=muxer, options=dict(options), container_options=container_options
        )
        try:
            self._stream = self._container.add_stream(codec, rate=self.output_rate, layout="mono")
            self._container.start_encoding()  # opens the encoder: its frame size is known from here
            frame_size = self._stream.codec_context.frame_size or None
            self._resampler = av.AudioResampler(
                format=sample_format, layout="mono", rate=self.output_rate, frame_size=frame_size
            )
        except Exception:
            self._container.close()
            raise

    # ---- public ---------------------------------------------------------------------------------

    def feed(self, pcm: bytes) -> bytes:
        """Encode more samples; returns the bytes ready to send (possibly b"")."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        data = self._odd + bytes(pcm)
        cut = len(data) - len(data) % 2
        data, self._odd = data[:cut], data[cut:]
        if self._container is not None:
            if data:
                self._encode(self._frames(data))
            return self._take()
        out = self._header()
        if data:
            out += self._raw(self._frames(data)) if self._resampler is not None else data
        return out

    def finish(self) -> bytes:
        """Flush the encoder and the container; returns the last bytes (for encode_whole: all of them)."""
        if self._finished:
            return b""
        self._finished = True
        if self._container is not None:
            self._encode(self._resampler.resample(None))
            self._encode([None])
            self._container.close()
            if self._whole:
                return bytes(self._sink.getvalue())
            return self._take()
        out = self._header()
        if self._resampler is not None:
            out += self._raw(self._resampler.resample(None))
        return out

    # ---- internals ------------------------------------------------------------------------------

    def _frames(self, data: bytes) -> list[Any]:
        """PCM bytes → resampled frames in the encoder's format, rate and frame size."""
        import av
        import numpy as np

        samples = np.frombuffer(data, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.time_base = Fraction(1, self.sample_rate)
        frame.pts = self._in_samples
        self._in_samples += samples.shape[1]
        return list(self._resampler.resample(frame))

    def _encode(self, frames: list[Any]) -> None:
        for frame in frames:
            if frame is not None:
                frame.time_base = Fraction(1, self.output_rate)
                frame.pts = self._out_samples
                self._out_samples += frame.samples
            self._container.mux(self._stream.encode(frame))

    def _take(self) -> bytes:
        return b"" if self._whole else bytes(self._sink.take())

    def _raw(self, frames: list[Any]) -> bytes:
        return b"".join(bytes(frame.to_ndarray().astype("<i2").tobytes()) for frame in frames)

    def _header(self) -> bytes:
        if self.format != "wav" or self._header_sent:
            return b""
        self._header_sent = True
        return wav_header(self.output_rate)


def encode_whole(format: str, sample_rate: int, pcm: bytes, rate: int | None = None) -> bytes:
    """The complete file at once, with real sizes in its header (WAV) or patched headers (FLAC, MP3)."""
    if format not in MEDIA_TYPES:
        raise InvalidRequest(f"unknown response_format {format!r}; supported: {', '.join(FORMATS)}")
    if format in ("wav", "pcm"):
        if rate is not None and rate != sample_rate:
            encoder = AudioEncoder("pcm", sample_rate, rate)
            pcm, sample_rate = encoder.feed(pcm) + encoder.finish(), rate
        pcm = bytes(pcm[: len(pcm) - len(pcm) % 2])
        return wav_header(sample_rate, len(pcm)) + pcm if format == "wav" else pcm
    encoder = AudioEncoder(format, sample_rate, rate, _whole=True)
    encoder.feed(pcm)
    return encoder.finish()
