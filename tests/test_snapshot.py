"""The snapshot format: exact round trips, deterministic bytes, every corruption refused by name."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import zipfile
from datetime import datetime

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import defaults
from shared.mlp import HIDDEN_ACTIVATIONS, LOSSES, MLP, OUTPUT_ACTIVATIONS
from shared.scaling import InputScaling
from shared.snapshot import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFEST_KEYS,
    WEIGHTS_FILE,
    SnapshotError,
    decode_snapshot,
    encode_snapshot,
    export_snapshot,
    import_snapshot,
    parse_manifest,
    snapshot_manifest,
)


def tiny_model(seed: int = 0, dtype: str = "float32") -> MLP:
    return MLP.create(
        (4, 3, 2),
        ("relu", "softmax"),
        "cross_entropy",
        rng=np.random.default_rng(seed),
        dtype=dtype,
        input_scaling=InputScaling.tutorial(),
    )


def encoded(model: MLP | None = None) -> tuple[bytes, dict]:
    model = model or tiny_model()
    manifest = snapshot_manifest(
        model, model_name="digits", metrics={"test_accuracy": np.float64(0.5), "test_loss": 0.7}
    )
    return encode_snapshot(model, manifest)


def npz_of(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def bound_to(weights: bytes, manifest: dict) -> dict:
    """``manifest`` with its hash and size recomputed for ``weights``: a consistent forgery."""
    return {
        **manifest,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "weights_bytes": len(weights),
    }


def arrays_of(model: MLP) -> dict[str, np.ndarray]:
    named = {}
    for i, (W, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        named[f"W{i}"], named[f"b{i}"] = W, b
    return named


# --- round trip and determinism -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_predicts_bit_for_bit(dtype):
    model = tiny_model(dtype=dtype)
    weights, manifest = encoded(model)
    snapshot = decode_snapshot(weights, manifest)
    raw = np.random.default_rng(1).integers(0, 256, size=(50, 4)).astype(np.uint8)
    before, after = model.predict_proba(raw), snapshot.model.predict_proba(raw)
    assert before.dtype == after.dtype == np.dtype(dtype)
    assert before.tobytes() == after.tobytes()
    for original, loaded in zip(model.parameters(), snapshot.model.parameters(), strict=True):
        assert original.tobytes() == loaded.tobytes()
    assert snapshot.model.input_scaling == model.input_scaling
    assert snapshot.manifest == manifest
    assert (snapshot.name, snapshot.version) == ("digits", None)


def test_manifest_round_trips_through_json_exactly():
    weights, manifest = encoded()
    text = json.dumps(manifest)
    snapshot = decode_snapshot(weights, parse_manifest(text))
    assert snapshot.model.input_scaling.scale == InputScaling.tutorial().scale
    assert snapshot.manifest["metrics"] == {"test_accuracy": 0.5, "test_loss": 0.7}


def test_same_weights_always_give_the_same_bytes():
    model = tiny_model()
    first, manifest = encoded(model)
    second, _ = encode_snapshot(model.copy(), manifest)
    assert first == second
    stamps = {entry.date_time for entry in zipfile.ZipFile(io.BytesIO(first)).infolist()}
    assert stamps == {(1980, 1, 1, 0, 0, 0)}
    other, _ = encoded(tiny_model(seed=1))
    assert other != first


def test_manifest_describes_the_model():
    weights, manifest = encoded()
    assert set(manifest) == set(MANIFEST_KEYS)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["sizes"] == [4, 3, 2]
    assert manifest["labels"] == ["0", "1"]
    assert manifest["input_scaling"] == InputScaling.tutorial().as_dict()
    assert manifest["parameter_count"] == 4 * 3 + 3 + 3 * 2 + 2
    assert manifest["weights_bytes"] == len(weights)
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset().total_seconds() == 0


def test_manifest_refuses_a_bad_name_and_nan_metrics():
    with pytest.raises(SnapshotError, match="invalid model name"):
        snapshot_manifest(tiny_model(), model_name="a:b", metrics={})
    with pytest.raises(SnapshotError, match="not finite"):
        snapshot_manifest(tiny_model(), model_name="a", metrics={"test_loss": float("nan")})


def test_encode_refuses_a_manifest_describing_another_model():
    manifest = snapshot_manifest(tiny_model(), model_name="digits", metrics={})
    with pytest.raises(SnapshotError, match="manifest describes"):
        encode_snapshot(tiny_model(dtype="float64"), manifest)


# --- every corruption is refused, by name ---------------------------------------------------


def test_flipped_weight_byte_fails_the_hash():
    weights, manifest = encoded()
    corrupt = bytearray(weights)
    corrupt[len(corrupt) // 2] ^= 0x01
    with pytest.raises(SnapshotError, match="sha256 mismatch"):
        decode_snapshot(bytes(corrupt), manifest)


@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
@settings(max_examples=50, deadline=None)
def test_any_flipped_bit_fails_the_hash(position, bit):
    weights, manifest = encoded()
    corrupt = bytearray(weights)
    corrupt[position % len(corrupt)] ^= 1 << bit
    with pytest.raises(SnapshotError, match="sha256"):
        decode_snapshot(bytes(corrupt), manifest)


def test_shape_that_disagrees_with_the_manifest_is_refused():
    model = tiny_model()
    _, manifest = encoded(model)
    arrays = arrays_of(model)
    arrays["W0"] = np.ascontiguousarray(arrays["W0"].T)  # (3, 4) where sizes say (4, 3)
    weights = npz_of(**arrays)
    with pytest.raises(SnapshotError, match=r"array W0 has shape \(3, 4\).*\(4, 3\)"):
        decode_snapshot(weights, bound_to(weights, manifest))


def test_nan_weights_are_refused_even_with_a_correct_hash():
    model = tiny_model()
    model.weights[1][0, 0] = np.nan
    _, manifest = encoded(tiny_model())
    weights = npz_of(**arrays_of(model))
    with pytest.raises(SnapshotError, match="W1 holds non-finite"):
        decode_snapshot(weights, bound_to(weights, manifest))


def test_dtype_that_disagrees_with_the_manifest_is_refused():
    weights, manifest = encoded(tiny_model(dtype="float32"))
    with pytest.raises(SnapshotError, match="dtype float32, the manifest says float64"):
        decode_snapshot(weights, {**manifest, "dtype": "float64"})


@pytest.mark.parametrize("version", [2, 0, "1", 1.0, None])
def test_unknown_format_version_is_refused(version):
    weights, manifest = encoded()
    with pytest.raises(SnapshotError, match="unknown format_version"):
        decode_snapshot(weights, {**manifest, "format_version": version})


@pytest.mark.parametrize("key", MANIFEST_KEYS)
def test_missing_manifest_field_is_named(key):
    weights, manifest = encoded()
    del manifest[key]
    with pytest.raises(SnapshotError, match=f"missing '{key}'"):
        decode_snapshot(weights, manifest)


def test_extra_array_in_npz_is_refused():
    model = tiny_model()
    _, manifest = encoded(model)
    weights = npz_of(**arrays_of(model), extra=np.zeros(3, dtype=np.float32))
    with pytest.raises(SnapshotError, match=r"extra \['extra.npy'\]"):
        decode_snapshot(weights, bound_to(weights, manifest))


def test_missing_array_in_npz_is_refused():
    model = tiny_model()
    _, manifest = encoded(model)
    arrays = arrays_of(model)
    del arrays["b1"]
    weights = npz_of(**arrays)
    with pytest.raises(SnapshotError, match=r"missing \['b1.npy'\]"):
        decode_snapshot(weights, bound_to(weights, manifest))


UNPICKLED = []


def _record_unpickling() -> None:
    UNPICKLED.append(True)


class Booby:
    """Unpickling this runs code: proof, if it ever ran, that pickle was allowed."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_object_array_in_npz_is_refused_without_unpickling():
    model = tiny_model()
    _, manifest = encoded(model)
    arrays = arrays_of(model)
    arrays["W0"] = np.array([[Booby()] * 3] * 4, dtype=object)
    weights = npz_of(**arrays)  # np.savez pickles object arrays
    with pytest.raises(SnapshotError, match=r"cannot be read safely.*allow_pickle"):
        decode_snapshot(weights, bound_to(weights, manifest))
    assert UNPICKLED == []


