"""Random shifts, rotations and zooms of 28x28 digits, done in NumPy with bilinear sampling."""

from __future__ import annotations

import numpy as np

SIDE = 28
_PADDED = SIDE + 2
_CENTRE = (SIDE - 1) / 2.0
_grid_y, _grid_x = np.mgrid[0:SIDE, 0:SIDE]
_GRID_X = (_grid_x.ravel() - _CENTRE).astype(np.float32)
_GRID_Y = (_grid_y.ravel() - _CENTRE).astype(np.float32)


def augment_batch(
    batch: np.ndarray,
    rng: np.random.Generator,
    *,
    shift: float,
    rotate: float,
    zoom: float = 0.0,
    fill: float = 0.0,
) -> None:
    """Warp each row of ``batch (n, 784)`` in place by a random affine map.

    Each image is rotated by up to ``rotate`` degrees, zoomed by up to ``zoom`` (a fraction), and
    moved by up to ``shift`` pixels in x and y; pixels that come from outside the image get ``fill``
    (the scaled value of a blank pixel).
    """
    n = batch.shape[0]
    if n == 0 or (shift == 0 and rotate == 0 and zoom == 0):
        return
    dt = batch.dtype
    degrees = rng.uniform(-rotate, rotate, size=(n, 1)).astype(dt)
    zooms = rng.uniform(1 - zoom, 1 + zoom, size=(n, 1)).astype(dt)
    tx = rng.uniform(-shift, shift, size=(n, 1)).astype(dt)
    ty = rng.uniform(-shift, shift, size=(n, 1)).astype(dt)
    warp_batch(batch, degrees, zooms, tx, ty, fill)


def warp_batch(
    batch: np.ndarray,
    degrees: np.ndarray,
    zooms: np.ndarray,
    tx: np.ndarray,
    ty: np.ndarray,
    fill: float,
) -> None:
    """Rotate each image of ``batch (n, 784)`` by ``degrees``, zoom, then move it by (tx, ty).

    The four parameter arrays are ``(n, 1)``; positive ``tx``/``ty`` move content right/down.
    """
    n = batch.shape[0]
    dt = batch.dtype
    theta = np.deg2rad(degrees).astype(dt)
    inv_zoom = (1 / zooms).astype(dt)
    cos, sin = np.cos(theta) * inv_zoom, np.sin(theta) * inv_zoom
    # Source coordinate of every output pixel: inverse rotation/zoom of (output - shift).
    gx = _GRID_X.astype(dt) - tx
    gy = _GRID_Y.astype(dt) - ty
    sx = cos * gx + sin * gy + (_CENTRE + 1)  # +1: coordinates in the padded image
    sy = cos * gy - sin * gx + (_CENTRE + 1)
    np.clip(sx, 0, _PADDED - 1.001, out=sx)
    np.clip(sy, 0, _PADDED - 1.001, out=sy)
    x0 = sx.astype(np.int32)
    y0 = sy.astype(np.int32)
    fx = sx - x0
    fy = sy - y0
    padded = np.full((n, _PADDED, _PADDED), fill, dtype=dt)
    padded[:, 1:-1, 1:-1] = batch.reshape(n, SIDE, SIDE)
    flat = padded.reshape(n, -1)
    top = y0 * _PADDED + x0
    v00 = np.take_along_axis(flat, top, axis=1)
    v01 = np.take_along_axis(flat, top + 1, axis=1)
    v10 = np.take_along_axis(flat, top + _PADDED, axis=1)
    v11 = np.take_along_axis(flat, top + _PADDED + 1, axis=1)
    upper = v00 + fx * (v01 - v00)
    lower = v10 + fx * (v11 - v10)
    np.add(upper, fy * (lower - upper), out=batch)
