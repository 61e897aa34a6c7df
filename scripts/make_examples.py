"""Make the shipped example inputs: small procedural pictures in assorted sizes, modes and formats.

Run from the project root: `python scripts/make_examples.py` (re-creates examples/).
They are drawn, not photographed, so the repository ships them under its own license.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "examples"


def sunset(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(250 - 120 * t), int(140 - 90 * t), int(90 + 100 * t)))
    r = height // 5
    draw.ellipse([width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r], fill=(255, 210, 120))
    draw.rectangle([0, int(height * 0.65), width, height], fill=(30, 60, 110))
    return image


def city(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (15, 15, 40))
    draw = ImageDraw.Draw(image)
    for i in range(12):
        x = i * width // 12
        top = int(height * (0.3 + 0.4 * abs(math.sin(i * 1.7))))
        draw.rectangle([x, top, x + width // 14, height], fill=(40 + 10 * i, 40, 70))
        for wy in range(top + 6, height - 6, 14):
            draw.rectangle([x + 4, wy, x + 9, wy + 5], fill=(255, 220, 90))
    return image


def leaf(size: int) -> Image.Image:
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size // 6, size // 4, 5 * size // 6, 3 * size // 4], fill=(40, 160, 60, 255))
    draw.line([(size // 6, size // 2), (5 * size // 6, size // 2)], fill=(20, 90, 30, 255), width=3)
    return image


def main() -> None:
    images = OUT / "images"
    images.mkdir(parents=True, exist_ok=True)
    sunset(720, 480).save(images / "sunset.png")
    city(640, 360).convert("L").save(images / "city_gray.jpg", quality=90)
    leaf(300).save(images / "leaf_rgba.png")
    sunset(500, 700).save(images / "sunset_portrait.webp", quality=90)
    rows = [
        (
            "sunset",
            "images/sunset.png",
            "The sun sinks slowly into a calm sea, waves glinting.",
            42,
            "",
            "beach",
        ),
        (
            "city",
            "images/city_gray.jpg",
            "Night falls on the city, windows flicker on one by one.",
            "",
            17,
            "urban",
        ),
        (
            "leaf",
            "images/leaf_rgba.png",
            "A green leaf turns gently in the wind, 葉が揺れる.",
            7,
            "",
            "nature",
        ),
        (
            "portrait",
            "images/sunset_portrait.webp",
            'Clouds drift past a tall, "glowing" sunset.',
            "",
            "",
            "sky",
        ),
    ]
    with open(OUT / "jobs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "prompt", "seed", "num_frames", "category"])
        writer.writerows(rows)


if __name__ == "__main__":
    main()