def test_compressed_entry_that_expands_past_its_shape_is_refused():
    model = tiny_model()
    _, manifest = encoded(model)
    arrays = arrays_of(model)
    arrays["W0"] = np.zeros((1000, 1000), dtype=np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    weights = buffer.getvalue()
    with pytest.raises(SnapshotError, match=r"W0\.npy expands to 4000128 bytes"):
        decode_snapshot(weights, bound_to(weights, manifest))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (10, 99, "compression method is not supported"),  # central directory: method
        (8, 1, "encrypted"),  # central directory: flags
    ],
)
def test_unreadable_zip_entries_are_refused(offset, value, message):
    weights, manifest = encoded()
    edited = bytearray(weights)
    edited[edited.find(b"PK\x01\x02") + offset] = value
    with pytest.raises(SnapshotError, match=f"cannot be read safely.*{message}"):
        decode_snapshot(bytes(edited), bound_to(bytes(edited), manifest))


def test_not_a_zip_is_refused():
    _, manifest = encoded()
    weights = b"definitely not a zip file"
    with pytest.raises(SnapshotError, match=r"not a valid \.npz"):
        decode_snapshot(weights, bound_to(weights, manifest))


def test_snapshot_over_the_size_bound_is_refused(monkeypatch):
    weights, manifest = encoded()
    monkeypatch.setattr(defaults, "MAX_SNAPSHOT_BYTES", len(weights) - 1)
    with pytest.raises(SnapshotError, match="weights_bytes must be an integer in 1"):
        decode_snapshot(weights, manifest)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activations": ["relu", "tanh"]}, "architecture is invalid.*output activation"),
        ({"activations": ["swish", "softmax"]}, "architecture is invalid.*activations\\[0\\]"),
        ({"loss": "hinge"}, "architecture is invalid.*loss must be one of"),
        ({"input_scaling": {"offset": 0.0, "scale": 0.0}}, "input_scaling is invalid"),
        ({"input_scaling": {"offset": 0.0}}, "input_scaling must be"),
        ({"model_name": "a:b"}, "invalid model name"),
        ({"version": 0}, "version must be a positive integer"),
        ({"labels": ["0", "1", "2"]}, "labels must be 2 strings"),
        ({"created_at": "2026-01-01T00:00:00+01:00"}, "created_at must be an ISO 8601 UTC"),
        ({"parent": {"model_name": "x"}}, "parent must be"),
        ({"parameter_count": 24}, "parameter_count is 24"),
        (
            {"sizes": [4, 10**7, 2], "parameter_count": 7 * 10**7 + 2},
            "need more than the .*-byte limit",
        ),
        ({"weights_bytes": 1}, "weights are .* bytes but the manifest says 1"),
    ],
)
def test_invalid_manifest_fields_are_named(change, message):
    weights, manifest = encoded()
    with pytest.raises(SnapshotError, match=message):
        decode_snapshot(weights, {**manifest, **change})


