"""The training loop: learning, bitwise resumption, callbacks, stopping, evaluation, fast paths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from shared.augment import augment_batch, warp_batch
from shared.dataset import Dataset
from shared.mlp import MLP
from shared.per_sample import SparseInputSGD
from shared.scaling import InputScaling
from shared.training import (
    ActiveColumns,
    TrainConfig,
    TrainingCallbacks,
    evaluate,
    fit,
    training_rngs,
)


def blobs(n=300, seed=0, classes=3, width=784):
    """Sparse non-negative 'images': each class lights up its own block of pixels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features = np.zeros((n, width), dtype=np.uint8)
    block = width // classes
    for i, label in enumerate(labels):
        cols = rng.choice(block, size=block // 4, replace=False) + label * block
        features[i, cols] = rng.integers(100, 256, size=len(cols))
    return Dataset(features, labels.astype(np.uint8))


def model(
    sizes=(784, 16, 3),
    seed=0,
    dtype="float32",
    scaling=None,
    activations=None,
    loss="cross_entropy",
):
    activations = activations or ("relu",) * (len(sizes) - 2) + ("softmax",)
    return MLP.create(
        sizes,
        activations,
        loss,
        rng=training_rngs(seed)[0],
        dtype=dtype,
        input_scaling=scaling or InputScaling.unit(),
    )


@pytest.mark.parametrize("optimiser", ["sgd", "momentum", "nesterov", "adam"])
def test_every_optimiser_learns_separable_data(optimiser):
    train, test = blobs(seed=1), blobs(seed=2)
    net = model()
    lr = 0.01 if optimiser == "adam" else 0.1
    result = fit(
        net, train, TrainConfig(epochs=5, batch_size=16, optimiser=optimiser, lr=lr), test=test
    )
    assert result.test is not None
    assert result.test.accuracy >= 0.95
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


class Recorder(TrainingCallbacks):
    def __init__(self, stop_after_batches=None):
        self.batches = []
        self.epochs = []
        self.stop_after = stop_after_batches

    def on_batch(self, progress):
        self.batches.append(progress)

    def on_epoch(self, report):
        self.epochs.append(report)

    def should_stop(self):
        return self.stop_after is not None and len(self.batches) >= self.stop_after


def test_callbacks_see_every_batch_and_epoch_with_progress_figures():
    rec = Recorder()
    fit(
        model(),
        blobs(n=100),
        TrainConfig(epochs=2, batch_size=32),
        test=blobs(n=50, seed=3),
        callbacks=rec,
    )
    assert [(b.epoch, b.batch) for b in rec.batches] == [
        (e, b) for e in (0, 1) for b in range(1, 5)
    ]
    assert all(b.batches == 4 and b.samples_per_second > 0 for b in rec.batches)
    assert [r.epoch for r in rec.epochs] == [1, 2]
    assert rec.epochs[-1].test is not None and rec.epochs[-1].test.count == 50


def test_should_stop_ends_training_at_a_batch_boundary():
    rec = Recorder(stop_after_batches=3)
    result = fit(model(), blobs(n=100), TrainConfig(epochs=5, batch_size=10), callbacks=rec)
    assert result.stopped
    assert result.epochs_completed == 0
    assert len(rec.batches) == 3


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(
            epochs=4,
            batch_size=16,
            optimiser="adam",
            lr=0.01,
            dropout=0.2,
            shift=2,
            rotate=10,
            zoom=0.1,
            schedule="cosine",
            weight_decay=1e-4,
        ),
        TrainConfig(
            epochs=4,
            batch_size=16,
            optimiser="nesterov",
            lr=0.05,
            schedule="step",
            step_epochs=1,
            gamma=0.5,
        ),
        TrainConfig(epochs=4, batch_size=1, optimiser="sgd", lr=0.05),
    ],
)
def test_resuming_from_an_epoch_checkpoint_is_bitwise_identical(config):
    data = blobs(n=120)
    whole = model()
    fit(whole, data, config)

    class Keep(TrainingCallbacks):
        saved = None

        def on_epoch(self, report):
            if report.epoch == 2:  # copy: the state references live arrays
                s = report.state
                self.saved = dataclasses.replace(
                    s,
                    parameters=[p.copy() for p in s.parameters],
                    optimiser={k: v.copy() for k, v in s.optimiser.items()},
                )

        def should_stop(self):
            return self.saved is not None

    first = model()
    keep = Keep()
    fit(first, data, config, callbacks=keep)
    resumed = model(seed=99)  # different initial weights: all must come from the checkpoint
    fit(resumed, data, config, resume=keep.saved)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert np.array_equal(a, b)


def test_same_seed_same_training_run_bit_for_bit():
    config = TrainConfig(epochs=2, batch_size=8, dropout=0.3, shift=1.5, rotate=5, seed=5)
    a, b = model(), model()
    fit(a, blobs(n=64), config)
    fit(b, blobs(n=64), config)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert np.array_equal(pa, pb)


