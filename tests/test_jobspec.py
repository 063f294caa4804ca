"""Job validation: valid jobs round-trip, every malformed one is refused naming its field."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trainer_support import TOY_JOB as TOY

from shared import defaults
from shared.jobspec import JOB_FIELDS, JobSpecError, check_job_id, parse_job, parse_job_json
from shared.presets import PRESETS


def test_preset_is_a_base_that_explicit_fields_override():
    spec = parse_job({"preset": "fast", "epochs": 2, "limit": 500, "lr": 0.05})
    assert spec.model == "fast"
    assert spec.sizes == PRESETS["fast"].sizes
    assert spec.training.epochs == 2 and spec.training.lr == 0.05
    assert spec.training.optimiser == PRESETS["fast"].config.optimiser
    assert spec.limit == 500 and spec.dataset == "mnist"


def test_canonical_form_validates_to_the_same_job():
    for job in (TOY, {"preset": "seed000", "model": "classic", "publish": {"every_epoch": True}}):
        spec = parse_job(job)
        again = parse_job(json.loads(json.dumps(spec.as_dict())))
        assert again.fingerprint() == spec.fingerprint()
        assert again.training == spec.training and again.publish == spec.publish


def test_inline_toy_defaults_to_identity_scaling():
    spec = parse_job(TOY)
    assert spec.inline is not None and len(spec.inline) == 4
    assert spec.input_scaling.scale == 1.0 and spec.classes == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": defaults.MAX_EPOCHS + 1}, "epochs"),
        ({"epochs": 2.0}, "epochs"),
        ({"batch_size": defaults.MAX_BATCH_SIZE + 1}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"lr": defaults.MAX_LEARNING_RATE * 2}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"sizes": [2, defaults.MAX_LAYER_WIDTH + 1, 1]}, "sizes[1]"),
        ({"sizes": [3, 2, 1]}, "sizes"),
        ({"sizes": [2] * (defaults.MAX_LAYERS + 3)}, "sizes"),
        ({"activations": ["sigmoid", "softplus"]}, "activations"),
        ({"loss": "hinge"}, "loss"),
        ({"optimiser": "lbfgs"}, "optimiser"),
        ({"shuffle": "yes"}, "shuffle"),
        ({"seed": -1}, "seed"),
        ({"colour": "red"}, "colour"),
        ({"model": "no spaces"}, "model"),
        ({"limit": 0}, "limit"),
        ({"publish": {"at_end": False}}, "publish"),
        ({"publish": {"min_accuracy": 1.5}}, "publish.min_accuracy"),
        ({"publish": {"often": True}}, "publish.often"),
        ({"warm_start": {"model": "toy", "version": -3}}, "warm_start.version"),
        ({"input_scaling": {"offset": 0, "scale": 0}}, "input_scaling.scale"),
        (
            {
                "dataset": {
                    "features": [[1, 2]] * (defaults.MAX_INLINE_EXAMPLES + 1),
                    "labels": [0] * (defaults.MAX_INLINE_EXAMPLES + 1),
                }
            },
            "dataset.features",
        ),
        ({"dataset": {"features": [[1, 2], [3]], "labels": [0, 1]}}, "dataset.features[1]"),
        ({"dataset": {"features": [[1, 2]], "labels": [-1]}}, "dataset.labels[0]"),
        ({"dataset": "cifar"}, "dataset"),
        ({"preset": "huge"}, "preset"),
    ],
)
def test_bad_field_is_refused_by_name(change, field):
    with pytest.raises(JobSpecError) as refused:
        parse_job({**TOY, **change})
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field}: ")


def test_json_text_is_checked_for_size_and_syntax():
    with pytest.raises(JobSpecError, match="job: is not valid JSON"):
        parse_job_json("{")
    with pytest.raises(JobSpecError, match="job: is not valid JSON"):
        parse_job_json('{"epochs": NaN}')
    with pytest.raises(JobSpecError, match="job: is"):
        parse_job_json(" " * (defaults.MAX_JOB_BYTES + 1))
    with pytest.raises(JobSpecError) as refused:
        parse_job_json("[1, 2]")
    assert refused.value.field == "job"


def test_job_ids_are_plain():
    assert check_job_id("run-7.a_b") == "run-7.a_b"
    for bad in ("", "a b", "a:b", "x" * 200, 7, None):
        with pytest.raises(JobSpecError, match="job_id"):
            check_job_id(bad)


# --- property-based: malformed specs are refused naming the field, never crash ----------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
# For each field, values that are wrong for it whatever the rest of the job says.
BAD_VALUES = {
    "epochs": st.integers(max_value=0)
    | st.integers(min_value=defaults.MAX_EPOCHS + 1)
    | st.floats()
    | st.text()
    | st.booleans()
    | st.none(),
    "batch_size": st.integers(max_value=0)
    | st.integers(min_value=defaults.MAX_BATCH_SIZE + 1)
    | st.text()
    | st.lists(st.integers()),
    "lr": st.floats(max_value=0)
    | st.floats(min_value=defaults.MAX_LEARNING_RATE, exclude_min=True)
    | st.text()
    | st.booleans(),
    "seed": st.integers(max_value=-1) | st.floats() | st.text(),
    "momentum": st.floats(min_value=1) | st.floats(max_value=0, exclude_max=True) | st.text(),
    "sizes": st.lists(st.integers(max_value=0), min_size=2, max_size=4)
    | st.text()
    | st.lists(st.integers(min_value=defaults.MAX_LAYER_WIDTH + 1), min_size=2, max_size=3),
    "activations": st.lists(
        st.text(max_size=5).filter(
            lambda s: s not in {"sigmoid", "tanh", "relu", "softmax", "identity"}
        ),
        min_size=1,
        max_size=3,
    )
    | st.integers(),
    "loss": st.text(max_size=6).filter(lambda s: s not in {"mse", "bce", "cross_entropy"}),
    "optimiser": st.text(max_size=6).filter(
        lambda s: s not in {"sgd", "momentum", "nesterov", "adam"}
    ),
    "limit": st.integers(max_value=0) | st.text() | st.floats(),
    "model": st.text().filter(
        lambda s: not s.replace("-", "").replace("_", "").isalnum() or not s.isascii()
    )
    | st.integers(),
    "dataset": st.text().filter(lambda s: s != "mnist") | st.integers() | st.lists(st.integers()),
    "publish": st.integers() | st.text() | st.lists(st.booleans()),
    "warm_start": st.integers() | st.text() | st.lists(st.text()),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(BAD_VALUES)).flatmap(
        lambda name: st.tuples(st.just(name), BAD_VALUES[name])
    )
)
def test_a_bad_value_is_refused_naming_its_field(case):
    name, value = case
    with pytest.raises(JobSpecError) as refused:
        parse_job({**TOY, name: value})
    assert refused.value.field.split("[")[0].split(".")[0] == name


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(JOB_FIELDS), "x"]), JSON_VALUES, max_size=5))
def test_arbitrary_changes_never_crash_validation(changes):
    try:
        parse_job({**TOY, **changes})
    except JobSpecError as refused:
        assert refused.field and str(refused).startswith(refused.field)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json_never_crashes_validation(value):
    try:
        parse_job_json(json.dumps(value))
    except JobSpecError as refused:
        assert refused.field