# --- hypothesis: randomly corrupted manifests never load -------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)


BASELINE = encoded()  # encoded once: the property tests below only ever corrupt copies


def _differs_from(key: str):
    original = json.dumps(BASELINE[1][key])
    return lambda value: json.dumps(value) != original


def _is_known_activation_list(value) -> bool:
    names = set(HIDDEN_ACTIVATIONS) | set(OUTPUT_ACTIVATIONS)
    return isinstance(value, list) and all(isinstance(v, str) and v in names for v in value)


def _is_utc_time(value) -> bool:
    try:
        offset = datetime.fromisoformat(value).utcoffset()
    except (TypeError, ValueError):
        return False
    return offset is not None and offset.total_seconds() == 0


# For each field, values that can never be right: either anything but the one value the weights
# fix, or values of a type the field never has.
INVALID_VALUES = {
    "format_version": json_values.filter(_differs_from("format_version")),
    "sizes": json_values.filter(_differs_from("sizes")),
    "dtype": json_values.filter(_differs_from("dtype")),
    "weights_sha256": json_values.filter(_differs_from("weights_sha256")),
    "weights_bytes": json_values.filter(_differs_from("weights_bytes")),
    "parameter_count": json_values.filter(_differs_from("parameter_count")),
    "model_name": json_values.filter(
        lambda v: not (isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v))
    ),
    "version": json_values.filter(lambda v: v is not None and not (type(v) is int and v > 0)),
    "activations": json_values.filter(lambda v: not _is_known_activation_list(v)),
    "loss": json_values.filter(lambda v: v not in LOSSES),
    "input_scaling": json_values.filter(lambda v: not isinstance(v, dict) or len(v) != 2),
    "labels": json_values.filter(lambda v: not isinstance(v, list) or len(v) != 2),
    "metrics": json_values.filter(lambda v: not isinstance(v, dict)),
    "job_id": json_values.filter(lambda v: v is not None and not isinstance(v, str)),
    "created_at": json_values.filter(lambda v: not _is_utc_time(v)),
    "parent": json_values.filter(lambda v: v is not None and not isinstance(v, dict)),
    "training": json_values.filter(lambda v: v is not None and not isinstance(v, dict)),
}
assert set(INVALID_VALUES) == set(MANIFEST_KEYS)
DELETE = object()

