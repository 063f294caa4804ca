"""The snapshot format: a model's weights as ``.npz`` bytes plus a JSON manifest describing them.

The manifest alone says what the weights are (sizes, activations, loss, dtype), how raw inputs
must be scaled, where the model came from (job, parent, training settings) and how good it is
(metrics). ``weights_sha256`` binds the manifest to the exact bytes, and those bytes are
deterministic: the same weights always encode, and so hash, the same. Decoding trusts nothing:
anyone who can write to Redis or hand over a directory can supply a snapshot.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared import defaults
from shared.mlp import DTYPES, MLP, check_architecture
from shared.scaling import InputScaling

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.npz"
MANIFEST_FILE = "manifest.json"
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DESCRIPTION_KEYS = (
    "format_version", "model_name", "version", "sizes", "activations", "loss", "dtype",
    "input_scaling", "labels", "metrics", "job_id", "created_at", "parent", "training",
)  # fmt: skip
BINDING_KEYS = ("weights_sha256", "weights_bytes", "parameter_count")  # filled by encode_snapshot
MANIFEST_KEYS = DESCRIPTION_KEYS + BINDING_KEYS
# Zip entries carry a timestamp; a fixed one keeps the bytes (and so the hash) a function of the
# weights alone. 1980-01-01 is the earliest date a zip header can hold.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
# An .npy header is at most a few hundred bytes for our 1-D and 2-D float arrays.
_NPY_HEADER_ALLOWANCE = 4096
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SnapshotError(ValueError):
    """A snapshot is malformed, inconsistent or corrupt; the message names what is wrong."""


@dataclass(frozen=True)
class Snapshot:
    """A verified model together with the manifest that describes it."""

    model: MLP
    manifest: dict

    @property
    def name(self) -> str:
        return str(self.manifest["model_name"])

    @property
    def version(self) -> int | None:
        return self.manifest["version"]


def check_name(name: object, what: str = "model name") -> str:
    """Return ``name`` if it is a valid model (or alias) name, else raise ValueError saying why.

    The pattern leaves out ':' and braces, so a name can never reach into another Redis key.
    """
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_labels(outputs: int) -> list[str]:
    """Class labels "0", "1", ...: one per output unit, or two for a single sigmoid output."""
    return [str(i) for i in range(max(outputs, 2))]


def snapshot_manifest(
    model: MLP,
    *,
    model_name: str,
    metrics: dict,
    job_id: str | None = None,
    parent: dict | None = None,
    training: dict | None = None,
    labels: list[str] | None = None,
) -> dict:
    """A manifest for ``model``, not yet published (``version`` None) nor bound to weights."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "version": None,
        "sizes": list(model.sizes),
        "activations": list(model.activations),
        "loss": model.loss,
        "dtype": str(model.dtype),
        "input_scaling": model.input_scaling.as_dict(),
        "labels": list(labels) if labels is not None else default_labels(model.sizes[-1]),
        "metrics": {str(k): _plain_json(v) for k, v in metrics.items()},
        "job_id": job_id,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "parent": parent,
        "training": training,
    }
    _check_description(manifest)
    return manifest


