"""Client mistakes get precise statuses; no input yields INTERNAL or takes the server down."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inference_support import MODEL, digit_pixels, publish, serving, tiny_model, wait_for
from PIL import Image

from shared.registry import Registry
from shared.wire.inference import grpc_predict_v2_pb2 as pb
from shared.wire.mnist.v1 import digits_pb2

CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
Tensor = pb.ModelInferRequest.InferInputTensor


@pytest.fixture
def served(redis_client):
    publish(Registry(redis_client), tiny_model(5))
    with serving(redis_client, max_message_bytes=256 * 1024) as s:
        wait_for(s.store.ready, what="model loaded")
        yield s


def status_of(call, request) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=10)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def image(**data) -> digits_pb2.Image:
    return digits_pb2.Image(**data)


def infer(datatype="FP32", shape=(1, 784), raw=None, **tensor) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[Tensor(name="x", datatype=datatype, shape=shape, **tensor)],
        raw_input_contents=[] if raw is None else [raw],
    )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (digits_pb2.ClassifyRequest(), "images is empty"),
        (digits_pb2.ClassifyRequest(images=[image(pixels=b"\0" * 783)]), "expected 784 bytes"),
        (digits_pb2.ClassifyRequest(images=[image()]), "has no data"),
        (
            digits_pb2.ClassifyRequest(
                images=[image(scaled=digits_pb2.ScaledPixels(values=[0.5]))]
            ),
            "expected 784 values",
        ),
        (
            digits_pb2.ClassifyRequest(
                images=[image(scaled=digits_pb2.ScaledPixels(values=[float("nan")] * 784))]
            ),
            "must be finite",
        ),
        (
            digits_pb2.ClassifyRequest(
                images=[image(scaled=digits_pb2.ScaledPixels(values=[3.0] * 784))]
            ),
            "outside [0, 1]",
        ),
        (digits_pb2.ClassifyRequest(images=[image(encoded=b"GIF89a...")]), "not a PNG or JPEG"),
        (digits_pb2.ClassifyRequest(images=[image(encoded=png(29, 28))]), "expected 28x28"),
        (digits_pb2.ClassifyRequest(images=[image(encoded=png(28, 28)[:45])]), "cannot decode"),
        (
            digits_pb2.ClassifyRequest(model_version="no:such", images=[image(pixels=b"\0" * 784)]),
            "model_version",
        ),
    ],
)
def test_classify_mistakes_are_invalid_argument(served, request_, message):
    code, details = status_of(served.digits.Classify, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (infer(shape=[1, 783], raw=b"\0" * 783 * 4), "must be [N, 784]"),
        (infer(datatype="FP64", raw=b"\0" * 784 * 8), "datatype 'FP64' is not supported"),
        (infer(raw=b"\0" * 100), "raw contents are 100 bytes"),
        (infer(raw=np.full(784, np.nan, "<f4").tobytes()), "must be finite"),
        (infer(raw=np.full(784, -1, "<f4").tobytes()), "outside [0, 1]"),
        (
            infer(datatype="UINT8", contents=pb.InferTensorContents(uint_contents=[256] * 784)),
            "0..255",
        ),
        (infer(contents=pb.InferTensorContents(fp32_contents=[0.0] * 10)), "has 10 values"),
        (pb.ModelInferRequest(model_name=MODEL), "exactly one input"),
    ],
)
def test_model_infer_mistakes_are_invalid_argument(served, request_, message):
    code, details = status_of(served.kserve.ModelInfer, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


def test_unknown_names_are_not_found_and_oversize_is_resource_exhausted(served):
    pixels = digit_pixels(1)[0].tobytes()
    request = digits_pb2.ClassifyRequest(model_name="nope", images=[image(pixels=pixels)])
    assert status_of(served.digits.Classify, request)[0] == grpc.StatusCode.NOT_FOUND
    request = digits_pb2.ClassifyRequest(model_version="42", images=[image(pixels=pixels)])
    assert status_of(served.digits.Classify, request)[0] == grpc.StatusCode.NOT_FOUND
    huge = digits_pb2.ClassifyRequest(images=[image(pixels=pixels)] * 400)  # > 256 KiB limit
    assert status_of(served.digits.Classify, huge)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    probe = pb.ModelReadyRequest(name="nope")
    assert status_of(served.kserve.ModelReady, probe)[0] == grpc.StatusCode.NOT_FOUND
    for unicode_digits in ("²", "١٢"):  # str.isdigit() says yes, int() says no
        request = digits_pb2.ClassifyRequest(
            model_version=unicode_digits, images=[image(pixels=pixels)]
        )
        code = status_of(served.digits.Classify, request)[0]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, unicode_digits
        probe = pb.ModelReadyRequest(name=MODEL, version=unicode_digits)
        assert status_of(served.kserve.ModelReady, probe)[0] == grpc.StatusCode.OK
        probe = pb.ModelMetadataRequest(name=MODEL, version=unicode_digits)
        assert status_of(served.kserve.ModelMetadata, probe)[0] == grpc.StatusCode.NOT_FOUND


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
images = st.one_of(
    st.builds(lambda b: image(pixels=b), st.binary(max_size=900)),
    st.builds(
        lambda n, v: image(pixels=bytes([v % 256]) * n),
        st.sampled_from([783, 784, 785]),
        st.integers(0, 255),
    ),
    st.builds(
        lambda values: image(scaled=digits_pb2.ScaledPixels(values=values)),
        st.one_of(st.lists(floats, max_size=5), st.builds(lambda x: [x] * 784, floats)),
    ),
    st.builds(
        lambda b: image(encoded=b),
        st.one_of(
            st.binary(max_size=200),
            st.builds(png, st.integers(1, 40), st.integers(1, 40)),
            st.builds(lambda b, cut: b[:cut], st.just(png(28, 28)), st.integers(0, 80)),
        ),
    ),
    st.just(image()),
)
names = st.one_of(st.just(MODEL), st.just(""), st.text(max_size=20))
versions = st.one_of(
    st.just(""), st.just("1"), st.text(max_size=20), st.integers(-5, 10**20).map(str)
)


def test_malformed_requests_never_yield_internal(served):
    seen: set[grpc.StatusCode] = set()

    @settings(
        max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(name=names, version=versions, batch=st.lists(images, max_size=4))
    def classify(name, version, batch):
        code, details = status_of(
            served.digits.Classify,
            digits_pb2.ClassifyRequest(model_name=name, model_version=version, images=batch),
        )
        seen.add(code)
        assert code in CLIENT_ERRORS | {grpc.StatusCode.OK}, (code, details)

    @settings(
        max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(
        name=names,
        version=versions,
        datatype=st.sampled_from(["FP32", "UINT8", "INT64", "", "BYTES", "fp32"]),
        shape=st.lists(
            st.one_of(
                st.integers(-3, 3), st.sampled_from([28, 784]), st.integers(-(2**63), 2**63 - 1)
            ),
            max_size=4,
        ),
        raw=st.one_of(
            st.none(),
            st.binary(max_size=64),
            st.builds(lambda n: b"\0" * n, st.sampled_from([784, 3136, 6272])),
        ),
        typed=st.one_of(
            st.none(), st.lists(floats, max_size=8), st.builds(lambda x: [x] * 784, floats)
        ),
        uints=st.lists(st.integers(0, 2**32 - 1), max_size=5),
        outputs=st.lists(st.sampled_from(["probabilities", "label", "logits", ""]), max_size=3),
        extra_inputs=st.integers(0, 2),
    )
    def model_infer(name, version, datatype, shape, raw, typed, uints, outputs, extra_inputs):
        contents = pb.InferTensorContents(fp32_contents=typed or [], uint_contents=uints)
        tensor = Tensor(
            name="x",
            datatype=datatype,
            shape=shape,
            contents=contents if typed is not None or uints else None,
        )
        request = pb.ModelInferRequest(
            model_name=name,
            model_version=version,
            inputs=[tensor] * (1 + extra_inputs),
            raw_input_contents=[] if raw is None else [raw],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
        )
        code, details = status_of(served.kserve.ModelInfer, request)
        seen.add(code)
        assert code in CLIENT_ERRORS | {grpc.StatusCode.OK}, (code, details)

    classify()
    model_infer()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    assert (
        served.digits.Classify(
            digits_pb2.ClassifyRequest(images=[image(pixels=digit_pixels(1)[0].tobytes())])
        ).model_version
        == 1
    )
