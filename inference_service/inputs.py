"""Turning client-supplied images into the network's input rows, refusing anything malformed.

Every function raises ``RequestError`` (INVALID_ARGUMENT) with a message naming the image and
what is wrong with it; none lets a client's mistake escape as another exception.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from inference_service.errors import RequestError, invalid_argument
from shared.mlp import MLP
from shared.scaling import dtype_scalar

SIDE = 28
PIXELS = SIDE * SIDE
ENCODINGS = ("PNG", "JPEG")
# Scaled inputs may differ from offset + scale * pixel by rounding; allow that much, no more.
RANGE_TOLERANCE = 1e-4


def scale_pixels(pixels: np.ndarray, model: MLP) -> np.ndarray:
    """Raw 0..255 pixels ``(n, 784)`` to the model's input rows, as its manifest says."""
    rows = pixels.astype(model.dtype)  # the same arithmetic as InputScaling.apply, in place
    rows *= dtype_scalar(model.input_scaling.scale, model.dtype)
    if model.input_scaling.offset:
        rows += dtype_scalar(model.input_scaling.offset, model.dtype)
    return rows


def scaled_range(model: MLP) -> tuple[float, float]:
    """The interval pixels 0..255 are mapped to: anything outside is not an image."""
    scaling = model.input_scaling
    ends = (scaling.offset, scaling.offset + 255.0 * scaling.scale)
    return min(ends), max(ends)


def check_scaled(rows: np.ndarray, model: MLP, what: str = "scaled input") -> np.ndarray:
    """``rows`` as the model's dtype, refused if any value is non-finite or out of range."""
    rows = np.asarray(rows, dtype=model.dtype)
    if not np.isfinite(rows).all():
        row, col = np.argwhere(~np.isfinite(rows))[0]
        raise invalid_argument(
            f"{what}: row {row} value {col} is {rows[row, col]}, values must be finite"
        )
    low, high = scaled_range(model)
    slack = RANGE_TOLERANCE * max(1.0, high - low)
    outside = (rows < low - slack) | (rows > high + slack)
    if outside.any():
        row, col = np.argwhere(outside)[0]
        raise invalid_argument(
            f"{what}: row {row} value {col} is {rows[row, col]:.6g}, outside [{low:.6g}, "
            f"{high:.6g}] (pixels 0..255 scaled by the model's input_scaling; send raw pixels "
            "as uint8 instead)"
        )
    return rows


def pixels_from_bytes(data: bytes, what: str) -> np.ndarray:
    """784 bytes to a uint8 row."""
    if len(data) != PIXELS:
        raise invalid_argument(
            f"{what}: expected {PIXELS} bytes (28x28 uint8 pixels), got {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8)


def pixels_from_encoded(data: bytes, what: str) -> np.ndarray:
    """A 28x28 PNG or JPEG to a uint8 row of grayscale pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ENCODINGS)
            # The header is read lazily: check the size before decoding a single pixel, so a
            # small file claiming a huge image is refused without allocating it.
            if image.size != (SIDE, SIDE):
                raise invalid_argument(
                    f"{what}: image is {image.size[0]}x{image.size[1]}, "
                    f"expected {SIDE}x{SIDE} (resize it on the client)"
                )
            gray = image.convert("L")
    except RequestError:
        raise
    except Image.UnidentifiedImageError:
        raise invalid_argument(f"{what}: not a PNG or JPEG image") from None
    except Exception as exc:  # Pillow's decoders raise many types on corrupt data
        raise invalid_argument(
            f"{what}: cannot decode image ({type(exc).__name__}: {exc})"
        ) from None
    return np.asarray(gray, dtype=np.uint8).reshape(PIXELS)