def encode_snapshot(model: MLP, manifest: dict) -> tuple[bytes, dict]:
    """The model's ``.npz`` bytes (W0, b0, W1, b1, ...) and ``manifest`` completed to match them."""
    completed = dict(manifest)
    completed.setdefault("version", None)
    _check_description(completed)
    described = (
        tuple(completed["sizes"]),
        tuple(completed["activations"]),
        completed["loss"],
        completed["dtype"],
        InputScaling.from_dict(completed["input_scaling"]),
    )
    actual = (model.sizes, model.activations, model.loss, str(model.dtype), model.input_scaling)
    if described != actual:
        raise SnapshotError(f"manifest describes {described} but the model is {actual}")
    weights = _npz_bytes(model)
    completed["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    completed["weights_bytes"] = len(weights)
    completed["parameter_count"] = int(model.parameter_count)
    _check_manifest(completed)
    return weights, completed


def decode_snapshot(weights: bytes, manifest: dict) -> Snapshot:
    """The verified snapshot of ``weights`` and ``manifest``; SnapshotError says what is wrong."""
    _check_manifest(manifest)
    if len(weights) != manifest["weights_bytes"]:
        raise SnapshotError(
            f"weights are {len(weights)} bytes but the manifest says {manifest['weights_bytes']}"
        )
    digest = hashlib.sha256(weights).hexdigest()
    if digest != manifest["weights_sha256"]:
        raise SnapshotError(
            f"weights sha256 mismatch: computed {digest}, manifest says "
            f"{manifest['weights_sha256']} (corrupt or altered weights)"
        )
    sizes, dtype = manifest["sizes"], np.dtype(DTYPES[manifest["dtype"]])
    shapes = _expected_shapes(sizes)
    arrays = _read_npz(weights, shapes, dtype)
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise SnapshotError(f"array {name} holds non-finite values (NaN or infinity)")
    layers = len(sizes) - 1
    try:
        model = MLP(
            tuple(sizes),
            tuple(manifest["activations"]),
            manifest["loss"],
            [arrays[f"W{i}"] for i in range(layers)],
            [arrays[f"b{i}"] for i in range(layers)],
            InputScaling.from_dict(manifest["input_scaling"]),
        )
    except ValueError as exc:  # already checked above; kept so no ValueError escapes unnamed
        raise SnapshotError(f"weights do not form a model: {exc}") from exc
    return Snapshot(model, dict(manifest))


def export_snapshot(snapshot: Snapshot, directory: str | os.PathLike) -> None:
    """Write ``weights.npz`` and ``manifest.json`` into ``directory`` (created if needed)."""
    weights, manifest = encode_snapshot(snapshot.model, snapshot.manifest)
    if manifest["weights_sha256"] != snapshot.manifest.get("weights_sha256"):
        raise SnapshotError("re-encoding the weights changed their hash; refusing to export")
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    _write_atomically(target / WEIGHTS_FILE, weights)
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    _write_atomically(target / MANIFEST_FILE, text.encode())


def import_snapshot(directory: str | os.PathLike) -> Snapshot:
    """The verified snapshot stored in ``directory`` by ``export_snapshot``."""
    source = Path(directory)
    files = {}
    for filename in (WEIGHTS_FILE, MANIFEST_FILE):
        path = source / filename
        try:
            size = path.stat().st_size
            if size > defaults.MAX_SNAPSHOT_BYTES:
                raise SnapshotError(
                    f"{path} is {size} bytes, over the {defaults.MAX_SNAPSHOT_BYTES}-byte limit"
                )
            files[filename] = path.read_bytes()
        except OSError as exc:
            raise SnapshotError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_snapshot(files[WEIGHTS_FILE], parse_manifest(files[MANIFEST_FILE]))


def parse_manifest(data: bytes | str) -> dict:
    """A manifest from its JSON text; SnapshotError if it is not a JSON object."""
    try:
        manifest = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise SnapshotError(f"manifest must be a JSON object, got {type(manifest).__name__}")
    return manifest


def manifest_json(manifest: dict) -> str:
    """The canonical JSON text of a manifest (sorted keys; NaN refused, as JSON has none)."""
    try:
        return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"manifest cannot be written as JSON: {exc}") from exc


# --- encoding -------------------------------------------------------------------------------


