"""A training job as JSON: its schema and the one validation that submitter and trainer share.

A job is a JSON object. ``preset`` (a name from ``shared.presets.PRESETS``) supplies a base that
explicit fields override; every ``TrainConfig`` field (``epochs``, ``batch_size``, ``optimiser``,
``lr``, ``seed``, ...) is a top-level field. The schema is documented in trainer_service/JOBS.md.
Every refusal is a ``JobSpecError`` whose ``field`` names the offending field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from shared import defaults
from shared.dataset import Dataset
from shared.mlp import DTYPES, INITIALISATIONS, MLP, check_architecture
from shared.presets import PRESETS
from shared.scaling import InputScaling
from shared.training import TrainConfig, training_rngs

# Job ids and model names become parts of Redis keys and publication ids: keep them plain.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MNIST_INPUTS = 784
SCALINGS = {
    "unit": InputScaling.unit(),
    "tutorial": InputScaling.tutorial(),
    "identity": InputScaling.identity(),
}
TRAINING_FIELDS = {f.name: f for f in fields(TrainConfig)}
JOB_FIELDS = frozenset(
    {
        "model",
        "preset",
        "dataset",
        "limit",
        "sizes",
        "activations",
        "loss",
        "init",
        "dtype",
        "input_scaling",
        "warm_start",
        "publish",
    }
    | set(TRAINING_FIELDS)
)
PUBLISH_FIELDS = frozenset({"every_epoch", "at_end", "min_accuracy"})
WARM_START_FIELDS = frozenset({"model", "version"})
INLINE_FIELDS = frozenset({"features", "labels"})
MAX_SEED = 2**63 - 1
_GIVEN: Any = object()  # marks "read the value from data[name]"


class JobSpecError(ValueError):
    """A job refused by validation; ``field`` names the offending field (dotted for nesting)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class PublishPolicy:
    """When the job publishes snapshots, and the test accuracy a snapshot needs to be published."""

    every_epoch: bool = False
    at_end: bool = True
    min_accuracy: float | None = None


@dataclass(frozen=True)
class WarmStart:
    """Start from a published snapshot: ``version`` is a number, ``latest`` or an alias."""

    model: str
    version: str = "latest"


