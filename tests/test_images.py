"""Framing pictures of digits as MNIST did: synthetic photos, real MNIST digits, bad files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from shared.images import DigitImageError, ascii_art, frame_digit, read_digit
from shared.mnist import load_mnist


def digit_strokes(digit: int, box: tuple[float, float, float, float], width: int) -> list:
    """The strokes of a 0, 1, 4 or 7 inside ``box`` (left, top, right, bottom), as PIL shapes."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    bar = top + width / 2
    shapes = {
        0: [("ellipse", [left + w * 0.1, top, right - w * 0.1, bottom])],
        1: [("line", [(left + w * 0.55, top), (left + w * 0.45, bottom)])],
        4: [
            ("line", [(left + w * 0.6, top), (left, top + h * 0.65), (right, top + h * 0.65)]),
            ("line", [(left + w * 0.7, top + h * 0.35), (left + w * 0.7, bottom)]),
        ],
        7: [("line", [(left, bar), (right, bar), (left + w * 0.3, bottom)])],
    }
    return shapes[digit]


def ink_mask(digit: int, size: tuple[int, int], box: tuple, width: int) -> np.ndarray:
    """Where the pen went: float32 (h, w), 1 = ink."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for kind, xy in digit_strokes(digit, box, width):
        if kind == "line":
            draw.line(xy, fill=255, width=width, joint="curve")
        else:
            draw.ellipse(xy, outline=255, width=width)
    return np.asarray(mask, dtype=np.float32) / 255.0


def photograph(ink: np.ndarray, rng: np.random.Generator, *, dark_ink: bool = True) -> np.ndarray:
    """Ink on grey paper lit from the top left, with sensor noise: uint8 (h, w)."""
    h, w = ink.shape
    y, x = np.mgrid[0:h, 0:w]
    paper = 215.0 - 60.0 * x / w - 40.0 * y / h
    picture = paper * (1 - 0.8 * ink) + rng.normal(0, 6, ink.shape)
    if not dark_ink:
        picture = 255 - picture
    return np.clip(picture, 0, 255).astype(np.uint8)


def save(pixels: np.ndarray, path: Path, **options) -> Path:
    Image.fromarray(pixels).save(path, **options)
    return path


def digit_photo(tmp_path: Path, digit: int = 4, *, seed: int = 0, width: int = 40) -> Path:
    """A JPEG (quality 70) of a thick dark digit, 420 px tall, off-centre on 900x700 paper."""
    ink = ink_mask(digit, (900, 700), (80, 200, 395, 620), width)
    return save(photograph(ink, np.random.default_rng(seed)), tmp_path / "photo.jpg", quality=70)


def mnist_photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """An MNIST digit as a phone might photograph it on paper: 12x larger, placed anywhere on a
    520x460 sheet, dark on grey paper under uneven light, with noise, saved as a JPEG (70)."""
    large = Image.fromarray(digit.reshape(28, 28)).resize((336, 336), Image.Resampling.BILINEAR)
    ink = np.zeros((460, 520), dtype=np.float32)
    top, left = int(rng.integers(0, 460 - 336)), int(rng.integers(0, 520 - 336))
    ink[top : top + 336, left : left + 336] = np.asarray(large, dtype=np.float32) / 255
    buffer = io.BytesIO()
    Image.fromarray(photograph(ink, rng)).save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def clean_reference(digit: int, width: int = 40) -> np.ndarray:
    """The same strokes framed without paper, light or noise: what the photo should become."""
    return frame_digit(255 * ink_mask(digit, (900, 700), (80, 200, 395, 620), width))


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    p = pixels.astype(np.float64)
    return (
        float((p.sum(1) * np.arange(28)).sum() / p.sum()),
        float((p.sum(0) * np.arange(28)).sum() / p.sum()),
    )


def ink_extent(pixels: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def best_shifted_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation allowing a one-pixel shift: centring by whole pixels may round either way."""
    a = a.reshape(28, 28)
    return max(
        correlation(np.roll(a, (dy, dx), axis=(0, 1)), b) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    )


def test_a_photo_is_framed_as_mnist_frames_its_digits(tmp_path):
    pixels = read_digit(digit_photo(tmp_path))
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    # Ink bright on a background of exact zeros; the strokes' cores saturate as MNIST's do.
    assert pixels.max() == 255 and (pixels == 0).mean() > 0.6
    assert pixels[:3].max() == pixels[-3:].max() == pixels[:, :3].max() == 0
    # MNIST: the longer side of the ink is exactly 20 px; its centre of mass is on (14, 14) up to
    # the half pixel a whole-pixel shift leaves (measured on all 10,000 test digits).
    height, width = ink_extent(pixels)
    assert max(height, width) == 20 and min(height, width) <= 20
    com_y, com_x = centre_of_mass(pixels)
    assert 13.5 <= com_y <= 14.5 and 13.5 <= com_x <= 14.5
    # Paper, light gradient, noise and JPEG artefacts are gone: it is the clean drawing.
    assert best_shifted_correlation(pixels, clean_reference(4)) > 0.95


def test_light_ink_on_dark_is_not_inverted(tmp_path):
    ink = ink_mask(7, (600, 500), (300, 40, 555, 380), 36)
    photo = photograph(ink, np.random.default_rng(1), dark_ink=False)
    pixels = read_digit(save(photo, tmp_path / "chalk.png"))
    reference = frame_digit(255 * ink)
    assert best_shifted_correlation(pixels, reference) > 0.95
    dark = read_digit(save(photograph(ink, np.random.default_rng(1)), tmp_path / "pen.png"))
    assert best_shifted_correlation(pixels, dark) > 0.95


