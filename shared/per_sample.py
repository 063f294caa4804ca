"""Per-sample SGD (batch size 1) that updates only the first-layer rows of non-blank inputs.

The classic tutorials train one image at a time. Done naively, each step's first-layer update is
a dense outer product ``x^T delta`` over every weight, and BLAS is slow at rank-1 products. MNIST
images are about 80% blank, so most of that product is zero, except for the input offset of
scalings such as ``0.01 + 0.99 * x / 255``. Writing the input as ``x = offset + scale * p``:

    x^T delta = offset * (1 (x) delta) + scale * (p^T delta)

the first term is the same for every row and is kept in a row vector ``shift`` (the weights are
``W0 + 1 (x) shift``), and the second touches only the rows where ``p != 0``. ``shift`` is folded
into ``W0`` whenever the weights are read outside this stepper. The forward pass is sparse too:
``x @ W0 = offset * colsum(W0) + scale * p @ W0``, with the rows it gathers reused for the update.
"""

from __future__ import annotations

import numpy as np

from shared.mlp import MLP, Workspace, activate, activation_backward, output_delta
from shared.scaling import dtype_scalar


class SparseInputSGD:
    """Plain SGD steps on one example at a time, sparse in the first layer's inputs."""

    def __init__(self, model: MLP, raw: np.ndarray) -> None:
        self.model = model
        self.ws = Workspace(model, 1)
        self.offset = dtype_scalar(model.input_scaling.offset, model.dtype)
        self.scale = dtype_scalar(model.input_scaling.scale, model.dtype)
        # Non-blank entries of every example, found once (compressed sparse rows).
        rows, cols = np.nonzero(raw)
        self.starts = np.searchsorted(rows, np.arange(raw.shape[0] + 1)).tolist()
        self.columns = cols.astype(np.intp)
        self.values = raw[rows, cols].astype(model.dtype) * self.scale
        self.dense_above = raw.shape[1] // 2  # denser examples take the plain outer product
        # Sum of each scaled example, for the row-constant part of the forward pass.
        self.sums = (
            np.add.reduceat(self.values, self.starts[:-1])
            if len(self.values)
            else np.zeros(raw.shape[0], dtype=model.dtype)
        )
        self.sums[np.diff(self.starts) == 0] = 0  # reduceat repeats a value for empty rows
        self.value_sums = self.sums.copy()
        self.sums += self.offset * raw.shape[1]
        # Column sums of the first layer (float64: updated incrementally, recomputed on fold),
        # so the offset's share of the forward pass needs no dense product.
        self.column_sums = model.weights[0].sum(axis=0, dtype=np.float64)
        self.shift = np.zeros(model.sizes[1], dtype=model.dtype)
        self.shift_pending = False

    def step(self, index: int, x: np.ndarray, y: np.ndarray, lr: float) -> np.ndarray:
        """Step on example ``index`` (scaled ``x (1, d)``, target ``y (1, k)``).

        Returns the outputs before the update, a view valid until the next step.
        """
        m, ws = self.model, self.ws
        W0, b0 = m.weights[0], m.biases[0]
        start, stop = self.starts[index], self.starts[index + 1]
        sparse = stop - start <= self.dense_above
        Z = ws.A[1]
        if sparse:
            rows = self.columns[start:stop]
            values = self.values[start:stop]
            touched = W0[rows]  # gathered once: for the forward pass and for the update
            np.matmul(values, touched, out=Z[0])
            if self.offset:
                Z += self.offset * self.column_sums
        else:
            np.matmul(x, W0, out=Z)
        if self.shift_pending:
            Z += self.sums[index] * self.shift
        Z += b0
        activate(m.activations[0], Z)
        for layer in range(1, len(m.weights)):
            Z = ws.A[layer + 1]
            np.matmul(ws.A[layer], m.weights[layer], out=Z)
            Z += m.biases[layer]
            activate(m.activations[layer], Z)

        L = len(m.weights)
        output_delta(m.loss, m.activations[-1], ws.A[-1], y, lr, ws.delta[-1], ws.scratch[-1])
        for layer in range(L - 1, 0, -1):
            delta = ws.delta[layer]
            below = ws.delta[layer - 1]
            np.matmul(delta, m.weights[layer].T, out=below)
            activation_backward(m.activations[layer - 1], ws.A[layer], below, ws.scratch[layer - 1])
            np.multiply(ws.A[layer].T, delta, out=ws.grad_W[layer])
            m.weights[layer] -= ws.grad_W[layer]
            m.biases[layer] -= delta[0]
        delta0 = ws.delta[0][0]  # already multiplied by lr
        if sparse:
            touched -= np.multiply.outer(values, delta0)
            W0[rows] = touched
            if self.offset:
                self.column_sums -= self.value_sums[index] * delta0
                self.shift -= self.offset * delta0
                self.shift_pending = True
        else:
            # Dense input: the plain outer product is cheaper than gathering most rows.
            np.multiply(x.T, delta0, out=ws.grad_W[0])
            W0 -= ws.grad_W[0]
            if self.offset:
                self.column_sums -= self.sums[index] * delta0
        b0 -= delta0
        return ws.A[-1]

    def fold(self) -> None:
        """Move the pending row-constant part into the first layer's weights."""
        if self.shift_pending:
            self.model.weights[0] += self.shift
            self.shift[...] = 0
            self.shift_pending = False
        self.column_sums = self.model.weights[0].sum(axis=0, dtype=np.float64)  # drift-free
