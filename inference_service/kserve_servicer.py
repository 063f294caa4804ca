"""The Open Inference Protocol (KServe v2) ``inference.GRPCInferenceService``.

Inputs: one tensor of shape [N, 784] (or [N, 28, 28]); FP32 values are the network's inputs
already scaled as the manifest says, UINT8 values are raw pixels. Outputs: ``probabilities``
(FP32 [N, classes]) and ``label`` (INT64 [N]), raw when the request was raw, typed otherwise.
"""

from __future__ import annotations

import math

import grpc
import numpy as np

from inference_service import inputs
from inference_service.errors import invalid_argument, not_found
from inference_service.metrics import observed_rpc
from inference_service.models import LoadedVersion, ModelStore, version_number
from shared.wire.inference import grpc_predict_v2_pb2 as pb
from shared.wire.inference import grpc_predict_v2_pb2_grpc as pb_grpc

SERVER_NAME = "mnist-inference"
SERVER_VERSION = "0.1.0"
PLATFORM = "numpy_mlp"
INPUT_NAME = "input"
OUTPUTS = ("probabilities", "label")
# datatype -> (raw little-endian dtype, typed-contents field)
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "UINT8": (np.dtype("u1"), "uint_contents"),
}
ROW_SHAPES = ([inputs.PIXELS], [inputs.SIDE, inputs.SIDE])


def decode_input(request, loaded: LoadedVersion) -> np.ndarray:
    """A ModelInferRequest's rows: uint8 pixels or scaled floats; anything malformed refused."""
    if len(request.inputs) != 1:
        raise invalid_argument(
            f"the model takes exactly one input tensor, got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.datatype not in DATATYPES:
        raise invalid_argument(
            f"input {tensor.name!r}: datatype {tensor.datatype!r} is not "
            f"supported; use one of {sorted(DATATYPES)}"
        )
    shape = list(tensor.shape)
    if len(shape) < 2 or shape[1:] not in ROW_SHAPES or shape[0] < 1:
        raise invalid_argument(
            f"input {tensor.name!r}: shape {shape} must be [N, 784] or [N, 28, 28] with N >= 1"
        )
    count = math.prod(shape)
    dtype, field = DATATYPES[tensor.datatype]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise invalid_argument(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input"
            )
        if tensor.HasField("contents"):
            raise invalid_argument(
                f"input {tensor.name!r} has both contents and raw_input_contents; send one"
            )
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise invalid_argument(
                f"input {tensor.name!r}: raw contents are {len(raw)} bytes; shape {shape} of "
                f"{tensor.datatype} needs {count * dtype.itemsize}"
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        typed = getattr(tensor.contents, field)
        if len(typed) != count:
            raise invalid_argument(
                f"input {tensor.name!r}: contents.{field} has {len(typed)} "
                f"values; shape {shape} needs {count}"
            )
        if tensor.datatype == "UINT8":
            values = np.array(typed, dtype=np.int64)
            if values.size and (values.min() < 0 or values.max() > 255):
                raise invalid_argument(f"input {tensor.name!r}: UINT8 values must be 0..255")
            values = values.astype(np.uint8)
        else:
            values = np.array(typed, dtype=np.float32)
    rows = values.reshape(shape[0], inputs.PIXELS)
    if tensor.datatype == "UINT8":
        return rows
    return inputs.check_scaled(rows, loaded.model, f"input {tensor.name!r}")


def requested_outputs(request) -> tuple[str, ...]:
    names = tuple(output.name for output in request.outputs) or OUTPUTS
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown:
        raise invalid_argument(f"unknown outputs {unknown}; this model has {list(OUTPUTS)}")
    return names


def infer_response(request, loaded: LoadedVersion, names, rows: list[list[float]]):
    probabilities = np.array(rows, dtype="<f4")
    n, classes = probabilities.shape
    arrays = {
        "probabilities": ("FP32", [n, classes], probabilities),
        "label": ("INT64", [n], probabilities.argmax(axis=1).astype("<i8")),
    }
    response = pb.ModelInferResponse(
        model_name=loaded.name, model_version=str(loaded.version), id=request.id
    )
    for name in names:
        datatype, shape, array = arrays[name]
        output = response.outputs.add(name=name, datatype=datatype, shape=shape)
        if request.raw_input_contents:  # raw in, raw out: tritonclient reads only that
            response.raw_output_contents.append(array.tobytes())
        elif datatype == "FP32":
            output.contents.fp32_contents.extend(array.ravel().tolist())
        else:
            output.contents.int64_contents.extend(array.tolist())
    return response


def tensor_metadata(loaded: LoadedVersion | None):
    classes = loaded.model.sizes[-1] if loaded else -1
    TensorMetadata = pb.ModelMetadataResponse.TensorMetadata
    return (
        [TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, inputs.PIXELS])],
        [
            TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, classes]),
            TensorMetadata(name="label", datatype="INT64", shape=[-1]),
        ],
    )


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    @observed_rpc("ServerLive")
    def ServerLive(self, request, context: grpc.ServicerContext):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    @observed_rpc("ServerReady")
    def ServerReady(self, request, context: grpc.ServicerContext):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.store.ready())

    @observed_rpc("ModelReady")
    def ModelReady(self, request, context: grpc.ServicerContext):  # noqa: N802
        served = self.store.served(request.name)
        if not request.version:
            return pb.ModelReadyResponse(ready=served.current is not None)
        number = version_number(request.version)
        ready = number is not None and served.loaded(number) is not None
        return pb.ModelReadyResponse(ready=ready)

    @observed_rpc("ServerMetadata")
    def ServerMetadata(self, request, context: grpc.ServicerContext):  # noqa: N802
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    @observed_rpc("ModelMetadata")
    def ModelMetadata(self, request, context: grpc.ServicerContext):  # noqa: N802
        served = self.store.served(request.name)
        loaded = served.current
        if request.version:
            number = version_number(request.version)
            loaded = served.loaded(number) if number is not None else None
            if loaded is None:
                raise not_found(f"version {request.version!r} of {served.name!r} is not loaded")
        versions = sorted({*served.standby, *([served.current.version] if served.current else [])})
        model_inputs, model_outputs = tensor_metadata(loaded)
        return pb.ModelMetadataResponse(
            name=served.name,
            versions=[str(v) for v in versions],
            platform=PLATFORM,
            inputs=model_inputs,
            outputs=model_outputs,
        )

    @observed_rpc("ModelInfer")
    def ModelInfer(self, request, context: grpc.ServicerContext):  # noqa: N802
        loaded = self.store.version_for_request(request.model_name, request.model_version)
        names = requested_outputs(request)
        rows = decode_input(request, loaded)
        return infer_response(request, loaded, names, loaded.infer(rows))
