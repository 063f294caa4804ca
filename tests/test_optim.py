"""Optimisers against plain float64 reference formulas, and the learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.optim import Adam, learning_rate, make_optimiser


def run(name, steps, lr=0.1, **kwargs):
    """Apply ``steps`` updates with fixed pseudo-random gradients; returns the parameter."""
    p = np.linspace(-1, 1, 6).reshape(2, 3)
    opt = make_optimiser(name, [p], **kwargs)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        g = rng.normal(size=p.shape)
        opt.step([g * opt.grad_scale(lr)], lr)
    return p


def reference(name, steps, lr=0.1, momentum=0.9, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    p = np.linspace(-1, 1, 6).reshape(2, 3)
    v = np.zeros_like(p)
    m = np.zeros_like(p)
    s = np.zeros_like(p)
    rng = np.random.default_rng(0)
    for t in range(1, steps + 1):
        g = rng.normal(size=p.shape) + weight_decay * p
        if name == "sgd":
            p = p - lr * g
        elif name == "momentum":
            v = momentum * v + g
            p = p - lr * v
        elif name == "nesterov":
            v = momentum * v + g
            p = p - lr * (g + momentum * v)
        elif name == "adam":
            m = b1 * m + (1 - b1) * g
            s = b2 * s + (1 - b2) * g * g
            m_hat, s_hat = m / (1 - b1**t), s / (1 - b2**t)
            # The paper's 'efficient' ordering: eps is added before bias correction.
            p = p - lr * m_hat / (np.sqrt(s_hat) + eps / math.sqrt(1 - b2**t))
    return p


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_optimiser_matches_reference_formula(name, weight_decay):
    lr = 0.01 if name == "adam" else 0.1
    got = run(name, 25, lr=lr, weight_decay=weight_decay)
    want = reference(name, 25, lr=lr, weight_decay=weight_decay)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_adam_state_round_trips():
    p = np.ones(4)
    opt = Adam([p])
    opt.step([np.full(4, 0.5)], 0.1)
    saved = {k: v.copy() for k, v in opt.state_arrays().items()}
    q = np.ones(4)
    other = Adam([q])
    other.load_state(saved)
    assert other.t == 1
    np.testing.assert_array_equal(other.m[0], opt.m[0])
    np.testing.assert_array_equal(other.v[0], opt.v[0])


def test_unknown_optimiser_is_named():
    with pytest.raises(ValueError, match="'rmsprop'"):
        make_optimiser("rmsprop", [np.zeros(2)])


def test_step_schedule_decays_every_step_epochs():
    lrs = [learning_rate("step", 1.0, 0.0, epoch=e, step_epochs=3, gamma=0.5) for e in range(7)]
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_cosine_schedule_runs_from_base_to_min():
    assert learning_rate("cosine", 0.2, 0.0, min_lr=0.01) == pytest.approx(0.2)
    assert learning_rate("cosine", 0.2, 0.5, min_lr=0.01) == pytest.approx(0.105)
    assert learning_rate("cosine", 0.2, 1.0, min_lr=0.01) == pytest.approx(0.01)


def test_warmup_ramps_up_then_hands_over():
    assert learning_rate("constant", 1.0, 0.0, warmup=0.1) == pytest.approx(0.1)
    assert learning_rate("constant", 1.0, 0.05, warmup=0.1) == pytest.approx(0.55)
    assert learning_rate("constant", 1.0, 0.2, warmup=0.1) == 1.0


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'linear'"):
        learning_rate("linear", 0.1, 0.5)
