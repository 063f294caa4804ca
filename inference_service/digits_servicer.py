"""The ``mnist.v1.Digits`` service: decode the request, run the model, encode the answer."""

from __future__ import annotations

import grpc
import numpy as np

from inference_service import inputs
from inference_service.errors import invalid_argument
from inference_service.metrics import observed_rpc
from inference_service.models import LoadedVersion, ModelStore, ServedModel
from shared.mlp import MLP
from shared.wire.mnist.v1 import digits_pb2, digits_pb2_grpc

VersionStatus = digits_pb2.VersionStatus


def decode_images(images, model: MLP) -> np.ndarray:
    """A request's images as rows ``(n, 784)``, in order: uint8 pixels when every image is raw
    pixels (the common case, which the server feeds to the network unscaled), else scaled."""
    if not images:
        raise invalid_argument("images is empty: send at least one image")
    kinds = [image.WhichOneof("data") for image in images]
    if all(kind == "pixels" for kind in kinds):  # the common case, in one vectorised step
        data = b"".join(image.pixels for image in images)
        if len(data) != len(images) * inputs.PIXELS:
            for i, image in enumerate(images):
                inputs.pixels_from_bytes(image.pixels, f"images[{i}].pixels")
        return np.frombuffer(data, dtype=np.uint8).reshape(len(images), inputs.PIXELS)
    rows = np.empty((len(images), inputs.PIXELS), dtype=model.dtype)
    for i, (image, kind) in enumerate(zip(images, kinds, strict=True)):
        what = f"images[{i}].{kind}"
        if kind == "pixels":
            rows[i] = inputs.scale_pixels(inputs.pixels_from_bytes(image.pixels, what), model)
        elif kind == "encoded":
            rows[i] = inputs.scale_pixels(inputs.pixels_from_encoded(image.encoded, what), model)
        elif kind == "scaled":
            values = image.scaled.values
            if len(values) != inputs.PIXELS:
                raise invalid_argument(
                    f"{what}: expected {inputs.PIXELS} values, got {len(values)}"
                )
            rows[i] = inputs.check_scaled(np.array(values, dtype=np.float32)[None], model, what)
        else:
            raise invalid_argument(f"images[{i}] has no data: set pixels, scaled or encoded")
    return rows


def classify_response(loaded: LoadedVersion, probabilities: list[list[float]]):
    response = digits_pb2.ClassifyResponse(model_name=loaded.name, model_version=loaded.version)
    add = response.predictions.add  # faster than building Prediction objects and a list
    for row in probabilities:
        add(label=row.index(max(row)), probabilities=row)  # the first of equal maxima, as argmax
    return response


def manifest_summary(manifest: dict):
    scaling = manifest.get("input_scaling") or {}
    metrics = manifest.get("metrics") or {}
    return digits_pb2.ManifestSummary(
        sizes=manifest.get("sizes", []),
        activations=manifest.get("activations", []),
        dtype=manifest.get("dtype", ""),
        labels=manifest.get("labels") or [],
        input_offset=scaling.get("offset", 0.0),
        input_scale=scaling.get("scale", 0.0),
        test_accuracy=metrics.get("test_accuracy") or 0.0,
        test_loss=metrics.get("test_loss") or 0.0,
        job_id=manifest.get("job_id") or "",
        created_at=manifest.get("created_at") or "",
        weights_sha256=manifest.get("weights_sha256", ""),
        parameter_count=manifest.get("parameter_count", 0),
    )


def model_status(served: ServedModel):
    versions = {}
    if served.current is not None:
        versions[served.current.version] = VersionStatus(
            version=served.current.version,
            state=VersionStatus.SERVING,
            manifest=manifest_summary(served.current.manifest),
        )
    for version, loaded in served.standby.items():
        versions.setdefault(
            version,
            VersionStatus(
                version=version,
                state=VersionStatus.STANDBY,
                manifest=manifest_summary(loaded.manifest),
            ),
        )
    for version in served.loading:
        versions.setdefault(version, VersionStatus(version=version, state=VersionStatus.LOADING))
    for version, error in served.rejected.items():
        versions.setdefault(
            version, VersionStatus(version=version, state=VersionStatus.REJECTED, error=error)
        )
    return digits_pb2.ModelStatus(
        name=served.name,
        policy=served.policy,
        serving_version=served.current.version if served.current else 0,
        versions=[versions[v] for v in sorted(versions, reverse=True)],
    )


class DigitsServicer(digits_pb2_grpc.DigitsServicer):
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    @observed_rpc("Classify")
    def Classify(self, request, context: grpc.ServicerContext):  # noqa: N802
        loaded = self.store.version_for_request(request.model_name, request.model_version)
        rows = decode_images(request.images, loaded.model)
        return classify_response(loaded, loaded.infer(rows))

    @observed_rpc("ListModels")
    def ListModels(self, request, context: grpc.ServicerContext):  # noqa: N802
        return digits_pb2.ListModelsResponse(
            models=[model_status(served) for served in self.store.snapshot_of_state()]
        )
