"""The training loop: mini-batch or per-sample training with callbacks, checkpoints, evaluation."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from shared.augment import augment_batch
from shared.dataset import Dataset
from shared.mlp import MLP, Workspace, loss_value, one_hot
from shared.optim import OPTIMISERS, SCHEDULES, learning_rate, make_optimiser
from shared.per_sample import SparseInputSGD
from shared.scaling import InputScaling


@dataclass(frozen=True)
class TrainConfig:
    """How to train: everything besides the architecture that decides the final weights."""

    epochs: int = 10
    batch_size: int = 128
    optimiser: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_epochs: int = 10
    gamma: float = 0.1
    min_lr: float = 0.0
    warmup: float = 0.0
    dropout: float = 0.0
    shift: float = 0.0
    rotate: float = 0.0
    zoom: float = 0.0
    target_low: float = 0.0
    target_high: float = 1.0
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        problems = config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**data)


def config_problems(c: TrainConfig) -> list[str]:
    """What is out of range in ``c``, one message per field."""
    problems = []
    if c.epochs < 1:
        problems.append(f"epochs must be >= 1, got {c.epochs}")
    if c.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {c.batch_size}")
    if c.optimiser not in OPTIMISERS:
        problems.append(f"optimiser must be one of {OPTIMISERS}, got {c.optimiser!r}")
    if c.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {SCHEDULES}, got {c.schedule!r}")
    if not c.lr > 0:
        problems.append(f"lr must be > 0, got {c.lr}")
    if not 0 <= c.momentum < 1:
        problems.append(f"momentum must be in [0, 1), got {c.momentum}")
    if not 0 <= c.dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {c.dropout}")
    if c.weight_decay < 0:
        problems.append(f"weight_decay must be >= 0, got {c.weight_decay}")
    if c.step_epochs < 1:
        problems.append(f"step_epochs must be >= 1, got {c.step_epochs}")
    if not 0 <= c.warmup < 1:
        problems.append(f"warmup must be in [0, 1), got {c.warmup}")
    if c.shift < 0 or c.rotate < 0 or not 0 <= c.zoom < 1:
        problems.append("shift and rotate must be >= 0 and zoom in [0, 1)")
    return problems


def training_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for initial weights and for shuffling/dropout/augmentation."""
    init_seq, train_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(init_seq), np.random.default_rng(train_seq)


@dataclass
class Evaluation:
    """How a model does on a labelled set."""

    loss: float
    accuracy: float
    confusion: np.ndarray  # (classes, classes): rows are true labels, columns predictions
    count: int

    def summary(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "count": self.count}


def evaluate(
    model: MLP,
    data: Dataset,
    *,
    target_low: float = 0.0,
    target_high: float = 1.0,
    chunk: int = 2048,
) -> Evaluation:
    """Loss, accuracy and confusion matrix of ``model`` on ``data``."""
    classes = model.sizes[-1]
    bins = max(classes, 2)
    confusion = np.zeros((bins, bins), dtype=np.int64)
    total_loss = 0.0
    for start in range(0, len(data), chunk):
        raw = data.features[start : start + chunk]
        labels = data.labels[start : start + chunk]
        out = model.predict_proba(raw)
        Y = one_hot(labels, classes, target_low, target_high, model.dtype)
        total_loss += loss_value(model.loss, out, Y) * len(labels)
        predicted = predictions(out)
        np.add.at(confusion, (labels.astype(np.int64), predicted), 1)
    n = max(len(data), 1)
    return Evaluation(total_loss / n, float(np.trace(confusion)) / n, confusion, len(data))


def predictions(outputs: np.ndarray) -> np.ndarray:
    """Class index per row: the arg-max, or a 0.5 threshold for a single output."""
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0.5).astype(np.int64)
    return outputs.argmax(axis=1)


@dataclass
class TrainingState:
    """Everything needed to continue training bit for bit after ``epoch`` finished epochs."""

    epoch: int
    parameters: list[np.ndarray]
    optimiser: dict[str, np.ndarray]
    rng_state: dict


@dataclass
class BatchProgress:
    epoch: int  # 0-based epoch being trained
    batch: int  # 1-based batches finished in this epoch
    batches: int  # batches per epoch
    loss: float  # mean training loss over this epoch so far
    accuracy: float  # training accuracy over this epoch so far
    samples_per_second: float
    lr: float
    elapsed: float  # seconds since this fit() started