def _npz_bytes(model: MLP) -> bytes:
    """The parameters as an uncompressed zip of .npy files with fixed metadata."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in _named_parameters(model):
            npy = io.BytesIO()
            little_endian = array.dtype.newbyteorder("<")
            np.lib.format.write_array(
                npy,
                np.ascontiguousarray(array, dtype=little_endian),
                version=(1, 0),
                allow_pickle=False,
            )
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
            entry.create_system = 3  # otherwise it depends on the writer's OS
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, npy.getvalue())
    return buffer.getvalue()


def _named_parameters(model: MLP) -> list[tuple[str, np.ndarray]]:
    named = []
    for i, (W, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        named += [(f"W{i}", W), (f"b{i}", b)]
    return named


# --- decoding -------------------------------------------------------------------------------


def _expected_shapes(sizes: list[int]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(len(sizes) - 1):
        shapes[f"W{i}"] = (sizes[i], sizes[i + 1])
        shapes[f"b{i}"] = (sizes[i + 1],)
    return shapes


def _read_npz(
    weights: bytes, shapes: dict[str, tuple[int, ...]], dtype: np.dtype
) -> dict[str, np.ndarray]:
    """Exactly the arrays in ``shapes``, each of ``dtype``, loaded with allow_pickle=False."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(weights))
        entries = archive.infolist()
    except Exception as exc:  # untrusted bytes: whatever zipfile trips on, it is not an .npz
        raise SnapshotError(f"weights are not a valid .npz (zip) file: {exc}") from exc
    names = [entry.filename for entry in entries]
    if len(set(names)) != len(names):
        raise SnapshotError(f"weights .npz holds duplicate entries: {sorted(names)}")
    expected = {f"{name}.npy" for name in shapes}
    extra, missing = sorted(set(names) - expected), sorted(expected - set(names))
    if extra or missing:
        raise SnapshotError(
            f"weights .npz arrays do not match the manifest's sizes: extra {extra}, "
            f"missing {missing}"
        )
    for entry in entries:
        # Refuse a compressed entry that would expand far past what its shape needs (zip bomb).
        shape = shapes[entry.filename.removesuffix(".npy")]
        limit = math.prod(shape) * dtype.itemsize + _NPY_HEADER_ALLOWANCE
        if entry.file_size > limit:
            raise SnapshotError(
                f"array {entry.filename} expands to {entry.file_size} bytes, more than shape "
                f"{shape} of {dtype} needs"
            )
    arrays = {}
    try:
        with np.load(io.BytesIO(weights), allow_pickle=False) as npz:
            for name, shape in shapes.items():
                array = npz[name]
                if array.dtype != dtype:
                    raise SnapshotError(
                        f"array {name} has dtype {array.dtype}, the manifest says {dtype}"
                    )
                if array.shape != shape:
                    raise SnapshotError(
                        f"array {name} has shape {array.shape}, the manifest's sizes need {shape}"
                    )
                arrays[name] = np.ascontiguousarray(array)
    except SnapshotError:
        raise
    except Exception as exc:
        # Untrusted bytes make zipfile and np.load raise many types (BadZipFile for a bad CRC,
        # NotImplementedError for an unknown compression method, RuntimeError for encryption,
        # ValueError for object arrays, refused by allow_pickle=False); each means the same here.
        raise SnapshotError(f"weights .npz cannot be read safely: {exc}") from exc
    return arrays


# --- manifest checks ------------------------------------------------------------------------


def _check_manifest(manifest: object) -> None:
    """Raise SnapshotError naming the first thing wrong with a complete manifest."""
    if not isinstance(manifest, dict):
        raise SnapshotError(f"manifest must be a dict, got {type(manifest).__name__}")
    _check_description(manifest)
    for key in BINDING_KEYS:
        if key not in manifest:
            raise SnapshotError(f"manifest is missing {key!r}")
    sha = manifest["weights_sha256"]
    if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
        raise SnapshotError(f"manifest weights_sha256 must be 64 lowercase hex digits, got {sha!r}")
    size = manifest["weights_bytes"]
    if not _is_int(size) or not 0 < size <= defaults.MAX_SNAPSHOT_BYTES:
        raise SnapshotError(
            f"manifest weights_bytes must be an integer in 1..{defaults.MAX_SNAPSHOT_BYTES}, "
            f"got {size!r}"
        )
    sizes = manifest["sizes"]
    count = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))
    if manifest["parameter_count"] != count or not _is_int(manifest["parameter_count"]):
        raise SnapshotError(
            f"manifest parameter_count is {manifest['parameter_count']!r} but sizes {sizes} "
            f"have {count} parameters"
        )
    # With each array's expanded size bounded by its shape (see _read_npz), this bounds the
    # memory a snapshot can make a reader allocate, however small its compressed bytes are.
    if count * np.dtype(DTYPES[manifest["dtype"]]).itemsize > defaults.MAX_SNAPSHOT_BYTES:
        raise SnapshotError(
            f"manifest sizes {sizes} need more than the {defaults.MAX_SNAPSHOT_BYTES}-byte limit"
        )


