"""The network's math: known values from the tutorials, gradient checks, seeding and dtypes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shared.dataset import TOY_PEOPLE
from shared.mlp import (
    HIDDEN_ACTIVATIONS,
    LOSS_OUTPUTS,
    MLP,
    Workspace,
    activate,
    check_architecture,
    initial_weights,
    one_hot,
)
from shared.scaling import InputScaling
from shared.training import TrainConfig, fit


def hand_built(sizes, weights, biases, activations=None):
    activations = activations or ("sigmoid",) * (len(sizes) - 1)
    return MLP(
        sizes,
        activations,
        "mse",
        [np.array(w, dtype=np.float64) for w in weights],
        [np.array(b, dtype=np.float64) for b in biases],
        InputScaling.identity(),
    )


def test_single_sigmoid_neuron_matches_the_tutorial_value():
    neuron = hand_built((2, 1), [[[0.0], [1.0]]], [[4.0]])
    out = neuron.forward(np.array([[2.0, 3.0]]))
    assert out[0, 0] == pytest.approx(0.9990889488055994, rel=1e-14, abs=0)


def test_two_two_one_network_matches_the_tutorial_value():
    net = hand_built((2, 2, 1), [[[0.0, 0.0], [1.0, 1.0]], [[0.0], [1.0]]], [[0.0, 0.0], [0.0]])
    out = net.forward(np.array([[2.0, 3.0]]))
    assert out[0, 0] == pytest.approx(0.7216325609518421, rel=1e-14, abs=0)


def test_toy_people_train_to_separate_emily_and_frank():
    init = np.random.default_rng(0)
    net = MLP.create(
        (2, 2, 1),
        ("sigmoid", "sigmoid"),
        "mse",
        rng=init,
        init="normal",
        dtype="float64",
        input_scaling=InputScaling.identity(),
    )
    fit(
        net,
        TOY_PEOPLE,
        TrainConfig(epochs=1000, batch_size=1, optimiser="sgd", lr=0.1, shuffle=False),
    )
    emily, frank = net.forward(np.array([[-7.0, -3.0], [20.0, 2.0]]))[:, 0]
    assert emily > 0.9
    assert frank < 0.1


def valid_heads():
    """Every (output activation, loss) pair the network accepts."""
    return [(out, loss) for loss, outs in LOSS_OUTPUTS.items() for out in outs]


def assert_backprop_matches_central_differences(net, X, Y):
    _, analytic = Workspace(net, X.shape[0]).loss_and_gradients(X, Y)
    for a, n in zip(analytic, numerical_gradients(net, X, Y), strict=True):
        np.testing.assert_allclose(a, n, rtol=1e-5, atol=1e-8)


def numerical_gradients(net, X, Y, eps=1e-6):
    ws = Workspace(net, X.shape[0])
    grads = []
    for p in net.parameters():
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            saved = p[i]
            p[i] = saved + eps
            up, _ = ws.loss_and_gradients(X, Y)
            p[i] = saved - eps
            down, _ = ws.loss_and_gradients(X, Y)
            p[i] = saved
            g[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize(
    ("hidden", "head"), list(itertools.product(HIDDEN_ACTIVATIONS, valid_heads()))
)
def test_backprop_matches_central_differences(hidden, head):
    output, loss = head
    rng = np.random.default_rng(7)
    net = MLP.create(
        (5, 4, 3, 3),
        (hidden, hidden, output),
        loss,
        rng=rng,
        dtype="float64",
        input_scaling=InputScaling.identity(),
    )
    for b in net.biases:
        b[...] = rng.normal(0, 0.1, b.shape)  # non-zero biases exercise their gradients
    X = rng.normal(size=(6, 5))
    if loss == "cross_entropy":
        Y = one_hot(rng.integers(0, 3, 6), 3, dtype=np.float64)
    else:
        Y = rng.uniform(0.05, 0.95, size=(6, 3))
    assert_backprop_matches_central_differences(net, X, Y)


def test_gradient_check_also_holds_for_a_single_binary_output():
    rng = np.random.default_rng(3)
    net = MLP.create(
        (3, 4, 1),
        ("tanh", "sigmoid"),
        "bce",
        rng=rng,
        dtype="float64",
        input_scaling=InputScaling.identity(),
    )
    X = rng.normal(size=(5, 3))
    Y = rng.integers(0, 2, size=(5, 1)).astype(np.float64)
    assert_backprop_matches_central_differences(net, X, Y)


def test_float32_network_stays_float32_through_training():
    rng = np.random.default_rng(0)
    net = MLP.create(
        (6, 5, 3),
        ("relu", "softmax"),
        "cross_entropy",
        rng=rng,
        input_scaling=InputScaling.identity(),
    )
    from shared.dataset import Dataset

    data = Dataset(rng.normal(size=(40, 6)), rng.integers(0, 3, 40))
    with np.errstate(all="raise"):
        fit(net, data, TrainConfig(epochs=2, batch_size=8, optimiser="adam"))
    assert all(p.dtype == np.float32 for p in net.parameters())
    assert net.forward(data.features).dtype == np.float32
    ws = Workspace(net, 8)
    assert all(a.dtype == np.float32 for a in ws.A + ws.delta + ws.grad_W + ws.grad_b)


def test_same_seed_gives_identical_weights_and_different_seed_does_not():
    def make(seed):
        return MLP.create(
            (784, 32, 10), ("relu", "softmax"), "cross_entropy", rng=np.random.default_rng(seed)
        )

    a, b, c = make(1), make(1), make(2)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert np.array_equal(pa, pb)
        assert pa.shape == pc.shape
    assert not np.array_equal(a.weights[0], c.weights[0])


@pytest.mark.parametrize(
    ("scheme", "activation", "expected_std"),
    [
        ("normal", "sigmoid", 400**-0.5),
        ("he", "relu", np.sqrt(2 / 400)),
        ("glorot", "tanh", np.sqrt(6 / 600) / np.sqrt(3)),
        ("auto", "relu", np.sqrt(2 / 400)),
        ("auto", "tanh", np.sqrt(6 / 600) / np.sqrt(3)),
    ],
)
def test_initialisations_have_their_documented_spread(scheme, activation, expected_std):
    W = initial_weights(400, 200, scheme, activation, np.random.default_rng(0), np.float64)
    assert W.shape == (400, 200)
    assert W.std() == pytest.approx(expected_std, rel=0.02)
    assert abs(W.mean()) < expected_std * 0.02


@pytest.mark.parametrize(
    ("sizes", "activations", "loss", "message"),
    [
        ((784,), (), "mse", "at least an input and an output"),
        ((784, 0, 10), ("relu", "softmax"), "cross_entropy", r"sizes\[1\] must be a positive"),
        ((784, 10), ("relu", "softmax"), "cross_entropy", "one entry per layer"),
        ((784, 30, 10), ("softmax", "softmax"), "cross_entropy", r"activations\[0\]"),
        ((784, 30, 10), ("relu", "relu"), "mse", "output activation"),
        ((784, 30, 10), ("relu", "sigmoid"), "cross_entropy", "loss 'cross_entropy' needs"),
        ((784, 30, 10), ("relu", "softmax"), "hinge", "loss must be one of"),
        ((784, 1), ("softmax",), "cross_entropy", "at least two units"),
    ],
)
def test_bad_architectures_are_refused_with_the_reason(sizes, activations, loss, message):
    with pytest.raises(ValueError, match=message):
        check_architecture(sizes, activations, loss)


def test_wrong_input_width_is_refused():
    net = MLP.create((4, 3, 2), ("relu", "softmax"), "cross_entropy", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        net.forward(np.zeros((2, 5)))


def test_predict_proba_applies_the_models_input_scaling():
    net = MLP.create(
        (3, 2),
        ("softmax",),
        "cross_entropy",
        rng=np.random.default_rng(0),
        input_scaling=InputScaling.tutorial(),
    )
    raw = np.array([[0, 128, 255]], dtype=np.uint8)
    scaled = 0.01 + 0.99 * raw.astype(np.float32) / 255
    np.testing.assert_allclose(net.predict_proba(raw), net.forward(scaled), rtol=1e-6)


def test_softmax_outputs_are_probabilities_even_for_huge_inputs():
    net = MLP.create(
        (2, 3),
        ("softmax",),
        "cross_entropy",
        rng=np.random.default_rng(0),
        input_scaling=InputScaling.identity(),
    )
    out = net.forward(np.array([[1e4, -1e4], [0.0, 0.0]], dtype=np.float32))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spread", [3.0, 60.0, 400.0, 5000.0])
def test_softmax_equals_the_per_row_float64_reference_whatever_the_rows_scale(dtype, spread):
    """Rows far apart in scale take the per-row path; close ones the batch-maximum path."""
    rng = np.random.default_rng(int(spread))
    logits = rng.normal(0.0, 1.0, (64, 10)) * rng.uniform(0.1, 1.0, (64, 1)) * spread
    logits[0] -= spread  # one row well below the others
    got = logits.astype(dtype)
    exact = got.astype(np.float64)  # the reference starts from the same rounded logits
    shifted = exact - exact.max(axis=1, keepdims=True)
    want = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    activate("softmax", got)
    assert np.isfinite(got).all()
    # An absolute rounding error in exp's argument becomes the same relative error in its value;
    # arguments reach the batch's whole spread before each row's own maximum is subtracted.
    spread_seen = float(exact.max() - exact.min())
    rtol = 4 * np.finfo(dtype).eps * max(1.0, spread_seen)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=np.finfo(dtype).tiny)