@dataclass
class EpochReport:
    epoch: int  # epochs finished, 1-based
    epochs: int
    train_loss: float
    train_accuracy: float
    test: Evaluation | None
    seconds: float
    samples_per_second: float
    lr: float
    state: TrainingState = field(repr=False)  # references live arrays: copy before keeping

    def summary(self) -> dict:
        out = {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "seconds": self.seconds,
            "samples_per_second": self.samples_per_second,
            "lr": self.lr,
        }
        if self.test is not None:
            out["test_loss"] = self.test.loss
            out["test_accuracy"] = self.test.accuracy
        return out


class TrainingCallbacks:
    """Hooks the loop calls; the defaults do nothing. ``should_stop`` is asked after every batch."""

    def on_batch(self, progress: BatchProgress) -> None:
        pass

    def on_epoch(self, report: EpochReport) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class FitResult:
    epochs_completed: int
    stopped: bool  # True when should_stop() ended training early
    train_seconds: float
    history: list[dict]
    test: Evaluation | None


class ScaledInputs:
    """Rows of the training features, scaled as the model expects, gathered batch by batch.

    Pixels stay uint8 (a quarter of the memory of a float32 copy) and are scaled per batch,
    which costs no more than gathering pre-scaled float rows; other features are scaled once.
    """

    def __init__(self, raw: np.ndarray, scaling: InputScaling, dtype: np.dtype, capacity: int):
        self.raw = raw
        self.scaling = scaling
        self.pixels = raw.dtype == np.uint8
        if self.pixels:
            self.buffer = np.empty((capacity, raw.shape[1]), dtype=np.uint8)
        else:
            self.scaled = scaling.apply(raw, dtype)

    def row(self, i: int, out: np.ndarray) -> None:
        """Write scaled row ``i`` into the 1-D ``out``."""
        if not self.pixels:
            out[...] = self.scaled[i]
            return
        self.scaling.apply_into(self.raw[i], out)

    def gather(self, idx: np.ndarray, out: np.ndarray) -> None:
        """Write the scaled rows ``idx`` into ``out`` (``len(idx)`` rows)."""
        if not self.pixels:
            np.take(self.scaled, idx, axis=0, out=out)
            return
        rows = self.buffer[: len(idx)]
        np.take(self.raw, idx, axis=0, out=rows)
        self.scaling.apply_into(rows, out)


class ActiveColumns:
    """Pixel columns ordered from most to least often non-zero, so a batch stops early.

    MNIST digits leave most of the frame blank: a batch of 128 has ~530 of 784 pixel columns
    non-zero somewhere, and in this order its last non-zero column is at ~630 on average. The
    first layer's two products (forward, weight gradient) stop there. This is exact: a zero
    input adds nothing to either. The training features are copied once in this order and the
    first layer's weights and optimiser state are reordered in place while an epoch runs (and
    back before anything outside the batch loop sees them).
    """

    CHUNK = 8192  # rows per pass when finding each row's last non-zero column

    def __init__(self, raw: np.ndarray) -> None:
        counts = np.count_nonzero(raw, axis=0)
        self.order = np.argsort(-counts, kind="stable")
        self.inverse = np.argsort(self.order)
        self.raw = np.take(raw, self.order, axis=1)  # C order: batches gather whole rows
        width = raw.shape[1]
        self.ends = np.empty(len(raw), dtype=np.int32)  # per row: last non-zero column + 1
        for start in range(0, len(raw), self.CHUNK):
            nonzero = self.raw[start : start + self.CHUNK] != 0
            last = width - np.argmax(nonzero[:, ::-1], axis=1)
            self.ends[start : start + len(nonzero)] = np.where(nonzero.any(axis=1), last, 0)

    def end(self, idx: np.ndarray) -> int:
        """Columns the rows ``idx`` need: every one beyond is zero in all of them."""
        return int(self.ends[idx].max())

    def to_training_order(self, arrays: list[np.ndarray]) -> None:
        for a in arrays:
            a[...] = a[self.order]

    def to_model_order(self, arrays: list[np.ndarray]) -> None:
        for a in arrays:
            a[...] = a[self.inverse]


