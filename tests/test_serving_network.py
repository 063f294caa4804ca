"""The serving form of a network answers as the network's own forward pass does."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from inference_service.serving_network import PYTHON_TAIL_ROWS, REUSED_ROWS, ServingNetwork
from shared.mlp import MLP
from shared.scaling import InputScaling

ARCHITECTURES = [
    ((784, 32, 16, 10), ("relu", "relu", "softmax"), "cross_entropy", InputScaling.unit()),
    ((784, 20, 10), ("sigmoid", "sigmoid"), "mse", InputScaling.tutorial()),
    ((784, 12, 10), ("tanh", "identity"), "mse", InputScaling.unit()),
    ((784, 8, 1), ("relu", "sigmoid"), "bce", InputScaling.tutorial()),
]
# Folding changes the order of float32 sums over 784 products: the last bits differ, which for
# an identity output near zero is ~3e-7 absolute.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
ROW_COUNTS = sorted({1, PYTHON_TAIL_ROWS, PYTHON_TAIL_ROWS + 1, REUSED_ROWS, REUSED_ROWS + 3})


def network(sizes, activations, loss, scaling, dtype="float32") -> MLP:
    model = MLP.create(
        sizes,
        activations,
        loss,
        rng=np.random.default_rng(7),
        dtype=dtype,
        input_scaling=scaling,
    )
    for b in model.biases:  # non-zero biases, so folding them in is tested too
        b[...] = np.random.default_rng(8).normal(0, 0.5, b.shape)
    return model


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8)


@pytest.mark.parametrize("sizes,activations,loss,scaling", ARCHITECTURES)
@pytest.mark.parametrize("n", ROW_COUNTS)
def test_pixels_and_scaled_rows_give_the_forward_pass(sizes, activations, loss, scaling, n):
    model = network(sizes, activations, loss, scaling)
    serving = ServingNetwork(model)
    raw = pixels(n)
    want = model.predict_proba(raw)
    from_pixels = np.array(serving.forward_pixels(raw))
    from_scaled = np.array(serving.forward_scaled(scaling.apply(raw, model.dtype)))
    assert from_pixels.shape == from_scaled.shape == (n, sizes[-1])
    np.testing.assert_allclose(from_pixels, want, **TOLERANCE)
    np.testing.assert_allclose(from_scaled, want, **TOLERANCE)


def test_float64_models_fold_in_float64():
    sizes, activations, loss, scaling = ARCHITECTURES[1]
    model = network(sizes, activations, loss, scaling, dtype="float64")
    raw = pixels(3)
    got = np.array(ServingNetwork(model).forward_pixels(raw))
    np.testing.assert_allclose(got, model.predict_proba(raw), rtol=1e-12, atol=1e-15)


def test_a_result_survives_the_same_threads_next_call():
    model = network(*ARCHITECTURES[0])
    serving = ServingNetwork(model)
    for n in (1, PYTHON_TAIL_ROWS + 1):
        first = serving.forward_pixels(pixels(n, seed=1))
        kept = [row[:] for row in first]
        serving.forward_pixels(pixels(n, seed=2))
        assert first == kept


def test_threads_do_not_share_buffers():
    model = network(*ARCHITECTURES[0])
    serving = ServingNetwork(model)
    inputs = {seed: pixels(PYTHON_TAIL_ROWS + 2, seed) for seed in range(4)}
    want = {seed: model.predict_proba(raw) for seed, raw in inputs.items()}
    failures: list[int] = []
    barrier = threading.Barrier(len(inputs))

    def run(seed: int) -> None:
        barrier.wait()
        for _ in range(200):
            got = np.array(serving.forward_pixels(inputs[seed]))
            if not np.allclose(got, want[seed], **TOLERANCE):
                failures.append(seed)
                return

    threads = [threading.Thread(target=run, args=(seed,)) for seed in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_extreme_logits_stay_finite():
    sizes, activations, loss, scaling = ARCHITECTURES[0]
    model = network(sizes, activations, loss, scaling)
    model.weights[-1] *= 1e4  # logits in the hundreds of thousands: exp would overflow
    got = np.array(ServingNetwork(model).forward_pixels(pixels(2)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(got, model.predict_proba(pixels(2)), **TOLERANCE)
