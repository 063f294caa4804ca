"""A person's picture of a handwritten digit, framed the way MNIST's digits were framed.

MNIST's recipe (and what its test set measures): ink is bright on a zero background, the digit's
ink fits a 20x20 box with the longer side exactly 20 pixels (aspect ratio kept, anti-aliased),
and it is pasted into 28x28 with an integer shift that puts its centre of mass on pixel (14, 14):
every MNIST test digit's centre of mass lies within half a pixel of (14, 14).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared import defaults

SIDE = 28  # MNIST's canvas
BOX = 20  # the longer side of every MNIST digit's ink
CENTRE = 14.0  # where MNIST puts the centre of mass (row, column), measured on its test set
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # what cameras and paint programs save
WORKING_SIDE = 1024  # larger photos are shrunk first: the digit ends up 20 pixels anyway
GRID = 8  # lighting is estimated on about 8x8 blocks: finer than a shadow, coarser than a stroke
INK_LEVEL = 0.05  # the digit's box ends where its ink fades below this fraction of full
CLUTTER_GRID = 128  # ink touching the edge is traced on a grid this wide: cheap, strokes joined
CLUTTER_SPECK = 0.04  # of the grid: anything smaller left after removing edge ink is a speck
SPECK_BLUR = 0.02  # of the longer side: blurs dust away but keeps strokes when finding the digit
SPECK_LEVEL = 0.25  # of the blurred maximum: what still counts as part of the digit
DETAIL = 4  # strokes are measured at 4x MNIST's resolution (80 px), where they are ~10 px wide
# Stroke width in MNIST pixels: MNIST's median is 2.5, its 10th percentile 1.8 (measured at half
# ink); a pen line on a photo shrinks far below that, so thinner strokes are widened to this.
MIN_STROKE = 2.0
ASCII_RAMP = " .:-=+*#%@"  # from paper to full ink


class DigitImageError(ValueError):
    """A file that cannot be made into a digit; the message names the file and the problem."""


def read_digit(path: str | os.PathLike[str]) -> np.ndarray:
    """The digit pictured in an image file as MNIST pixels ``(28, 28)`` uint8, 0 = background."""
    return frame_digit(read_grayscale(path), name=str(path))


def read_grayscale(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as float32 luminance ``(h, w)`` in 0..255, upright, at most 1024 px a side."""
    path = Path(path)
    try:
        # Pillow warns between its limit and twice it; a warning would let a bomb through.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as image:
                width, height = image.size
                if width * height > defaults.MAX_IMAGE_PIXELS:
                    raise DigitImageError(
                        f"{path}: {width}x{height} pixels is more than the "
                        f"{defaults.MAX_IMAGE_PIXELS:,} accepted (a decompression bomb?)"
                    )
                image.draft("L", (WORKING_SIDE, WORKING_SIDE))  # JPEG decodes at reduced size
                upright = ImageOps.exif_transpose(image)
                upright.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BOX)
                return _luminance(upright)
    except DigitImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DigitImageError(f"{path}: too many pixels (a decompression bomb?): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DigitImageError(f"{path}: not a {', '.join(FORMATS)} image") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # Truncated or corrupt data; Pillow raises SyntaxError for some malformed headers.
        raise DigitImageError(f"{path}: cannot decode the image: {exc}") from exc


def _luminance(image: Image.Image) -> np.ndarray:
    """Grayscale float32; transparency is flattened onto the colour the strokes are not."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow clips 16-bit gray to 255 when converting to L; scale instead.
        values = np.asarray(image, dtype=np.float32)
        return values * (255.0 / max(float(values.max()), 255.0))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        alpha = rgba[..., 3] / 255.0
        drawn = float((gray * alpha).sum() / max(float(alpha.sum()), 1e-6))
        paper = 255.0 if drawn < 128 else 0.0  # dark strokes on white, light strokes on black
        return gray * alpha + paper * (1.0 - alpha)
    return np.asarray(image.convert("L"), dtype=np.float32)


def frame_digit(gray: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Grayscale ``(h, w)`` of either polarity -> MNIST pixels ``(28, 28)`` uint8 (see module)."""
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise DigitImageError(f"{name}: expected a 2-D grayscale image, got shape {gray.shape}")
    smooth = _blur(gray, max(gray.shape) / 400)  # camera and JPEG noise, far below one output px
    paper = _lighting(smooth)
    residual = smooth - paper
    noise = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    if _ink_is_dark(residual, noise):
        # Light falls on ink and paper alike: dividing by the paper's brightness undoes shading
        # that subtracting it would leave in the strokes' darkness.
        paper = np.maximum(paper, 1.0)
        residual = -residual * (255.0 / paper)
        noise *= 255.0 / float(np.median(paper))
    ink = np.clip(residual - 3 * noise, 0, None)
    level = max(16.0, 3 * noise)  # clearly ink, not paper grain
    if float(ink.max()) < level:
        raise DigitImageError(f"{name}: no digit found (the image is blank or too faint)")
    ink = _without_edge_clutter(ink, level)
    peak = float(ink.max())
    # Full ink: most of a stroke's core; 39% of MNIST's ink pixels are saturated too.
    full = float(np.percentile(ink[ink > 0.3 * peak], 75))
    ink = np.clip(ink / full, 0, 1)
    top, bottom, left, right = _digit_box(ink)
    digit = ink[top:bottom, left:right]
    return _centre(_fit_box(digit))


def _ink_is_dark(residual: np.ndarray, noise: float) -> bool:
    """Whether strokes are darker than the paper: ink is the side that departs from it most."""
    far = max(4 * noise, 8.0)
    darker = float(np.clip(-residual - far, 0, None).sum())
    lighter = float(np.clip(residual - far, 0, None).sum())
    return darker > lighter


def _lighting(gray: np.ndarray) -> np.ndarray:
    """The paper's brightness under uneven light: a quadratic surface through block medians.

    Blocks that the strokes dominate are outliers and are trimmed from the fit, so the surface
    follows the paper, not the digit.
    """
    h, w = gray.shape
    step = max(1, -(-min(h, w) // GRID))
    rows, cols = -(-h // step), -(-w // step)
    padded = np.pad(gray, ((0, rows * step - h), (0, cols * step - w)), mode="edge")
    blocks = padded.reshape(rows, step, cols, step).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    medians = np.median(blocks, axis=2).ravel()
    y, x = np.mgrid[0:rows, 0:cols]
    y = (y.ravel() + 0.5) * step / h - 0.5  # block centres in -0.5..0.5 of the image
    x = (x.ravel() + 0.5) * step / w - 0.5
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    # Start from the blocks near the typical one (paper is the majority), then refine the fit.
    misfit = np.abs(medians - np.median(medians))
    coefficients = np.array([np.median(medians), 0, 0, 0, 0, 0], dtype=np.float64)
    for _ in range(4):
        keep = misfit <= 3 * (1.4826 * float(np.median(misfit)) + 1.0)
        if keep.sum() < 2 * design.shape[1]:
            break
        coefficients, *_ = np.linalg.lstsq(design[keep], medians[keep], rcond=None)
        misfit = np.abs(medians - design @ coefficients)
    yy, xx = np.mgrid[0:h, 0:w]
    yy = (yy + 0.5) / h - 0.5
    xx = (xx + 0.5) / w - 0.5
    surface = coefficients[0] + coefficients[1] * xx + coefficients[2] * yy
    surface += coefficients[3] * xx * xx + coefficients[4] * xx * yy + coefficients[5] * yy * yy
    return surface.astype(np.float32)


def _without_edge_clutter(ink: np.ndarray, level: float) -> np.ndarray:
    """``ink`` without what touches the picture's edge (a table, the page's edge, a shadow),
    unless only specks would be left: a tightly cropped digit touches the edge too."""
    h, w = ink.shape
    step = max(1, -(-max(h, w) // CLUTTER_GRID))
    rows, cols = -(-h // step), -(-w // step)
    padded = np.pad(ink >= level, ((0, rows * step - h), (0, cols * step - w)))
    # A cell is ink if any pixel in it is: thin strokes stay joined on the coarse grid.
    grid = np.asarray(padded.reshape(rows, step, cols, step).any(axis=(1, 3)))
    edge = np.zeros_like(grid)
    edge[[0, -1], :] = grid[[0, -1], :]
    edge[:, [0, -1]] |= grid[:, [0, -1]]
    while True:  # grow from the edge through ink, one cell per step
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        grown &= grid
        if np.array_equal(grown, edge):
            break
        edge = grown
    rest = grid & ~edge
    if not edge.any() or not rest.any():
        return ink
    top, bottom, left, right = _extent(rest)
    if max(bottom - top, right - left) < max(3, CLUTTER_SPECK * max(rows, cols)):
        return ink
    clutter = np.repeat(np.repeat(edge, step, axis=0), step, axis=1)[:h, :w]
    return np.where(clutter, 0, ink).astype(np.float32)


def _digit_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the digit's ink, ignoring specks away from it."""
    radius = SPECK_BLUR * max(ink.shape)
    blurred = _blur(ink, radius)
    core = _extent(blurred > SPECK_LEVEL * float(blurred.max()))
    margin = int(2 * radius) + 1
    top, bottom, left, right = core
    top, left = max(0, top - margin), max(0, left - margin)
    bottom, right = min(ink.shape[0], bottom + margin), min(ink.shape[1], right + margin)
    near = ink[top:bottom, left:right] >= INK_LEVEL
    inner = _extent(near)
    return top + inner[0], top + inner[1], left + inner[2], left + inner[3]


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _fit_box(digit: np.ndarray) -> np.ndarray:
    """Scale so the longer side is 20 px, keeping the aspect ratio; thin strokes thickened."""
    if max(digit.shape) >= DETAIL * BOX:
        digit = _resize(digit, DETAIL * BOX)
        thin = MIN_STROKE * DETAIL - _stroke_width(digit >= 0.5)
        if thin > 1:
            digit = _dilate(digit, round(thin / 2))
    return _resize(digit, BOX)


def _resize(digit: np.ndarray, side: int) -> np.ndarray:
    """Scale so the longer side is ``side``, keeping the aspect ratio; anti-aliased."""
    h, w = digit.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return digit
    # Shrinking averages areas (each pixel: how much of it the ink covers, i.e. anti-aliasing);
    # enlarging a tiny crop interpolates. Area averaging matched MNIST digits best in our photos.
    shrinking = size[0] < w
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    scaled = Image.fromarray(digit.astype(np.float32), "F").resize(size, resample)
    return np.clip(np.asarray(scaled, dtype=np.float32), 0, 1)


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels: area over half the outline (a long stroke has two sides)."""
    padded = np.pad(mask, 1)
    inner = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    outline = int((mask & ~inner).sum())
    return 2 * float(mask.sum()) / max(outline, 1)


def _dilate(image: np.ndarray, radius: int) -> np.ndarray:
    """Grey-level dilation by a ``2 * radius + 1`` square: strokes widen, edges stay soft."""
    out = image
    for axis in (0, 1):
        grown = out.copy()
        for k in range(1, radius + 1):
            ahead = [slice(None), slice(None)]
            behind = [slice(None), slice(None)]
            ahead[axis], behind[axis] = slice(k, None), slice(None, -k)
            np.maximum(grown[tuple(ahead)], out[tuple(behind)], out=grown[tuple(ahead)])
            np.maximum(grown[tuple(behind)], out[tuple(ahead)], out=grown[tuple(behind)])
        out = grown
    return out


def _centre(digit: np.ndarray) -> np.ndarray:
    """Paste into 28x28 with an integer shift putting the centre of mass nearest (14, 14)."""
    h, w = digit.shape
    mass = float(digit.sum())
    com_y = float((digit.sum(axis=1) * np.arange(h)).sum()) / mass
    com_x = float((digit.sum(axis=0) * np.arange(w)).sum()) / mass
    # A very lopsided digit could be pushed over the edge; keeping all of it matters more.
    top = min(max(round(CENTRE - com_y), 0), SIDE - h)
    left = min(max(round(CENTRE - com_x), 0), SIDE - w)
    canvas = np.zeros((SIDE, SIDE), dtype=np.float32)
    canvas[top : top + h, left : left + w] = digit
    return np.round(canvas * 255).astype(np.uint8)


def _blur(image: np.ndarray, radius: float) -> np.ndarray:
    """Approximately Gaussian blur of standard deviation ``radius``: three box blurs per axis."""
    if radius < 0.5:
        return image
    width = max(1, round(np.sqrt(4 * radius * radius + 1)))  # 3 boxes of this width ~ sigma
    out = image.astype(np.float32)
    for axis in (0, 1):
        for _ in range(3):
            out = _box(out, width, axis)
    return out


def _box(image: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Mean over a window of ``width`` along ``axis``, edges repeated."""
    before, after = width // 2, width - 1 - width // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (before + 1, after)
    sums = np.cumsum(np.pad(image, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = image.shape[axis]
    upper = np.take(sums, np.arange(width, width + n), axis=axis)
    lower = np.take(sums, np.arange(0, n), axis=axis)
    return ((upper - lower) / width).astype(np.float32)


def ascii_art(pixels: np.ndarray) -> str:
    """MNIST pixels ``(28, 28)`` as 28 lines of text, two characters per pixel."""
    levels = (np.asarray(pixels, dtype=np.uint16).reshape(SIDE, SIDE) * len(ASCII_RAMP)) // 256
    return "\n".join("".join(ASCII_RAMP[v] * 2 for v in row) for row in levels)