def fit(
    model: MLP,
    train: Dataset,
    config: TrainConfig,
    *,
    test: Dataset | None = None,
    resume: TrainingState | None = None,
    callbacks: TrainingCallbacks | None = None,
) -> FitResult:
    """Train ``model`` in place on ``train``; evaluate on ``test`` after each epoch if given.

    With ``resume`` the loop continues after ``resume.epoch`` epochs exactly as an uninterrupted
    run would. Stopping on request happens at a batch boundary and discards the unfinished epoch.
    """
    callbacks = callbacks or TrainingCallbacks()
    dt = model.dtype
    classes = model.sizes[-1]
    Y = one_hot(train.labels, classes, config.target_low, config.target_high, dt)
    params = model.parameters()
    optimiser = make_optimiser(
        config.optimiser, params, momentum=config.momentum, weight_decay=config.weight_decay
    )
    _, rng = training_rngs(config.seed)
    first_epoch = 0
    if resume is not None:
        for p, saved in zip(params, resume.parameters, strict=True):
            p[...] = saved
        optimiser.load_state(resume.optimiser)
        rng.bit_generator.state = resume.rng_state
        first_epoch = resume.epoch

    n = len(train)
    bs = min(config.batch_size, n)
    batches = -(-n // bs)
    total_steps = config.epochs * batches
    ws = Workspace(model, bs)
    Yb = np.empty((bs, classes), dtype=dt)
    grads = [g for pair in zip(ws.grad_W, ws.grad_b, strict=True) for g in pair]
    augmenting = config.shift > 0 or config.rotate > 0 or config.zoom > 0
    fill = model.input_scaling.offset
    per_sample = None
    if (
        bs == 1
        and config.optimiser == "sgd"
        and not config.weight_decay
        and not config.dropout
        and not augmenting
    ):
        per_sample = SparseInputSGD(model, train.features)
    columns = None
    # Blank pixels are zero inputs only without an offset; augmentation needs the image layout.
    if (
        per_sample is None
        and not augmenting
        and train.features.dtype == np.uint8
        and model.input_scaling.offset == 0
    ):
        columns = ActiveColumns(train.features)
    first_layer = [params[0], *optimiser.param_state(0)]
    inputs = ScaledInputs(columns.raw if columns else train.features, model.input_scaling, dt, bs)
    history: list[dict] = []
    evaluation = None
    started = time.perf_counter()
    lr = config.lr

    for epoch in range(first_epoch, config.epochs):
        epoch_start = time.perf_counter()
        order = rng.permutation(n) if config.shuffle else np.arange(n)
        loss_sum = 0.0
        correct = 0
        seen = 0
        if columns:
            columns.to_training_order(first_layer)
        try:
            for batch in range(batches):
                idx = order[batch * bs : (batch + 1) * bs]
                nb = len(idx)
                Xb = ws.A[0][:nb]
                if per_sample is not None:  # one row: slicing beats the gathers' call overhead
                    i = int(idx[0])
                    inputs.row(i, Xb[0])
                    Ybatch = Y[i : i + 1]
                else:
                    inputs.gather(idx, Xb)
                    Ybatch = Yb[:nb]
                    np.take(Y, idx, axis=0, out=Ybatch)
                if augmenting:
                    augment_batch(
                        Xb,
                        rng,
                        shift=config.shift,
                        rotate=config.rotate,
                        zoom=config.zoom,
                        fill=fill,
                    )
                lr = learning_rate(
                    config.schedule,
                    config.lr,
                    (epoch * batches + batch) / total_steps,
                    epoch=epoch,
                    step_epochs=config.step_epochs,
                    gamma=config.gamma,
                    min_lr=config.min_lr,
                    warmup=config.warmup,
                )
                if per_sample is not None:
                    out = per_sample.step(i, Xb, Ybatch, lr)
                else:
                    end = columns.end(idx) if columns else None
                    out = ws.forward_filled(nb, config.dropout, rng, end)
                loss_sum += loss_value(model.loss, out, Ybatch) * nb
                correct += int(np.count_nonzero(predictions(out) == train.labels[idx]))
                seen += nb
                if per_sample is None:
                    ws.backward(Yb, nb, optimiser.grad_scale(lr), end)
                    optimiser.step(grads, lr)
                now = time.perf_counter()
                callbacks.on_batch(
                    BatchProgress(
                        epoch,
                        batch + 1,
                        batches,
                        loss_sum / seen,
                        correct / seen,
                        seen / max(now - epoch_start, 1e-9),
                        lr,
                        now - started,
                    )
                )
                if callbacks.should_stop():
                    if per_sample is not None:
                        per_sample.fold()
                    return FitResult(
                        epoch, True, time.perf_counter() - started, history, evaluation
                    )
            if per_sample is not None:
                per_sample.fold()
        finally:
            if columns:
                columns.to_model_order(first_layer)
        seconds = time.perf_counter() - epoch_start
        if test is not None:
            evaluation = evaluate(
                model, test, target_low=config.target_low, target_high=config.target_high
            )
        state = TrainingState(
            epoch + 1, params, optimiser.state_arrays(), dict(rng.bit_generator.state)
        )
        report = EpochReport(
            epoch + 1,
            config.epochs,
            loss_sum / seen,
            correct / seen,
            evaluation,
            seconds,
            seen / seconds,
            lr,
            state,
        )
        history.append(report.summary())
        callbacks.on_epoch(report)
    return FitResult(config.epochs, False, time.perf_counter() - started, history, evaluation)
