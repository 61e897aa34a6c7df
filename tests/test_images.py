"""Any input image becomes exactly the RGB frame the model conditions on, or a clear refusal."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from batch_runner.inputs.images import ImageLoadError, load_image

from .conftest import photo

CAP = 64_000_000  # the default max_image_pixels
SIZES = [(480, 720), (64, 96), (768, 1360), (32, 192)]  # (height, width): 5B, tiny, 1.5, a thin one


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def solid(path: Path, size: tuple[int, int], colour, mode: str = "RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height, with a few bytes of data: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


# --- every mode and format comes out at the exact size, in RGB -----------------------------------


@pytest.mark.parametrize("kind", ["rgb", "gray", "rgba", "webp", "jpeg", "palette"])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_every_input_comes_out_rgb_at_exact_size(photos, kind, height, width):
    image = load_image(photos[kind], height, width, CAP)
    assert image.mode == "RGB"
    assert image.size == (width, height)
    array = pixels(image)
    assert array.shape == (height, width, 3)
    assert array.std() > 5  # a real picture, not a blank frame


def test_path_may_be_str_or_path(photos):
    a = load_image(str(photos["rgb"]), 64, 96, CAP)
    b = load_image(photos["rgb"], 64, 96, CAP)
    assert np.array_equal(pixels(a), pixels(b))


def test_grayscale_is_replicated_to_three_equal_channels(photos):
    array = pixels(load_image(photos["gray"], 480, 720, CAP))
    assert np.array_equal(array[..., 0], array[..., 1])
    assert np.array_equal(array[..., 1], array[..., 2])
    assert array.std() > 5


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 192).astype(np.uint16), (128, 1))  # 3:2, as the target
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    array = pixels(load_image(path, 64, 96, CAP))
    # Dark on the left, bright on the right, and a smooth ramp rather than a wall of 255.
    assert array[:, :5].mean() < 60
    assert array[:, -5:].mean() > 195
    middle = array[:, 45:51].mean()
    assert 90 < middle < 165


def test_transparent_pixels_become_white(tmp_path):
    # Left half fully transparent (its colour red, which must not show), right half opaque black.
    rgba = np.zeros((80, 120, 4), np.uint8)
    rgba[:, :60] = (255, 0, 0, 0)
    rgba[:, 60:] = (0, 0, 0, 255)
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)

    array = pixels(load_image(path, 64, 96, CAP))

    assert array.shape == (64, 96, 3)
    assert (array[:, :40] >= 250).all(), "transparent area is not white"
    assert (array[:, 56:] <= 5).all(), "opaque black area changed"


def test_half_transparent_pixels_blend_onto_white(tmp_path):
    path = solid(tmp_path / "half.png", (60, 40), (0, 0, 0, 128), "RGBA")
    array = pixels(load_image(path, 64, 96, CAP))
    assert np.allclose(array, 127, atol=3)


def test_grayscale_with_alpha_becomes_white_where_transparent(tmp_path):
    path = solid(tmp_path / "la.png", (50, 50), (0, 0), "LA")
    array = pixels(load_image(path, 64, 96, CAP))
    assert (array >= 250).all()


def test_palette_image_keeps_its_colours(tmp_path):
    rgb = np.zeros((60, 90, 3), np.uint8)
    rgb[:, :30] = (200, 30, 30)
    rgb[:, 30:60] = (30, 200, 30)
    rgb[:, 60:] = (30, 30, 200)
    path = tmp_path / "pal.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(path)
    assert Image.open(path).mode == "P"

    array = pixels(load_image(path, 64, 96, CAP))

    assert np.allclose(array[32, 5], (200, 30, 30), atol=8)
    assert np.allclose(array[32, 48], (30, 200, 30), atol=8)
    assert np.allclose(array[32, 90], (30, 30, 200), atol=8)


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (40, 40), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    image.paste(1, (20, 0, 40, 40))
    path = tmp_path / "pal_t.png"
    image.save(path, transparency=0)
    array = pixels(load_image(path, 64, 96, CAP))
    assert (array[:, :20] >= 250).all()  # transparent red -> white
    assert np.allclose(array[:, 80:], (0, 0, 255), atol=3)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = solid(tmp_path / "print.jpg", (100, 70), (0, 255, 255, 0), "CMYK", quality=95)
    image = load_image(path, 64, 96, CAP)
    assert image.mode == "RGB"
    assert np.allclose(pixels(image).mean(axis=(0, 1)), (255, 0, 0), atol=12)


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    array = pixels(load_image(path, 64, 96, CAP))
    assert np.allclose(array.mean(axis=(0, 1)), (255, 0, 0), atol=8)


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape, left red and right blue; EXIF orientation 6 says "rotate 90 degrees
    # clockwise to display", which puts the red half on top.
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:, :100] = (255, 0, 0)
    stored[:, 100:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    assert Image.open(path).getexif()[0x0112] == 6

    array = pixels(load_image(path, 64, 96, CAP))

    assert array.shape == (64, 96, 3)
    top, bottom = array[:8].mean(axis=(0, 1)), array[-8:].mean(axis=(0, 1))
    assert np.allclose(top, (255, 0, 0), atol=20), top
    assert np.allclose(bottom, (0, 0, 255), atol=20), bottom
    # Without the rotation, the left and right columns would differ instead.
    assert np.allclose(array[:, :8].mean(axis=(0, 1)), array[:, -8:].mean(axis=(0, 1)), atol=20)


def test_webp_with_alpha(tmp_path):
    rgba = np.zeros((50, 80, 4), np.uint8)
    rgba[..., :3] = (10, 200, 10)
    rgba[..., 3] = 255
    rgba[:, :20, 3] = 0
    path = tmp_path / "sticker.webp"
    Image.fromarray(rgba, "RGBA").save(path, lossless=True)
    array = pixels(load_image(path, 480, 720, CAP))
    assert array.shape == (480, 720, 3)
    assert np.allclose(array[240, 360], (10, 200, 10), atol=4)


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (2, 7)])
def test_tiny_images_are_scaled_up_to_exact_size(tmp_path, size):
    path = solid(tmp_path / "dot.png", size, (12, 200, 99))
    image = load_image(path, 480, 720, CAP)
    assert (image.mode, image.size) == ("RGB", (720, 480))
    assert np.allclose(pixels(image), (12, 200, 99), atol=1)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_very_wide_and_very_tall_images_come_out_at_exact_size(tmp_path, height, width):
    for size in ((6000, 40), (40, 6000)):
        path = photo(tmp_path / f"strip_{size[0]}.png", size)
        image = load_image(path, height, width, CAP)
        assert (image.mode, image.size) == ("RGB", (width, height))


def test_cover_crop_keeps_proportions_and_centre(tmp_path):
    # A 3:1 strip, thirds red | green | blue, into 96x64 (3:2): scaled to 192x64, the centre 96
    # columns kept, so a sliver of red, then green, then a sliver of blue. Stretching would show
    # a third of each instead.
    strip = np.zeros((80, 240, 3), np.uint8)
    strip[:, :80] = (255, 0, 0)
    strip[:, 80:160] = (0, 255, 0)
    strip[:, 160:] = (0, 0, 255)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)

    array = pixels(load_image(path, 64, 96, CAP))

    assert np.allclose(array[32, 2], (255, 0, 0), atol=10)
    assert np.allclose(array[32, 24], (0, 255, 0), atol=10)  # would be red if stretched
    assert np.allclose(array[32, 48], (0, 255, 0), atol=10)
    assert np.allclose(array[32, 72], (0, 255, 0), atol=10)  # would be blue if stretched
    assert np.allclose(array[32, 93], (0, 0, 255), atol=10)


def test_same_input_same_frame(photos):
    a = load_image(photos["jpeg"], 480, 720, CAP)
    b = load_image(photos["jpeg"], 480, 720, CAP)
    assert np.array_equal(pixels(a), pixels(b))


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_truncated_file_is_refused(tmp_path, suffix):
    path = photo(tmp_path / f"whole{suffix}", (400, 300))
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as caught:
        load_image(cut, 64, 96, CAP)
    assert f"cannot decode image 'cut{suffix}'" in str(caught.value)


def test_text_file_named_png_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("image,prompt\nthis is not a picture\n", encoding="utf-8")
    with pytest.raises(ImageLoadError) as caught:
        load_image(path, 64, 96, CAP)
    message = str(caught.value)
    assert message.startswith("cannot decode image 'notes.png'")
    assert "cannot identify image file" in message


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"cannot decode image 'empty\.jpg'"):
        load_image(path, 64, 96, CAP)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ImageLoadError, match=r"cannot decode image 'gone\.png'"):
        load_image(tmp_path / "gone.png", 64, 96, CAP)


def test_image_above_the_pixel_cap_is_refused_before_decoding(tmp_path):
    path = png_header_only(tmp_path / "big.png", 9_000, 9_000)  # 81 M pixels, a 100-byte file
    assert path.stat().st_size < 200
    with pytest.raises(ImageLoadError) as caught:
        load_image(path, 480, 720, CAP)
    assert str(caught.value) == (
        "image is 9000x9000 = 81000000 pixels, above the cap of 64000000 (max_image_pixels); shrink it or raise the cap"
    )


def test_a_decompression_bomb_far_above_pillows_limit_is_refused_citing_our_cap(tmp_path):
    # Pillow's own check (which errors from 179 MP, citing its number) is off: ours decides, on the header.
    path = png_header_only(tmp_path / "bomb.png", 30_000, 30_000)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path, 480, 720, CAP)
    assert str(caught.value).startswith(f"image is 30000x30000 = 900000000 pixels, above the cap of {CAP}")


def test_max_image_pixels_can_be_raised_above_pillows_own_limit(tmp_path):
    # 90.25 MP: above Pillow's 89.5 MP warning, once refused as a bomb whatever max_image_pixels said.
    path = png_header_only(tmp_path / "big.png", 9_500, 9_500)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path, 64, 96, 10**8)
    assert str(caught.value).startswith("cannot decode image 'big.png'")  # past our check: only its data is bad


def test_pixel_cap_boundary(tmp_path):
    path = photo(tmp_path / "hundred.png", (100, 100))
    assert load_image(path, 64, 96, 10_000).size == (96, 64)  # exactly at the cap: fine
    with pytest.raises(ImageLoadError, match=r"100x100 = 10000 pixels, above the cap of 9999"):
        load_image(path, 64, 96, 9_999)


def test_an_image_path_that_is_a_folder_is_called_a_folder(tmp_path: Path) -> None:
    from batch_runner.inputs.manifest import load_manifest

    from .conftest import run_config, write_manifest

    (tmp_path / "shots.png").mkdir()
    (tmp_path / "shots").mkdir()
    rows = [{"id": "a", "image": "shots.png", "prompt": "x"}, {"id": "b", "image": "shots", "prompt": "x"}]
    cfg = run_config(f"manifest={write_manifest(tmp_path / 'jobs.csv', rows)}", "model=tiny")
    problems = load_manifest(cfg.manifest, cfg.model, cfg.seed).problems
    assert [(p.id, p.column) for p in problems] == [("a", "image"), ("b", "image")]
    for problem in problems:
        assert "is a folder" in problem.reason and "does not exist" not in problem.reason, problem


class _CountingLoader:
    """An executor that records what it was handed and does it at once."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, fn, job, **kwargs):
        from concurrent.futures import Future

        self.submitted.append(job)
        done = Future()
        done.set_result((job, kwargs))
        return done


@given(rows=st.integers(0, 12), ahead=st.integers(0, 5))
def test_images_are_decoded_at_most_prefetch_rows_ahead_of_the_row_taken(rows, ahead):
    """speed.prefetch: while row k is made, rows up to k + ahead are decoding, no further; the first
    ones begin before any row is taken (beside the text encoding); every row's comes once, in order."""
    from batch_runner.run.runner import _loaded_ahead

    loader, jobs = _CountingLoader(), [f"r{i}" for i in range(rows)]
    taken = _loaded_ahead(loader, jobs, ahead, max_pixels=7)
    assert loader.submitted == jobs[: ahead + 1]
    for k, future in enumerate(taken):
        assert future.result() == (jobs[k], {"max_pixels": 7})
        assert loader.submitted == jobs[: k + ahead + 1]
    assert loader.submitted == jobs
