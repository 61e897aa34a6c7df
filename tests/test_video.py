"""The same frames make the same MP4 bytes, in any process, whatever CPUs it may use."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batch_runner.outputs.video import Audio, read_video, stream_durations, write_video
from tests.conftest import ROOT

# Encodes the frames that frames() makes, in a fresh interpreter limited to the CPUs given.
_CHILD = """
import os, sys
from pathlib import Path
os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
from tests.test_video import frames
from batch_runner.outputs.video import write_video
write_video(frames(), Path(sys.argv[1]), 8.0)
"""


def frames() -> np.ndarray:
    """17 frames of a moving gradient with noise: enough motion for x264 to use B-frames and threads."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    video = [
        np.stack([(x + 9 * t) % 256, (y + 5 * t) % 256, (x + y) // 3], axis=-1) + rng.integers(0, 24, (240, 320, 3))
        for t in range(17)
    ]
    return np.clip(np.stack(video), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def state_earlier_tests_leave():
    """Process-wide settings other code in a test run changes: torch's threads and denormal mode,
    FFmpeg's log level and the CPUs this process may use. None of them may move a byte."""
    import av
    import torch

    threads, cpus, level = torch.get_num_threads(), os.sched_getaffinity(0), av.logging.get_level()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    av.logging.set_level(av.logging.DEBUG if level is None else None)
    os.sched_setaffinity(0, {max(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        av.logging.set_level(level)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode_elsewhere(path: Path, cpus: set[int]) -> Path:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", _CHILD, str(path), ",".join(map(str, sorted(cpus)))]
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=120)
    return path


def test_encoding_twice_in_one_process_gives_the_same_bytes(tmp_path: Path) -> None:
    write_video(frames(), tmp_path / "a.mp4", 8.0)
    write_video(frames(), tmp_path / "b.mp4", 8.0)
    assert digest(tmp_path / "a.mp4") == digest(tmp_path / "b.mp4")
    decoded, rate = read_video(tmp_path / "a.mp4")
    assert decoded.shape == frames().shape and rate == 8.0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to vary what the encoder sees")
def test_processes_that_may_use_different_cpus_write_the_same_bytes(tmp_path: Path) -> None:
    """x264's default thread count follows the usable CPUs; a rank pinned to fewer must not differ."""
    cpus = os.sched_getaffinity(0)
    here = tmp_path / "here.mp4"
    with state_earlier_tests_leave():
        write_video(frames(), here, 8.0)
    one_cpu = encode_elsewhere(tmp_path / "one.mp4", {min(cpus)})
    all_cpus = encode_elsewhere(tmp_path / "all.mp4", cpus)
    assert digest(one_cpu) == digest(all_cpus) == digest(here)


def leave_garbage_in_the_heap(seed: int) -> None:
    """Allocate and free frames and buffers full of random bytes: what other code leaves behind."""
    import av

    rng = np.random.default_rng(seed)
    kept = []
    for _ in range(40):
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        kept.append(av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p"))
        kept.append(bytearray(rng.bytes(1 << 20)))
    del kept


def test_what_the_heap_held_before_does_not_move_a_byte(tmp_path: Path) -> None:
    """x264's AVX-512 code reads memory it never wrote: on a CPU with AVX-512 the bytes followed the
    heap's garbage until x264's SIMD level was fixed (video.x264_simd)."""
    clip = np.roll(frames()[:9], 28, axis=2)  # one that showed it (x264 defaults: 4 encodes, 4 different files)
    write_video(clip, tmp_path / "first.mp4", 8.0)
    for seed in range(3):
        leave_garbage_in_the_heap(seed)
        write_video(clip, tmp_path / f"{seed}.mp4", 8.0)
        assert digest(tmp_path / f"{seed}.mp4") == digest(tmp_path / "first.mp4"), seed


def test_x264s_simd_level_is_fixed_only_where_the_cpu_has_all_of_it(tmp_path: Path) -> None:
    from batch_runner.outputs.video import X86_64_V3, x264_simd

    every = " ".join(X86_64_V3.values())
    (tmp_path / "v4").write_text(f"processor : 0\nflags : fpu {every} avx512f avx512bw\n")
    (tmp_path / "old").write_text("processor : 0\nflags : fpu mmx sse sse2 pni ssse3\n")
    (tmp_path / "arm").write_text("processor : 0\nFeatures : fp asimd\n")
    assert x264_simd(tmp_path / "v4") == ",".join(X86_64_V3) and "AVX512" not in x264_simd(tmp_path / "v4")
    assert x264_simd(tmp_path / "old") is None and x264_simd(tmp_path / "arm") is None
    assert x264_simd(tmp_path / "missing") is None


def tone(seconds: float, rate: int = 24000, channels: int = 2) -> Audio:
    t = np.arange(round(seconds * rate)) / rate
    return Audio(np.stack([0.5 * np.sin(2 * np.pi * 220 * (c + 1) * t) for c in range(channels)]), rate)


@pytest.mark.parametrize("seconds", [1.0, 17 / 8, 3.0], ids=["short", "exact", "long"])
def test_a_sound_track_is_as_long_as_the_video_however_long_the_sound(tmp_path: Path, seconds: float) -> None:
    """17 frames at 8 fps last 2.125 s: a shorter sound is padded with silence, a longer one cut."""
    write_video(frames(), tmp_path / "a.mp4", 8.0, audio=tone(seconds))
    durations = stream_durations(tmp_path / "a.mp4")
    assert [codec for codec, _ in durations.values()] == ["h264", "aac"]
    (_, video), (_, sound) = durations.values()
    assert video == 17 / 8 and abs(sound - video) <= 1 / 8


def test_encoding_a_video_with_sound_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    for name, channels in (("a", 2), ("b", 2), ("mono", 1)):
        write_video(frames(), tmp_path / f"{name}.mp4", 8.0, audio=tone(2.0, 16000, channels))
    assert digest(tmp_path / "a.mp4") == digest(tmp_path / "b.mp4") != digest(tmp_path / "mono.mp4")
    decoded, _ = read_video(tmp_path / "a.mp4")
    assert decoded.shape == frames().shape


def test_a_video_without_sound_has_no_audio_stream(tmp_path: Path) -> None:
    write_video(frames(), tmp_path / "a.mp4", 8.0)
    assert [codec for codec, _ in stream_durations(tmp_path / "a.mp4").values()] == ["h264"]
