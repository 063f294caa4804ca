"""The network rearranged for answering requests: input scaling and biases folded into weights.

A request for one image costs more in NumPy's per-call overhead than in arithmetic (each call
runs with caches made cold by gRPC's own work in between), so what pays is fewer NumPy calls per
request, not faster ones:

- ``(offset + scale * pixels) @ W0 + b0`` equals
  ``[pixels, 1] @ [[scale * W0], [b0 + offset * colsum(W0)]]``: raw pixels go into the first
  product with one cast-copy instead of a cast, a scale and a shift;
- every layer's input buffer ends in a constant 1 and every weight matrix in its bias row, so the
  bias adds happen inside the products;
- the buffers are allocated once per thread, not per request;
- for a few rows the output activation runs on Python floats (ten values per row), which is
  cheaper than the five NumPy calls of a vectorised softmax and answers in the lists the
  response messages are built from anyway.

The folding is done in float64 and cast once to the model's dtype; answers equal
``MLP.forward`` up to float32 rounding (the tests compare them).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from shared.mlp import MLP, activate

# Requests up to this many rows reuse their thread's buffers; larger ones allocate their own
# (a rare 4096-image request should not pin 13 MB per server thread).
REUSED_ROWS = 64
# Up to this many rows the output activation runs on Python floats (measured in-server: the
# vectorised tail cost more than the whole forward pass for one image).
PYTHON_TAIL_ROWS = 4

Rows = list[list[float]]


def python_output(name: str, logits: Rows) -> Rows:
    """The output activation ``name`` of each row, in float64 Python arithmetic."""
    if name == "softmax":
        out = []
        for row in logits:
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            total = sum(exps)
            out.append([e / total for e in exps])
        return out
    if name == "sigmoid":  # written both ways so neither exp can overflow
        return [
            [1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v)) for v in row]
            for row in logits
        ]
    if name == "identity":
        return logits
    raise ValueError(f"unknown output activation {name!r}")


def with_bias_row(W: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.vstack([W, b[np.newaxis, :]]).astype(dtype)


class ServingNetwork:
    """``model``'s outputs, as lists of rows, for raw pixels or already-scaled rows."""

    def __init__(self, model: MLP) -> None:
        self.model = model
        dt = model.dtype
        W0 = model.weights[0].astype(np.float64)
        b0 = model.biases[0].astype(np.float64)
        scaling = model.input_scaling
        rest = [
            with_bias_row(W, b, dt)
            for W, b in zip(model.weights[1:], model.biases[1:], strict=True)
        ]
        self.pixel_layers = [
            with_bias_row(scaling.scale * W0, b0 + scaling.offset * W0.sum(axis=0), dt),
            *rest,
        ]
        self.scaled_layers = [with_bias_row(W0, b0, dt), *rest]
        self._local = threading.local()

    def forward_pixels(self, pixels: np.ndarray) -> Rows:
        """Outputs ``(n, classes)`` for raw pixels ``(n, 784)`` (uint8 0..255)."""
        return self._run(self.pixel_layers, pixels)

    def forward_scaled(self, rows: np.ndarray) -> Rows:
        """Outputs ``(n, classes)`` for rows already scaled as the model expects."""
        return self._run(self.scaled_layers, rows)

    def _buffers(self, n: int) -> list[np.ndarray]:
        """Per layer an input buffer ``(n, width + 1)`` ending in ones, then the output buffer."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None or n > REUSED_ROWS:
            sizes = self.model.sizes
            rows = max(n, REUSED_ROWS)
            buffers = [np.empty((rows, w + 1), dtype=self.model.dtype) for w in sizes[:-1]]
            for buffer in buffers:
                buffer[:, -1] = 1
            buffers.append(np.empty((rows, sizes[-1]), dtype=self.model.dtype))
            if n <= REUSED_ROWS:
                self._local.buffers = buffers
        return buffers

    def _run(self, layers: list[np.ndarray], inputs: np.ndarray) -> Rows:
        n = len(inputs)
        buffers = self._buffers(n)
        x = buffers[0][:n]
        x[:, :-1] = inputs  # casts uint8 pixels on the way in
        *hidden, output = self.model.activations
        for layer, name in enumerate(hidden):
            below = buffers[layer + 1][:n]
            out = below[:, :-1]
            np.matmul(x, layers[layer], out=out)
            activate(name, out)
            x = below
        logits = buffers[-1][:n]
        np.matmul(x, layers[-1], out=logits)
        if n <= PYTHON_TAIL_ROWS:
            return python_output(output, logits.tolist())
        activate(output, logits)
        return logits.tolist()  # lists, also because the buffers serve this thread's next call