corruptions = st.sampled_from(MANIFEST_KEYS).flatmap(
    lambda key: st.tuples(st.just(key), st.just(DELETE) | INVALID_VALUES[key])
)


@given(corruption=st.lists(corruptions, min_size=1, max_size=3))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
def test_randomly_corrupted_manifests_never_load(corruption):
    weights, manifest = BASELINE
    corrupt = copy.deepcopy(manifest)
    for key, value in corruption:
        if value is DELETE:
            corrupt.pop(key, None)
        else:
            corrupt[key] = value
    with pytest.raises(SnapshotError):
        decode_snapshot(weights, parse_manifest(json.dumps(corrupt)))


# --- export and import ----------------------------------------------------------------------


def test_export_then_import_round_trips(tmp_path):
    weights, manifest = encoded()
    snapshot = decode_snapshot(weights, {**manifest, "version": 3})
    export_snapshot(snapshot, tmp_path / "out")
    assert (tmp_path / "out" / WEIGHTS_FILE).read_bytes() == weights
    loaded = import_snapshot(tmp_path / "out")
    assert loaded.manifest == snapshot.manifest
    assert loaded.version == 3
    raw = np.arange(8, dtype=np.uint8).reshape(2, 4)
    assert loaded.model.predict_proba(raw).tobytes() == snapshot.model.predict_proba(raw).tobytes()


def test_import_refuses_a_tampered_directory(tmp_path):
    weights, manifest = encoded()
    export_snapshot(decode_snapshot(weights, manifest), tmp_path)
    manifest_path = tmp_path / MANIFEST_FILE
    tampered = json.loads(manifest_path.read_text())
    tampered["sizes"] = [4, 5, 2]
    manifest_path.write_text(json.dumps(tampered))
    with pytest.raises(SnapshotError, match="parameter_count"):
        import_snapshot(tmp_path)
    manifest_path.write_text("{not json")
    with pytest.raises(SnapshotError, match="not valid JSON"):
        import_snapshot(tmp_path)
    manifest_path.write_text('{"format_version": NaN}')
    with pytest.raises(SnapshotError, match="not valid JSON"):
        import_snapshot(tmp_path)


def test_import_of_a_missing_directory_names_the_file(tmp_path):
    with pytest.raises(SnapshotError, match=f"cannot read .*{WEIGHTS_FILE}"):
        import_snapshot(tmp_path / "nowhere")


@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=4,
    )
)
@settings(max_examples=200, deadline=None)
def test_rehashed_byte_edits_load_or_raise_snapshot_error_only(edits):
    weights, manifest = BASELINE
    edited = bytearray(weights)
    for position, value in edits:
        edited[position % len(edited)] = value
    forged = bound_to(bytes(edited), manifest)
    try:
        snapshot = decode_snapshot(bytes(edited), forged)
    except SnapshotError:
        return
    # An edit that only changed weight values loads, and then every value is finite.
    assert all(np.isfinite(p).all() for p in snapshot.model.parameters())