@dataclass(frozen=True)
class JobSpec:
    """A validated job: everything a worker needs besides the data files."""

    model: str
    sizes: tuple[int, ...]
    activations: tuple[str, ...]
    loss: str
    init: str
    dtype: str
    input_scaling: InputScaling
    training: TrainConfig
    dataset: str  # "mnist" or "inline"
    inline: Dataset | None
    limit: int | None
    warm_start: WarmStart | None
    publish: PublishPolicy
    preset: str | None = None

    @property
    def classes(self) -> int:
        """Number of classes the labels range over (10 for MNIST)."""
        if self.inline is None:
            return defaults.MNIST_CLASSES
        return max(int(self.inline.labels.max()) + 1, 2)

    def initial_model(self) -> MLP:
        """The freshly initialised network, seeded from ``training.seed``."""
        init_rng, _ = training_rngs(self.training.seed)
        return MLP.create(
            self.sizes,
            self.activations,
            self.loss,
            rng=init_rng,
            init=self.init,
            dtype=self.dtype,
            input_scaling=self.input_scaling,
        )

    def as_dict(self) -> dict[str, Any]:
        """Every field explicit, in the job schema: validating it again gives the same spec."""
        out: dict[str, Any] = {
            "model": self.model,
            "sizes": list(self.sizes),
            "activations": list(self.activations),
            "loss": self.loss,
            "init": self.init,
            "dtype": self.dtype,
            "input_scaling": self.input_scaling.as_dict(),
            **self.training.as_dict(),
            "limit": self.limit,
            "warm_start": None
            if self.warm_start is None
            else {"model": self.warm_start.model, "version": self.warm_start.version},
            "publish": {
                "every_epoch": self.publish.every_epoch,
                "at_end": self.publish.at_end,
                "min_accuracy": self.publish.min_accuracy,
            },
        }
        if self.inline is None:
            out["dataset"] = "mnist"
        else:
            out["dataset"] = {
                "features": self.inline.features.tolist(),
                "labels": self.inline.labels.tolist(),
            }
        return out

    def fingerprint(self) -> str:
        """SHA-256 of the canonical form: a checkpoint is only resumed by the job that wrote it."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_job_json(text: str | bytes) -> JobSpec:
    """Validate a job given as JSON text."""
    if len(text) > defaults.MAX_JOB_BYTES:
        raise JobSpecError("job", f"is {len(text)} bytes; the limit is {defaults.MAX_JOB_BYTES}")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise JobSpecError("job", f"is not valid JSON: {exc}") from None
    return parse_job(data)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_job(data: Any) -> JobSpec:
    """Validate a decoded job (a dict); raise JobSpecError naming the first bad field."""
    if not isinstance(data, dict):
        raise JobSpecError("job", f"must be a JSON object, got {_kind(data)}")
    _refuse_unknown(data, JOB_FIELDS)

    preset_name = data.get("preset")
    preset = None
    if preset_name is not None:
        preset_name = _string(data, "preset")
        if preset_name not in PRESETS:
            raise JobSpecError(
                "preset", f"unknown preset {preset_name!r} (known: {', '.join(PRESETS)})"
            )
        preset = PRESETS[preset_name]

    model = data.get("model", preset_name)
    if model is None:
        raise JobSpecError("model", "is required (or give a preset, whose name is the default)")
    model = _string(data, "model", value=model)
    if not MODEL_NAME_PATTERN.fullmatch(model):
        raise JobSpecError("model", f"must match {MODEL_NAME_PATTERN.pattern}, got {model!r}")

    inline = _dataset(data.get("dataset", "mnist"))
    limit = data.get("limit")
    if limit is not None:
        limit = _integer(data, "limit", 1, 10**9)

    if "sizes" in data:
        sizes = tuple(_sizes(data["sizes"]))
    elif preset is not None:
        sizes = preset.sizes
    else:
        raise JobSpecError("sizes", "is required without a preset, e.g. [784, 128, 10]")
    if "activations" in data:
        activations = tuple(_activations(data["activations"]))
    elif preset is not None:
        activations = preset.activations
    else:
        raise JobSpecError("activations", "is required without a preset, e.g. ['relu', 'softmax']")
    loss = _string(data, "loss") if "loss" in data else (preset.loss if preset else "cross_entropy")
    _architecture(sizes, activations, loss)

    init = (
        _choice(data, "init", INITIALISATIONS)
        if "init" in data
        else (preset.init if preset else "auto")
    )
    dtype = _choice(data, "dtype", tuple(DTYPES)) if "dtype" in data else "float32"
    if "input_scaling" in data:
        scaling = _scaling(data["input_scaling"])
    elif preset is not None:
        scaling = preset.input_scaling
    else:
        scaling = InputScaling.unit() if inline is None else InputScaling.identity()

    training = _training(data, preset.config if preset else TrainConfig())
    spec = JobSpec(
        model,
        tuple(sizes),
        tuple(activations),
        loss,
        init,
        dtype,
        scaling,
        training,
        "mnist" if inline is None else "inline",
        inline,
        limit,
        _warm_start(data.get("warm_start")),
        _publish(data.get("publish")),
        preset_name,
    )
    _fits_data(spec)
    return spec


def check_job_id(job_id: Any) -> str:
    """``job_id`` if it is a usable job id, else JobSpecError."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise JobSpecError("job_id", f"must match {JOB_ID_PATTERN.pattern}, got {job_id!r}")
    return job_id


# --- one function per field ---------------------------------------------------------------------


def _refuse_unknown(data: dict, known: frozenset[str], prefix: str = "") -> None:
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        name = unknown[0] if unknown[0].isidentifier() else repr(unknown[0])
        raise JobSpecError(prefix + name, f"unknown field (known: {', '.join(sorted(known))})")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string(data: dict, name: str, *, value: Any = _GIVEN) -> str:
    value = data[name] if value is _GIVEN else value
    if not isinstance(value, str):
        raise JobSpecError(name, f"must be a string, got {_kind(value)}")
    return value


def _choice(data: dict, name: str, choices: tuple[str, ...]) -> str:
    value = _string(data, name)
    if value not in choices:
        raise JobSpecError(name, f"must be one of {list(choices)}, got {value!r}")
    return value


