"""The multilayer perceptron: dense layers, activations and losses with their gradients, in NumPy.

Shapes, stated once. A batch of inputs ``X`` is ``(n, sizes[0])``. Layer ``l`` holds weights
``W[l]`` of shape ``(sizes[l], sizes[l+1])`` and biases ``b[l]`` of shape ``(sizes[l+1],)`` and maps
``A[l] (n, sizes[l])`` to ``A[l+1] = f_l(A[l] @ W[l] + b[l])``, so ``A[0] = X`` and the output is
``A[L] (n, sizes[-1])``. Losses are averaged over the batch and summed over outputs.

Every operation writes into buffers owned by a ``Workspace`` so that the training loop allocates
nothing per batch; the same code serves inference, training and the gradient check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.scaling import InputScaling, dtype_scalar

HIDDEN_ACTIVATIONS = ("sigmoid", "tanh", "relu")
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid", "identity")
LOSSES = ("mse", "bce", "cross_entropy")
INITIALISATIONS = ("auto", "normal", "he", "glorot")
DTYPES = {"float32": np.float32, "float64": np.float64}

# Which output activations each loss makes sense with (outputs must be probabilities for the
# cross-entropies).
LOSS_OUTPUTS = {
    "mse": ("softmax", "sigmoid", "identity"),
    "bce": ("sigmoid", "softmax"),
    "cross_entropy": ("softmax",),
}
# Pairs whose gradient with respect to the pre-activation collapses to ``A - Y``.
FUSED = {("softmax", "cross_entropy"), ("sigmoid", "bce")}
# Keeps log() finite when a probability rounds to exactly 0 or 1.
_LOG_FLOOR = {np.float32: 1e-7, np.float64: 1e-15}
# exp() of anything above these stays a normal number (float32: e^-80 ~ 1.8e-35 > 1.2e-38).
_EXP_SAFE = {np.float32: -80.0, np.float64: -700.0}


# --- activations: forward beside backward ---------------------------------------------------


def activate(name: str, Z: np.ndarray) -> None:
    """Apply activation ``name`` to ``Z`` in place, so ``Z`` then holds ``A``."""
    if name == "relu":
        np.maximum(Z, 0, out=Z)
    elif name == "sigmoid":
        # 0.5 * (1 + tanh(z / 2)) equals 1 / (1 + exp(-z)) and never overflows.
        # Python floats never upcast an array (NEP 50), and skip a scalar conversion per call.
        Z *= 0.5
        np.tanh(Z, out=Z)
        Z *= 0.5
        Z += 0.5
    elif name == "tanh":
        np.tanh(Z, out=Z)
    elif name == "softmax":
        # Any per-row constant may be subtracted. The batch's maximum keeps every exp <= 1 and is
        # ~8 us cheaper per batch than per-row maxima (a short-axis max reduction is slow); only
        # where some value then lies so far below that exp could underflow does each row get
        # its own maximum, so no row can lose its largest terms.
        Z -= Z.max()
        if Z.min() < _EXP_SAFE[Z.dtype.type]:
            Z -= Z.max(axis=1, keepdims=True)
        np.exp(Z, out=Z)
        Z /= Z.sum(axis=1, keepdims=True)
    elif name != "identity":
        raise ValueError(f"unknown activation {name!r}")


def activation_backward(name: str, A: np.ndarray, dA: np.ndarray, scratch: np.ndarray) -> None:
    """Turn ``dA`` (dL/dA) into dL/dZ in place, given the activation's output ``A``.

    ``scratch`` is a buffer shaped like ``A`` that may be overwritten.
    """
    if name == "relu":
        np.greater(A, 0, out=scratch)
        dA *= scratch
    elif name == "sigmoid":
        np.subtract(1, A, out=scratch)
        scratch *= A
        dA *= scratch
    elif name == "tanh":
        np.multiply(A, A, out=scratch)
        np.subtract(1, scratch, out=scratch)
        dA *= scratch
    elif name == "softmax":
        # Jacobian-vector product of softmax: dZ = A * (dA - sum(dA * A)).
        np.multiply(dA, A, out=scratch)
        dA -= scratch.sum(axis=1, keepdims=True)
        dA *= A
    elif name != "identity":
        raise ValueError(f"unknown activation {name!r}")


# --- losses: value beside gradient ----------------------------------------------------------


def loss_value(name: str, A: np.ndarray, Y: np.ndarray) -> float:
    """Mean over the batch of the loss summed over outputs."""
    n = A.shape[0]
    if name == "mse":
        diff = A - Y
        return float(0.5 * np.vdot(diff, diff) / n)
    floor = _LOG_FLOOR[A.dtype.type]
    logA = np.log(np.clip(A, floor, 1.0))
    if name == "cross_entropy":
        return float(-np.vdot(Y, logA) / n)
    if name == "bce":
        log1mA = np.log(np.clip(1.0 - A, floor, 1.0))
        return float(-(np.vdot(Y, logA) + np.vdot(1.0 - Y, log1mA)) / n)
    raise ValueError(f"unknown loss {name!r}")


def output_delta(
    loss: str,
    activation: str,
    A: np.ndarray,
    Y: np.ndarray,
    scale: float,
    out: np.ndarray,
    scratch: np.ndarray,
) -> None:
    """Write ``scale`` * dL/dZ of the output layer into ``out`` (``scale`` folds in 1/n and lr)."""
    s = float(scale)
    np.subtract(A, Y, out=out)
    if (activation, loss) in FUSED or (loss == "mse" and activation == "identity"):
        out *= s
        return
    if loss == "bce":
        # dL/dA = (A - Y) / (A (1 - A)); clipped so a saturated unit gives a large, finite step.
        floor = dtype_scalar(_LOG_FLOOR[A.dtype.type], A.dtype)
        np.subtract(1, A, out=scratch)
        scratch *= A
        np.maximum(scratch, floor, out=scratch)
        out /= scratch
    out *= s
    activation_backward(activation, A, out, scratch)


# --- initialisation -------------------------------------------------------------------------


def initial_weights(
    fan_in: int, fan_out: int, scheme: str, activation: str, rng: np.random.Generator, dtype
) -> np.ndarray:
    """Weights ``(fan_in, fan_out)`` by ``scheme``; ``auto`` is He for ReLU, Glorot otherwise."""
    if scheme == "auto":
        scheme = "he" if activation == "relu" else "glorot"
    if scheme == "normal":  # std = fan_in ** -0.5, as 'Make Your Own Neural Network'
        W = rng.normal(0.0, fan_in**-0.5, size=(fan_in, fan_out))
    elif scheme == "he":
        W = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
    elif scheme == "glorot":
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        W = rng.uniform(-limit, limit, size=(fan_in, fan_out))
    else:
        raise ValueError(f"unknown initialisation {scheme!r}; expected one of {INITIALISATIONS}")
    return W.astype(dtype)


# --- the network ----------------------------------------------------------------------------


def check_architecture(sizes: Sequence[int], activations: Sequence[str], loss: str) -> None:
    """Raise ValueError naming what is wrong with an architecture description."""
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output width, got {list(sizes)}")
    for i, width in enumerate(sizes):
        if not isinstance(width, int | np.integer) or isinstance(width, bool) or width < 1:
            raise ValueError(f"sizes[{i}] must be a positive integer, got {width!r}")
    if len(activations) != len(sizes) - 1:
        raise ValueError(
            f"activations needs one entry per layer ({len(sizes) - 1}), got {len(activations)}"
        )
    for i, name in enumerate(activations[:-1]):
        if name not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"activations[{i}] must be one of {HIDDEN_ACTIVATIONS}, got {name!r}")
    if activations[-1] not in OUTPUT_ACTIVATIONS:
        raise ValueError(
            f"the output activation must be one of {OUTPUT_ACTIVATIONS}, got {activations[-1]!r}"
        )
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if activations[-1] not in LOSS_OUTPUTS[loss]:
        raise ValueError(
            f"loss {loss!r} needs an output activation in {LOSS_OUTPUTS[loss]}, "
            f"got {activations[-1]!r}"
        )
    if activations[-1] == "softmax" and sizes[-1] < 2:
        raise ValueError("a softmax output needs at least two units")


@dataclass
class MLP:
    """A dense feed-forward network and everything needed to apply it to raw inputs."""

    sizes: tuple[int, ...]
    activations: tuple[str, ...]
    loss: str
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    input_scaling: InputScaling = field(default_factory=InputScaling.unit)

    def __post_init__(self) -> None:
        self.sizes = tuple(int(s) for s in self.sizes)
        self.activations = tuple(self.activations)
        check_architecture(self.sizes, self.activations, self.loss)
        if len(self.weights) != len(self.sizes) - 1 or len(self.biases) != len(self.weights):
            raise ValueError("weights and biases need one array per layer")
        dtypes = {p.dtype for p in self.parameters()}
        if len(dtypes) != 1 or next(iter(dtypes)).type not in DTYPES.values():
            raise ValueError(
                f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}"
            )
        for layer, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            expected = (self.sizes[layer], self.sizes[layer + 1])
            if W.shape != expected or b.shape != expected[1:]:
                raise ValueError(
                    f"layer {layer}: weights {W.shape} and biases {b.shape} do not match "
                    f"sizes {expected} and {expected[1:]}"
                )

    @classmethod
    def create(
        cls,
        sizes: Sequence[int],
        activations: Sequence[str],
        loss: str,
        *,
        rng: np.random.Generator,
        init: str = "auto",
        dtype: str = "float32",
        input_scaling: InputScaling | None = None,
    ) -> MLP:
        """A freshly initialised network; the same ``rng`` state gives the same weights."""
        check_architecture(sizes, activations, loss)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        np_dtype = DTYPES[dtype]
        weights = [
            initial_weights(sizes[i], sizes[i + 1], init, activations[i], rng, np_dtype)
            for i in range(len(sizes) - 1)
        ]
        biases = [np.zeros(sizes[i + 1], dtype=np_dtype) for i in range(len(sizes) - 1)]
        return cls(
            tuple(sizes),
            tuple(activations),
            loss,
            weights,
            biases,
            input_scaling or InputScaling.unit(),
        )

    @property
    def dtype(self) -> np.dtype:
        return self.weights[0].dtype

    @property
    def parameter_count(self) -> int:
        return sum(p.size for p in self.parameters())

    def parameters(self) -> list[np.ndarray]:
        """Weights and biases interleaved: W0, b0, W1, b1, ..."""
        return [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]

    def astype(self, dtype: str) -> MLP:
        """A copy with parameters in ``dtype`` (float64 for gradient checks)."""
        np_dtype = DTYPES[dtype]
        return MLP(
            self.sizes,
            self.activations,
            self.loss,
            [W.astype(np_dtype) for W in self.weights],
            [b.astype(np_dtype) for b in self.biases],
            self.input_scaling,
        )

    def copy(self) -> MLP:
        return self.astype(str(self.dtype))

    def forward(self, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Output activations for already-scaled inputs ``X (n, sizes[0])``, in chunks."""
        X = np.asarray(X, dtype=self.dtype)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"inputs must have shape (n, {self.sizes[0]}), got {X.shape}")
        out = np.empty((X.shape[0], self.sizes[-1]), dtype=self.dtype)
        ws = Workspace(self, min(chunk, max(1, X.shape[0])))
        for start in range(0, X.shape[0], chunk):
            part = X[start : start + chunk]
            out[start : start + len(part)] = ws.forward(part)
        return out

    def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        """Output activations for raw features (for MNIST: pixels 0..255), scaled as trained."""
        return self.forward(self.input_scaling.apply(raw, self.dtype))