def _check_description(manifest: dict) -> None:
    """Check every manifest field except those that bind it to weight bytes."""
    if "format_version" not in manifest:
        raise SnapshotError("manifest is missing 'format_version'")
    if manifest["format_version"] != FORMAT_VERSION or not _is_int(manifest["format_version"]):
        raise SnapshotError(
            f"unknown format_version {manifest['format_version']!r}; this code reads "
            f"format_version {FORMAT_VERSION}"
        )
    for key in DESCRIPTION_KEYS:
        if key not in manifest:
            raise SnapshotError(f"manifest is missing {key!r}")
    try:
        check_name(manifest["model_name"])
    except ValueError as exc:
        raise SnapshotError(f"manifest {exc}") from exc
    version = manifest["version"]
    if version is not None and (not _is_int(version) or version < 1):
        raise SnapshotError(f"manifest version must be a positive integer or null, got {version!r}")
    sizes, activations, loss = manifest["sizes"], manifest["activations"], manifest["loss"]
    if not isinstance(sizes, list) or not all(_is_int(s) for s in sizes):
        raise SnapshotError(f"manifest sizes must be a list of integers, got {sizes!r}")
    if not isinstance(activations, list) or not all(isinstance(a, str) for a in activations):
        raise SnapshotError(f"manifest activations must be a list of names, got {activations!r}")
    if not isinstance(loss, str):
        raise SnapshotError(f"manifest loss must be a name, got {loss!r}")
    try:
        check_architecture(sizes, activations, loss)
    except ValueError as exc:
        raise SnapshotError(f"manifest architecture is invalid: {exc}") from exc
    if not isinstance(manifest["dtype"], str) or manifest["dtype"] not in DTYPES:
        raise SnapshotError(
            f"manifest dtype must be one of {tuple(DTYPES)}, got {manifest['dtype']!r}"
        )
    scaling = manifest["input_scaling"]
    if (
        not isinstance(scaling, dict)
        or set(scaling) != {"offset", "scale"}
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scaling.values())
    ):
        raise SnapshotError(
            f"manifest input_scaling must be {{offset, scale}} numbers, got {scaling!r}"
        )
    try:
        InputScaling.from_dict(scaling)
    except ValueError as exc:
        raise SnapshotError(f"manifest input_scaling is invalid: {exc}") from exc
    labels = manifest["labels"]
    if (
        not isinstance(labels, list)
        or not all(isinstance(x, str) for x in labels)
        or len(labels) != max(sizes[-1], 2)
    ):
        raise SnapshotError(
            f"manifest labels must be {max(sizes[-1], 2)} strings (one per class), got {labels!r}"
        )
    if not isinstance(manifest["metrics"], dict):
        raise SnapshotError(f"manifest metrics must be an object, got {manifest['metrics']!r}")
    if manifest["job_id"] is not None and not isinstance(manifest["job_id"], str):
        raise SnapshotError(f"manifest job_id must be a string or null, got {manifest['job_id']!r}")
    _check_created_at(manifest["created_at"])
    parent = manifest["parent"]
    if parent is not None and not (
        isinstance(parent, dict)
        and set(parent) == {"model_name", "version"}
        and isinstance(parent["model_name"], str)
        and _is_int(parent["version"])
    ):
        raise SnapshotError(
            f"manifest parent must be {{model_name, version}} or null, got {parent!r}"
        )
    if manifest["training"] is not None and not isinstance(manifest["training"], dict):
        raise SnapshotError(
            f"manifest training must be an object or null, got {manifest['training']!r}"
        )


def _check_created_at(value: object) -> None:
    try:
        offset = datetime.fromisoformat(value).utcoffset() if isinstance(value, str) else None
    except ValueError:
        offset = None
    if offset is None or offset.total_seconds() != 0:
        raise SnapshotError(f"manifest created_at must be an ISO 8601 UTC time, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain_json(value: Any) -> Any:
    """NumPy scalars and arrays become plain Python values, so that metrics serialise as JSON."""
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise SnapshotError(f"metric value {value!r} is not finite (JSON has no NaN)")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