def _integer(
    data: dict, name: str, low: int, high: int, *, value: Any = _GIVEN, label: str | None = None
) -> int:
    label = label or name
    value = data[name] if value is _GIVEN else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobSpecError(label, f"must be an integer, got {_kind(value)} {value!r}")
    if not low <= value <= high:
        raise JobSpecError(label, f"must be in [{low}, {high}], got {value}")
    return value


def _number(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobSpecError(label, f"must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise JobSpecError(label, f"must be finite, got {value}")
    return float(value)


def _boolean(value: Any, label: str) -> bool:
    if not isinstance(value, bool):
        raise JobSpecError(label, f"must be true or false, got {_kind(value)}")
    return value


def _sizes(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise JobSpecError("sizes", f"must be a list of layer widths, got {_kind(value)}")
    if not 2 <= len(value) <= defaults.MAX_LAYERS + 1:
        raise JobSpecError(
            "sizes",
            f"needs 2 to {defaults.MAX_LAYERS + 1} widths "
            f"(input, hidden..., output), got {len(value)}",
        )
    return [
        _integer({}, "", 1, defaults.MAX_LAYER_WIDTH, value=w, label=f"sizes[{i}]")
        for i, w in enumerate(value)
    ]


def _activations(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise JobSpecError("activations", f"must be a list of names, got {_kind(value)}")
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise JobSpecError(f"activations[{i}]", f"must be a string, got {_kind(name)}")
    return list(value)


def _architecture(
    sizes: list[int] | tuple[int, ...], activations: list[str] | tuple[str, ...], loss: str
) -> None:
    try:
        check_architecture(sizes, activations, loss)
    except ValueError as exc:
        message = str(exc)
        field = (
            "loss"
            if message.startswith("loss")
            else "sizes"
            if message.startswith(("sizes", "a softmax"))
            else "activations"
        )
        raise JobSpecError(field, message) from None
    weights = sum((sizes[i] + 1) * sizes[i + 1] for i in range(len(sizes) - 1)) * 8
    if weights > defaults.MAX_SNAPSHOT_BYTES:
        raise JobSpecError(
            "sizes", f"make {weights} bytes of weights; the limit is {defaults.MAX_SNAPSHOT_BYTES}"
        )


def _scaling(value: Any) -> InputScaling:
    if isinstance(value, str):
        if value not in SCALINGS:
            raise JobSpecError(
                "input_scaling",
                f"must be one of {list(SCALINGS)} or {{'offset': x, 'scale': y}}, got {value!r}",
            )
        return SCALINGS[value]
    if not isinstance(value, dict) or set(value) != {"offset", "scale"}:
        raise JobSpecError("input_scaling", "must be a name or exactly {'offset': x, 'scale': y}")
    offset = _number(value["offset"], "input_scaling.offset")
    scale = _number(value["scale"], "input_scaling.scale")
    if scale == 0:
        raise JobSpecError("input_scaling.scale", "must not be 0")
    return InputScaling(offset, scale)


def _training(data: dict, base: TrainConfig) -> TrainConfig:
    settings = base.as_dict()
    for name, spec_field in TRAINING_FIELDS.items():
        if name not in data:
            continue
        value = data[name]
        if spec_field.type in ("int", int):
            settings[name] = _integer(data, name, -(2**63), 2**63)
        elif spec_field.type in ("float", float):
            settings[name] = _number(value, name)
        elif spec_field.type in ("bool", bool):
            settings[name] = _boolean(value, name)
        else:
            settings[name] = _string(data, name)
    limits = {
        "epochs": (1, defaults.MAX_EPOCHS),
        "batch_size": (1, defaults.MAX_BATCH_SIZE),
        "seed": (0, MAX_SEED),
        "step_epochs": (1, defaults.MAX_EPOCHS),
    }
    for name, (low, high) in limits.items():
        _integer(settings, name, low, high)
    if not 0 < settings["lr"] <= defaults.MAX_LEARNING_RATE:
        raise JobSpecError(
            "lr", f"must be in (0, {defaults.MAX_LEARNING_RATE}], got {settings['lr']}"
        )
    try:
        return TrainConfig(**settings)
    except ValueError as exc:
        first = str(exc).split("; ")[0]
        field = first.split()[0]
        raise JobSpecError(field if field in TRAINING_FIELDS else "training", first) from None


def _dataset(value: Any) -> Dataset | None:
    if value == "mnist":
        return None
    if not isinstance(value, dict):
        raise JobSpecError(
            "dataset",
            f'must be "mnist" or {{"features": [[...]], "labels": [...]}}, got {value!r:.80}',
        )
    _refuse_unknown(value, INLINE_FIELDS, "dataset.")
    features, labels = value.get("features"), value.get("labels")
    if not isinstance(features, list) or not features:
        raise JobSpecError("dataset.features", "must be a non-empty list of rows")
    if len(features) > defaults.MAX_INLINE_EXAMPLES:
        raise JobSpecError(
            "dataset.features",
            f"holds {len(features)} examples; inline data is "
            f"capped at {defaults.MAX_INLINE_EXAMPLES}",
        )
    width = None
    for i, row in enumerate(features):
        if not isinstance(row, list) or not row:
            raise JobSpecError(f"dataset.features[{i}]", "must be a non-empty list of numbers")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise JobSpecError(
                f"dataset.features[{i}]", f"has {len(row)} values, row 0 has {width}"
            )
        for j, x in enumerate(row):
            _number(x, f"dataset.features[{i}][{j}]")
    if width is not None and width > defaults.MAX_LAYER_WIDTH:
        raise JobSpecError(
            "dataset.features", f"rows have {width} values; at most {defaults.MAX_LAYER_WIDTH}"
        )
    if not isinstance(labels, list) or len(labels) != len(features):
        raise JobSpecError("dataset.labels", f"must be a list of {len(features)} class indices")
    for i, y in enumerate(labels):
        _integer({}, "", 0, defaults.MAX_LAYER_WIDTH - 1, value=y, label=f"dataset.labels[{i}]")
    return Dataset(np.array(features, dtype=np.float64), np.array(labels, dtype=np.int64))


def _warm_start(value: Any) -> WarmStart | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise JobSpecError(
            "warm_start",
            f'must be {{"model": name, "version": n|"latest"|alias}}, got {_kind(value)}',
        )
    _refuse_unknown(value, WARM_START_FIELDS, "warm_start.")
    if "model" not in value:
        raise JobSpecError("warm_start.model", "is required")
    model = value["model"]
    if not isinstance(model, str) or not MODEL_NAME_PATTERN.fullmatch(model):
        raise JobSpecError("warm_start.model", f"must be a model name, got {value['model']!r}")
    version = value.get("version", "latest")
    if isinstance(version, int) and not isinstance(version, bool):
        if version < 1:
            raise JobSpecError("warm_start.version", f"must be >= 1, got {version}")
        version = str(version)
    if not isinstance(version, str) or not MODEL_NAME_PATTERN.fullmatch(version):
        raise JobSpecError(
            "warm_start.version", f'must be a version number, "latest" or an alias, got {version!r}'
        )
    return WarmStart(model, version)


def _publish(value: Any) -> PublishPolicy:
    if value is None:
        return PublishPolicy()
    if not isinstance(value, dict):
        raise JobSpecError("publish", f"must be an object, got {_kind(value)}")
    _refuse_unknown(value, PUBLISH_FIELDS, "publish.")
    every = _boolean(value.get("every_epoch", False), "publish.every_epoch")
    at_end = _boolean(value.get("at_end", True), "publish.at_end")
    if not (every or at_end):
        raise JobSpecError("publish", "every_epoch or at_end must be true, or nothing is published")
    minimum = value.get("min_accuracy")
    if minimum is not None:
        minimum = _number(minimum, "publish.min_accuracy")
        if not 0 <= minimum <= 1:
            raise JobSpecError("publish.min_accuracy", f"must be in [0, 1], got {minimum}")
    return PublishPolicy(every, at_end, minimum)


def _fits_data(spec: JobSpec) -> None:
    """The architecture's input and output widths must match the data."""
    inputs = MNIST_INPUTS if spec.inline is None else spec.inline.features.shape[1]
    if spec.sizes[0] != inputs:
        raise JobSpecError(
            "sizes", f"sizes[0] must equal the input width {inputs}, got {spec.sizes[0]}"
        )
    outputs = spec.sizes[-1]
    binary = spec.classes <= 2
    if (not binary and outputs != spec.classes) or (binary and outputs not in (1, 2)):
        want = spec.classes if spec.classes > 2 else "1 or 2"
        raise JobSpecError(
            "sizes", f"the output width must be {want} for {spec.classes} classes, got {outputs}"
        )