class Workspace:
    """Preallocated activations, deltas and gradients for batches of up to ``capacity`` rows."""

    def __init__(self, model: MLP, capacity: int) -> None:
        self.model = model
        self.capacity = capacity
        dt = model.dtype
        widths = model.sizes
        self.A = [np.empty((capacity, w), dtype=dt) for w in widths]  # A[0] is the input batch
        self.delta = [np.empty((capacity, w), dtype=dt) for w in widths[1:]]
        self.scratch = [np.empty((capacity, w), dtype=dt) for w in widths[1:]]
        self.mask = [np.empty((capacity, w), dtype=dt) for w in widths[1:-1]]
        self.grad_W = [np.empty_like(W) for W in model.weights]
        self.grad_b = [np.empty_like(b) for b in model.biases]
        self.ones = np.ones((1, capacity), dtype=dt)
        self.dropout_active = False

    def forward(self, X: np.ndarray, n: int | None = None) -> np.ndarray:
        """Forward pass of ``X``'s first ``n`` rows; returns a view of the output buffer."""
        n = X.shape[0] if n is None else n
        self.A[0][:n] = X[:n]
        return self.forward_filled(n)

    def forward_filled(
        self,
        n: int,
        dropout: float = 0.0,
        rng: np.random.Generator | None = None,
        columns: int | None = None,
    ) -> np.ndarray:
        """Forward pass of the ``n`` rows already in ``A[0]``; inverted dropout on hidden layers.

        With ``columns``, inputs beyond the first ``columns`` are promised to be zero in these
        rows, and the first layer's product skips them (they would add exact zeros).
        """
        m = self.model
        last = len(m.weights) - 1
        self.dropout_active = dropout > 0
        for layer, (W, b) in enumerate(zip(m.weights, m.biases, strict=True)):
            Z = self.A[layer + 1][:n]
            if layer == 0 and columns is not None:
                np.matmul(self.A[0][:n, :columns], W[:columns], out=Z)
            else:
                np.matmul(self.A[layer][:n], W, out=Z)
            Z += b
            activate(m.activations[layer], Z)
            if dropout > 0 and layer < last:
                assert rng is not None
                mask = self.mask[layer][:n]
                rng.random(dtype=mask.dtype, out=mask)  # no float64 temporary
                keep = dtype_scalar(1.0 - dropout, mask.dtype)
                np.less(mask, keep, out=mask)
                mask /= keep
                Z *= mask
        return self.A[-1][:n]

    def backward(self, Y: np.ndarray, n: int, scale: float, columns: int | None = None) -> None:
        """Gradients of ``scale`` * loss for the last forward pass into ``grad_W``/``grad_b``.

        ``scale`` multiplies the output delta once, so 1/n (the batch mean) and, for plain SGD,
        the learning rate cost one pass over ``(n, outputs)`` instead of one over every weight.
        ``columns`` is the forward pass's promise: the first layer's gradient rows beyond it are
        zero without a product.
        """
        m = self.model
        L = len(m.weights)
        out_delta = self.delta[-1][:n]
        output_delta(
            m.loss,
            m.activations[-1],
            self.A[-1][:n],
            Y[:n],
            scale / n,
            out_delta,
            self.scratch[-1][:n],
        )
        ones = self.ones[:, :n]
        for layer in range(L - 1, -1, -1):
            delta = self.delta[layer][:n]
            if layer == 0 and columns is not None:
                np.matmul(self.A[0][:n, :columns].T, delta, out=self.grad_W[0][:columns])
                self.grad_W[0][columns:] = 0
            else:
                np.matmul(self.A[layer][:n].T, delta, out=self.grad_W[layer])
            np.matmul(ones, delta, out=self.grad_b[layer][np.newaxis, :])
            if layer > 0:
                below = self.delta[layer - 1][:n]
                np.matmul(delta, m.weights[layer].T, out=below)
                if self.dropout_active:
                    below *= self.mask[layer - 1][:n]
                activation_backward(
                    m.activations[layer - 1], self.A[layer][:n], below, self.scratch[layer - 1][:n]
                )

    def loss_and_gradients(self, X: np.ndarray, Y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Mean loss and its gradients (W0, b0, W1, b1, ...) on one batch, for gradient checks."""
        n = X.shape[0]
        A = self.forward(X, n)
        loss = loss_value(self.model.loss, A, Y)
        self.backward(Y, n, 1.0)
        grads = [g.copy() for pair in zip(self.grad_W, self.grad_b, strict=True) for g in pair]
        return loss, grads


def one_hot(
    labels: np.ndarray, classes: int, low: float = 0.0, high: float = 1.0, dtype=np.float32
) -> np.ndarray:
    """Targets ``(n, classes)``: ``high`` at each label, ``low`` elsewhere; one column if binary."""
    labels = np.asarray(labels)
    if classes == 1:
        return np.where(labels[:, None] > 0, high, low).astype(dtype)
    Y = np.full((labels.shape[0], classes), low, dtype=dtype)
    Y[np.arange(labels.shape[0]), labels] = high
    return Y
