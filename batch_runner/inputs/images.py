"""Turning any input image into exactly the RGB frame the model conditions on.

Photos come in every size and mode. We never stretch them: the image is scaled so that it covers
the target size, then centre-cropped, so the first frame keeps the photo's proportions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

# Transparent pixels become white, as most viewers show them.
BACKGROUND = (255, 255, 255)


class ImageLoadError(Exception):
    """The image cannot be used; the message says why (recorded on the row, the run goes on)."""


def load_image(path: str | Path, height: int, width: int, max_pixels: int) -> Image.Image:
    """Decode `path` and return an RGB image of exactly width x height.

    `max_pixels` (the max_image_pixels setting) is the bomb limit, not Pillow's own (89 MP, errors from
    179 MP): Pillow's check is turned off and ours runs on the header that Image.open reads, before any
    pixel is decoded, so the limit can be raised above Pillow's and the refusal cites our number.
    """
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > max_pixels:
                    raise ImageLoadError(
                        f"image is {opened.width}x{opened.height} = {opened.width * opened.height} pixels, "
                        f"above the cap of {max_pixels} (max_image_pixels); shrink it or raise the cap"
                    )
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"refused as a decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot decode image {Path(path).name!r}: {e}") from e
    return cover_crop(to_rgb(image), height, width)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the mode: grayscale is replicated, transparency is flattened onto white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits rather than clip.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def cover_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover width x height, keeping proportions, then cut the centre."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