def test_a_table_beside_the_paper_is_not_part_of_the_digit(tmp_path):
    ink = ink_mask(4, (900, 700), (220, 200, 535, 620), 40)
    photo = photograph(ink, np.random.default_rng(0)).astype(np.float32)
    photo[:, :120] = np.random.default_rng(1).normal(55, 6, (700, 120))  # a dark desk, left
    pixels = read_digit(save(np.clip(photo, 0, 255).astype(np.uint8), tmp_path / "desk.jpg"))
    assert best_shifted_correlation(pixels, frame_digit(255 * ink)) > 0.95


def test_a_tightly_cropped_digit_touching_the_edges_is_kept(tmp_path):
    ink = ink_mask(4, (900, 700), (220, 200, 535, 620), 40)[220:600, 225:530]
    pixels = read_digit(save(photograph(ink, np.random.default_rng(4)), tmp_path / "tight.png"))
    assert best_shifted_correlation(pixels, frame_digit(255 * ink)) > 0.95


def test_thin_pen_strokes_are_widened_to_mnist_strokes(tmp_path):
    thin = read_digit(digit_photo(tmp_path, 1, width=6))
    thick = read_digit(digit_photo(tmp_path, 1, width=40))
    # A 6 px line on a 420 px digit would be a third of a pixel wide; MNIST's are 1.8 to 3.6.
    assert (thin >= 128).sum(axis=1).max() >= 2
    assert (thin >= 128).sum() >= 0.5 * (thick >= 128).sum()


def test_mnist_digits_come_back_essentially_unchanged(mnist_dir):
    _, test = load_mnist(mnist_dir)
    digits = test.features[:100].reshape(-1, 28, 28)
    framed = np.stack([frame_digit(d) for d in digits])
    close = [correlation(f, d) > 0.99 for f, d in zip(framed, digits, strict=True)]
    assert sum(close) >= 90
    for f, d in zip(framed, digits, strict=True):
        assert best_shifted_correlation(f, d) > 0.98


def test_photos_of_mnist_digits_come_back_as_those_digits(mnist_dir, tmp_path):
    # Proves the framing is MNIST's: photographed, moved and re-lit, a digit is recovered.
    _, test = load_mnist(mnist_dir)
    rng = np.random.default_rng(3)
    unshifted = []
    for i, digit in enumerate(test.features[:10]):
        path = tmp_path / f"mnist-{i}.jpg"
        path.write_bytes(mnist_photo(digit, rng))
        pixels = read_digit(path)
        assert best_shifted_correlation(pixels, digit) > 0.8, i
        unshifted.append(correlation(pixels, digit))
    assert np.median(unshifted) > 0.9


def test_framing_a_framed_digit_changes_little(tmp_path):
    once = read_digit(digit_photo(tmp_path, 7))
    twice = frame_digit(once)
    # Only the contrast may be stretched again a little: shape, size and place are kept.
    assert np.abs(twice.astype(int) - once).max() <= 16
    assert ink_extent(twice) == ink_extent(once) and correlation(twice, once) > 0.99


def test_exif_orientation_is_applied(tmp_path):
    # A camera held sideways stores the pixels lying down and an EXIF tag saying "turn 90°".
    lying = np.full((300, 800), 220, dtype=np.uint8)
    lying[130:170, 100:700] = 30
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "sideways.jpg"
    Image.fromarray(lying).save(path, exif=exif)
    height, width = ink_extent(read_digit(path))
    assert height == 20 and width <= 6


def test_transparent_background_counts_as_paper(tmp_path):
    ink = ink_mask(0, (300, 300), (60, 20, 240, 280), 24)
    rgba = np.zeros((300, 300, 4), dtype=np.uint8)  # fully transparent black
    rgba[..., 3] = (ink * 255).astype(np.uint8)  # black strokes, opaque where drawn
    pixels = read_digit(save(rgba, tmp_path / "drawn.png"))
    assert best_shifted_correlation(pixels, frame_digit(255 * ink)) > 0.95


@pytest.mark.parametrize(
    "picture",
    [
        np.full((200, 300), 180, dtype=np.uint8),
        np.clip(
            np.random.default_rng(2).normal(160, 6, (400, 300)) + np.linspace(0, 50, 300), 0, 255
        ).astype(np.uint8),
    ],
    ids=["uniform", "noisy-uneven-paper"],
)
def test_blank_paper_is_refused_naming_the_file(tmp_path, picture):
    path = save(picture, tmp_path / "blank.jpg", quality=70)
    with pytest.raises(DigitImageError, match=r"blank\.jpg: no digit found"):
        read_digit(path)


def test_files_that_are_not_images_are_refused_naming_them(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture\n")
    with pytest.raises(DigitImageError, match=r"notes\.png: not a PNG, JPEG"):
        read_digit(text)
    with pytest.raises(DigitImageError, match=r"missing\.png: cannot decode"):
        read_digit(tmp_path / "missing.png")
    good = digit_photo(tmp_path).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good[: len(good) // 3])
    with pytest.raises(DigitImageError, match=r"cut\.jpg: cannot decode"):
        read_digit(cut)


def test_a_huge_declared_size_is_refused_before_decoding(tmp_path):
    # A valid PNG header declaring 100,000 x 100,000 pixels, with a few bytes of data.
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    header = struct.pack(">II", 100_000, 100_000) + bytes(png[24:29])
    png[16:29] = header
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(png))
    with pytest.raises(DigitImageError, match=r"bomb\.png: .*decompression bomb"):
        read_digit(bomb)


def test_ascii_art_shows_ink_and_paper():
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[4:24, 13:15] = 255
    lines = ascii_art(pixels).split("\n")
    assert len(lines) == 28 and {len(line) for line in lines} == {56}
    assert lines[10][26:30] == "@@@@" and lines[0].strip() == ""
