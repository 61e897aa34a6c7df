"""Encoding frames as H.264 MP4 files that training pipelines and browsers read.

yuv420p is what every decoder accepts; `+faststart` puts the index first so a browser can show the
video before it has all of it. The file appears under its final name only when complete.

The same frames always give the same bytes, whatever machine or process encodes them: a dataset's
content hashes and deduplication depend on it. x264 is deterministic for a given thread count, but
its default thread count follows the CPUs this process may use (which differ between hosts, ranks
and CPU-affinity settings), and frame threads change how frames are coded. So the encoder runs on
one thread, and throughput comes from encoding several videos at once, in the background while the
GPU makes the next ones (batch_runner.outputs.writers). The RGB-to-YUV conversion is ours too, not
left to the encoder's defaults: swscale's bit-exact C path on one thread, so neither the CPU's SIMD
features, nor the thread count, nor what ran earlier in the process moves a rounding (a full test
run once saw an encode differ from a fresh process's).

x264's SIMD level is fixed too, where the CPU has it: x86-64-v3 (AVX2, FMA3, BMI; every x86 server
since 2015), not the CPU's best. Its AVX-512 code reads memory it never wrote (its macroblock-tree
rate control): the bytes followed whatever the heap held before, so encodes of the same frames in
one process differed once other code had run, and more often with several encoders at work. And its
float code rounds differently at each level (SSE2-only and AVX2 give different bytes), so a fixed
level also makes the bytes the same on machines with and without AVX-512. Elsewhere (other CPUs,
other architectures) x264 keeps its own choice.

A video may carry a sound track (`Audio`): it goes into the same file as AAC (FFmpeg's own encoder,
one thread, deterministic too), starting with the first frame and cut or padded with silence to
the video's exact duration, its packets interleaved with the frames they play with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Interpolation

from batch_runner.outputs.storage import atomic_path

# swscale's reference arithmetic: the same bytes on any CPU (its SIMD paths round differently).
_EXACT = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT
# x264's names for the x86-64-v3 SIMD level, and the /proc/cpuinfo flags a CPU needs for each.
X86_64_V3 = {
    "MMX2": "mmx",
    "SSE": "sse",
    "SSE2Fast": "sse2",
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "SSE4.1": "sse4_1",
    "SSE4.2": "sse4_2",
    "LZCNT": "abm",
    "AVX": "avx",
    "FMA3": "fma",
    "BMI1": "bmi1",
    "BMI2": "bmi2",
    "AVX2": "avx2",
}


@functools.cache
def x264_simd(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """x264's `asm` setting: the x86-64-v3 level where the CPU has all of it, else None (x264 decides)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if not all(flag in flags for flag in X86_64_V3.values()):
        return None
    return ",".join(X86_64_V3)


# Samples per AAC frame: FFmpeg's encoder takes exactly this many per call (the last may be short).
AAC_FRAME = 1024
_LAYOUTS = {1: "mono", 2: "stereo"}


@dataclass(frozen=True)
class Audio:
    """A video's sound: float samples in [-1, 1], (channels, samples) with 1 or 2 channels, at `rate` Hz."""

    samples: np.ndarray
    rate: int

    def fitted(self, seconds: float) -> np.ndarray:
        """The samples as float32, cut or padded with silence to `seconds` (the video's duration)."""
        wanted = round(seconds * self.rate)
        samples = np.clip(np.asarray(self.samples, dtype=np.float32)[:, :wanted], -1.0, 1.0)
        return np.pad(samples, ((0, 0), (0, wanted - samples.shape[1])))


def write_video(frames: np.ndarray, path: Path, fps: float, crf: int = 18, audio: Audio | None = None) -> None:
    """Write uint8 frames (F, H, W, 3) to `path` as H.264/yuv420p MP4, with `audio` as an AAC track
    where given, atomically."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if audio is not None and (audio.samples.ndim != 2 or audio.samples.shape[0] not in _LAYOUTS):
        raise ValueError(f"expected audio samples of shape (1 or 2 channels, samples), got {audio.samples.shape}")
    _, height, width, _ = frames.shape
    # yuv420p halves the chroma resolution: odd sizes lose their last row/column.
    frames = frames[:, : height - height % 2, : width - width % 2]
    rate = Fraction(fps).limit_denominator(1001)
    with (
        atomic_path(path) as tmp,
        av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container,
    ):
        stream = container.add_stream("libx264", rate=rate)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # deterministic output (see the module docstring)
        options = {"crf": str(crf), "preset": "medium"}
        if simd := x264_simd():  # the same bytes whatever the heap held (see the module docstring)
            options["x264-params"] = f"asm={simd}"
        stream.options = options
        sound = _SoundTrack(container, audio, len(frames) / rate) if audio is not None else None
        for index, frame in enumerate(frames):
            yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
                format="yuv420p", interpolation=_EXACT, threads=1
            )
            container.mux(stream.encode(yuv))
            if sound:  # the sound that plays with the frames so far, so the packets interleave
                sound.encode_until((index + 1) / rate)
        container.mux(stream.encode())
        if sound:
            sound.finish()


class _SoundTrack:
    """An AAC stream fed in AAC frames, from the start of the video up to a time."""

    def __init__(self, container: av.container.OutputContainer, audio: Audio, seconds: Fraction) -> None:
        self.container, self.rate = container, audio.rate
        self.samples = audio.fitted(float(seconds))
        self.stream = container.add_stream("aac", rate=audio.rate, layout=_LAYOUTS[self.samples.shape[0]])
        self.stream.codec_context.thread_count = 1
        self.done = 0

    def encode_until(self, seconds: Fraction) -> None:
        end = min(self.samples.shape[1], int(seconds * self.rate))
        while self.done + AAC_FRAME <= end or (end == self.samples.shape[1] and self.done < end):
            chunk = np.ascontiguousarray(self.samples[:, self.done : self.done + AAC_FRAME])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.stream.layout.name)
            frame.sample_rate, frame.pts = self.rate, self.done
            self.container.mux(self.stream.encode(frame))
            self.done += chunk.shape[1]

    def finish(self) -> None:
        self.encode_until(Fraction(self.samples.shape[1], self.rate))
        self.container.mux(self.stream.encode())


def stream_durations(path: Path) -> dict[str, tuple[str, float]]:
    """Each stream's kind ("video", "audio"), codec and duration in seconds, as ffprobe shows them."""
    with av.open(str(path)) as container:
        return {
            f"{s.type}{s.index}": (s.codec_context.name, float(s.duration * s.time_base))
            for s in container.streams
            if s.duration is not None
        }


def read_video(path: Path) -> tuple[np.ndarray, float]:
    """Decode a video into uint8 frames (F, H, W, 3) and its frame rate (for tests and reports)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rate = float(stream.average_rate or stream.base_rate or 0)
    return np.stack(frames), rate