def test_sparse_per_sample_sgd_equals_the_dense_update_in_float64():
    data = blobs(n=60)
    for scaling in (InputScaling.unit(), InputScaling.tutorial()):
        sparse = model(
            dtype="float64", scaling=scaling, activations=("sigmoid", "sigmoid"), loss="mse"
        )
        dense = sparse.copy()
        stepper = SparseInputSGD(sparse, data.features)
        X = scaling.apply(data.features, np.float64)
        Y = np.eye(3)[data.labels]
        from shared.mlp import Workspace

        ws = Workspace(dense, 1)
        for i in range(len(data)):
            stepper.step(i, X[i : i + 1], Y[i : i + 1], 0.1)
            ws.forward(X[i : i + 1])
            ws.backward(Y[i : i + 1], 1, 0.1)
            for p, g in zip(
                dense.parameters(),
                [g for pair in zip(ws.grad_W, ws.grad_b, strict=True) for g in pair],
                strict=True,
            ):
                p -= g
        stepper.fold()
        for a, b in zip(sparse.parameters(), dense.parameters(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_evaluate_reports_accuracy_loss_and_confusion():
    net = model()
    data = blobs(n=90, seed=4)
    ev = evaluate(net, data)
    predicted = net.predict_proba(data.features).argmax(axis=1)
    assert ev.count == 90
    assert ev.confusion.sum() == 90
    assert ev.confusion.shape == (3, 3)
    assert ev.accuracy == pytest.approx(np.mean(predicted == data.labels))
    for true, pred in zip(data.labels, predicted, strict=True):
        assert ev.confusion[true, pred] >= 1
    assert ev.loss > 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be >= 1"),
        ("batch_size", 0, "batch_size"),
        ("lr", -1.0, "lr must be > 0"),
        ("optimiser", "lbfgs", "optimiser must be one of"),
        ("dropout", 1.0, "dropout"),
        ("schedule", "linear", "schedule must be one of"),
    ],
)
def test_train_config_names_bad_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_train_config_round_trips_and_refuses_unknown_settings():
    c = TrainConfig(epochs=3, lr=0.5, dropout=0.1)
    assert TrainConfig.from_dict(c.as_dict()) == c
    with pytest.raises(ValueError, match="unknown training settings: colour"):
        TrainConfig.from_dict({"colour": "red"})


def test_integer_shift_moves_pixels_exactly():
    img = np.zeros((1, 784), dtype=np.float32)
    img[0, 10 * 28 + 10] = 1.0
    one = np.ones((1, 1), dtype=np.float32)
    zero = np.zeros((1, 1), dtype=np.float32)
    warp_batch(img, zero, one, 2 * one, -3 * one, 0.0)
    assert img.reshape(28, 28)[7, 12] == pytest.approx(1.0, abs=1e-5)
    assert img.sum() == pytest.approx(1.0, abs=1e-5)


def test_quarter_turn_rotates_the_image():
    img = np.zeros((1, 784), dtype=np.float64)
    img.reshape(28, 28)[5, 14] = 1.0  # above the centre
    one = np.ones((1, 1))
    warp_batch(img, 90 * one, one, 0 * one, 0 * one, 0.0)
    out = img.reshape(28, 28)
    r, c = np.unravel_index(out.argmax(), out.shape)
    assert out.max() > 0.4
    assert abs(r - 13.5) < 1.5 and abs(c - 13.5) > 7  # now beside the centre, not above


def test_augmentation_fills_with_the_blank_value_and_keeps_dtype():
    batch = np.full((4, 784), 0.5, dtype=np.float32)
    augment_batch(batch, np.random.default_rng(0), shift=3, rotate=20, fill=0.01)
    assert batch.dtype == np.float32
    assert batch.min() >= 0.01 - 1e-6 and batch.max() <= 0.5 + 1e-6
    assert np.isclose(batch, 0.01, atol=1e-3).any()  # something came from outside the frame


def centred(n=400, seed=1, classes=3, box=12):
    """Digit-like images: a blank frame and a ``box`` x ``box`` centre, lit by class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    low = (28 - box) // 2
    for i, label in enumerate(labels):
        rows = low + rng.integers(0, box, size=20)
        cols = low + (rng.integers(0, box // classes, size=20) + label * (box // classes))
        images[i, rows, cols] = rng.integers(100, 256, size=20)
    return Dataset(images.reshape(n, 784), labels.astype(np.uint8))


class StopAfter(TrainingCallbacks):
    def __init__(self, batches: int) -> None:
        self.batches, self.seen = batches, 0

    def on_batch(self, progress) -> None:
        self.seen += 1

    def should_stop(self) -> bool:
        return self.seen >= self.batches


@pytest.mark.parametrize(
    "optimiser,weight_decay", [("sgd", 0.0), ("momentum", 1e-3), ("nesterov", 0.0), ("adam", 0.0)]
)
@pytest.mark.parametrize("stop_after", [None, 3])
def test_skipping_blank_pixel_columns_trains_as_the_dense_products_do(
    optimiser, weight_decay, stop_after
):
    pixels = centred()
    ends = ActiveColumns(pixels.features).ends
    assert ends.max() <= 144 < 784  # the pruned path really prunes on this data
    # Float features of the same values take the dense path.
    dense = Dataset(pixels.features.astype(np.float32), pixels.labels)
    config = TrainConfig(
        epochs=2, batch_size=32, optimiser=optimiser, lr=0.05, weight_decay=weight_decay
    )
    trained = []
    for data in (pixels, dense):
        net = model(sizes=(784, 24, 3))
        callbacks = StopAfter(stop_after) if stop_after else None
        fit(net, data, config, callbacks=callbacks)
        trained.append(net.parameters())
    for got, want in zip(*trained, strict=True):  # weights back in pixel order, every time
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
