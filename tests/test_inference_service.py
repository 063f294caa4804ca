"""The inference server over real gRPC on loopback, following a real Redis registry."""

from __future__ import annotations

import io
import queue

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inference_support import (
    MODEL,
    corrupt_snapshots,
    digit_pixels,
    publish,
    serving,
    tiny_model,
    wait_for,
)
from PIL import Image

from inference_service import metrics
from inference_service.inputs import scale_pixels
from shared.digits_client import DigitsClient
from shared.registry import Registry
from shared.wire.inference import grpc_predict_v2_pb2 as pb
from shared.wire.mnist.v1 import digits_pb2


@pytest.fixture
def registry(redis_client) -> Registry:
    return Registry(redis_client)


def expected(model, pixels: np.ndarray) -> np.ndarray:
    """The network's own forward pass on the snapshot's weights."""
    return model.forward(scale_pixels(pixels, model))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.reshape(28, 28)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_equals_the_networks_forward_pass(redis_client, registry):
    model = tiny_model(1)
    version = publish(registry, model)
    pixels = digit_pixels(5)
    with serving(redis_client) as s:
        wait_for(s.store.ready, what="model loaded")
        with DigitsClient(s.target) as client:
            by_pixels = client.classify_pixels(pixels)
            by_scaled = client.classify_scaled(scale_pixels(pixels, model))
            by_png = client.classify_encoded([png(row) for row in pixels])
    want = expected(model, pixels)
    for answer in (by_pixels, by_scaled, by_png):
        assert (answer.model_name, answer.model_version) == (MODEL, version)
        np.testing.assert_allclose(answer.probabilities, want, rtol=1e-5, atol=1e-7)
        assert answer.labels.tolist() == want.argmax(axis=1).tolist()


def test_model_infer_raw_and_typed_equal_the_forward_pass(redis_client, registry):
    model = tiny_model(2)
    version = publish(registry, model)
    pixels = digit_pixels(3)
    scaled = scale_pixels(pixels, model).astype(np.float32)
    want = expected(model, pixels)
    with serving(redis_client) as s:
        wait_for(s.store.ready, what="model loaded")
        raw = s.kserve.ModelInfer(
            pb.ModelInferRequest(
                model_name=MODEL,
                id="r1",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[3, 784])
                ],
                raw_input_contents=[scaled.tobytes()],
            )
        )
        typed = s.kserve.ModelInfer(
            pb.ModelInferRequest(
                model_name=MODEL,
                model_version=str(version),
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="x",
                        datatype="UINT8",
                        shape=[3, 28, 28],
                        contents=pb.InferTensorContents(uint_contents=pixels.ravel().tolist()),
                    )
                ],
                outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
            )
        )
    assert (raw.model_name, raw.model_version, raw.id) == (MODEL, str(version), "r1")
    assert [o.name for o in raw.outputs] == ["probabilities", "label"]
    probabilities = np.frombuffer(raw.raw_output_contents[0], "<f4").reshape(3, 10)
    np.testing.assert_allclose(probabilities, want, rtol=1e-5, atol=1e-7)
    assert np.frombuffer(raw.raw_output_contents[1], "<i8").tolist() == want.argmax(1).tolist()
    assert not typed.raw_output_contents and [o.name for o in typed.outputs] == ["probabilities"]
    np.testing.assert_allclose(
        np.array(typed.outputs[0].contents.fp32_contents).reshape(3, 10), want, rtol=1e-5, atol=1e-7
    )


def test_versions_aliases_and_policies(redis_client, registry):
    models = [tiny_model(seed) for seed in (10, 11, 12)]
    v1, v2, v3 = (publish(registry, m) for m in models)
    registry.promote(MODEL, "production", v2)
    pixels = digit_pixels(2)
    with serving(redis_client, {MODEL: "production"}) as s:
        wait_for(lambda: s.store.ready(), what="production loaded")
        with DigitsClient(s.target) as client:
            assert client.classify_pixels(pixels).model_version == v2
            assert client.classify_pixels(pixels, version=v1).model_version == v1  # on demand
            pinned = client.classify_pixels(pixels, version=v3)
            np.testing.assert_allclose(
                pinned.probabilities, expected(models[2], pixels), rtol=1e-5, atol=1e-7
            )
            assert client.classify_pixels(pixels, version="latest").model_version == v3
            registry.promote(MODEL, "production", v3)
            wait_for(
                lambda: client.classify_pixels(pixels).model_version == v3, what="alias move served"
            )
            for bad in ("99", "staging"):
                with pytest.raises(grpc.RpcError) as err:
                    client.classify_pixels(pixels, version=bad)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, bad
            with pytest.raises(grpc.RpcError) as err:
                client.classify_pixels(pixels, model="nope")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            listing = client.list_models()
    [status] = listing.models
    assert (status.name, status.policy, status.serving_version) == (MODEL, "production", v3)
    states = {v.version: v.state for v in status.versions}
    assert states[v3] == digits_pb2.VersionStatus.SERVING
    assert states[v1] == states[v2] == digits_pb2.VersionStatus.STANDBY
    serving_status = next(v for v in status.versions if v.version == v3)
    assert list(serving_status.manifest.sizes) == [784, 16, 10]
    assert serving_status.manifest.labels == [str(i) for i in range(10)]


def test_nothing_loaded_is_unavailable_and_health_follows_loading(redis_client, registry):
    with serving(redis_client, {MODEL: "latest"}) as s:
        health = health_pb2_grpc.HealthStub(s.channel)
        check = health.Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not s.kserve.ServerReady(pb.ServerReadyRequest()).ready
        with DigitsClient(s.target) as client, pytest.raises(grpc.RpcError) as err:
            client.classify_pixels(digit_pixels(1))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        updates = health.Watch(health_pb2.HealthCheckRequest(service="mnist.v1.Digits"), timeout=10)
        assert next(updates).status == health_pb2.HealthCheckResponse.NOT_SERVING
        publish(registry, tiny_model(3))
        assert next(updates).status == health_pb2.HealthCheckResponse.SERVING  # event, no poll
        updates.cancel()
        assert s.kserve.ServerReady(pb.ServerReadyRequest()).ready
        assert s.kserve.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
        assert s.kserve.ServerLive(pb.ServerLiveRequest()).live
        meta = s.kserve.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
        assert meta.versions == ["1"] and meta.inputs[0].shape == [-1, 784]


def test_reflection_lists_the_services(redis_client):
    with serving(redis_client) as s:
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        [answer] = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    names = {service.name for service in answer.list_services_response.service}
    assert {
        "mnist.v1.Digits",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_open_streams_never_take_the_request_threads(redis_client, registry):
    """Health Watch and reflection streams last as long as their clients want: with several
    held open on a server that has one request thread, Classify still answers."""
    version = publish(registry, tiny_model(5))
    with serving(redis_client, workers=1) as s:
        wait_for(s.store.ready, what="a version loaded")
        health = health_pb2_grpc.HealthStub(s.channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(3)]
        hold = queue.Queue()

        def reflection_requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            hold.get()  # keeps the stream open until the test lets go

        reflections = reflection_pb2_grpc.ServerReflectionStub(s.channel).ServerReflectionInfo(
            reflection_requests(), timeout=30
        )
        try:
            for updates in watches:  # each answered: each stream is running on the server
                assert next(updates).status == health_pb2.HealthCheckResponse.SERVING
            assert next(reflections).list_services_response.service
            image = digits_pb2.Image(pixels=digit_pixels(1).tobytes())
            answer = s.digits.Classify(
                digits_pb2.ClassifyRequest(model_name=MODEL, images=[image]), timeout=5
            )
            assert answer.model_version == version
        finally:
            hold.put(None)
            for stream in (*watches, reflections):
                stream.cancel()


@pytest.mark.parametrize("kind", ["bad_hash", "wrong_shape", "nan"])
def test_a_corrupt_snapshot_is_rejected_and_the_old_version_serves(redis_client, registry, kind):
    good = publish(registry, tiny_model(4))
    weights, manifest = corrupt_snapshots()[kind]
    failures = metrics.RELOAD_FAILURES.labels(MODEL)
    with serving(redis_client) as s:
        wait_for(s.store.ready, what="good version loaded")
        before = failures._value.get()
        bad = registry.publish_encoded(weights, manifest)
        wait_for(lambda: bad in s.store.models[MODEL].rejected, what="rejection")
        assert failures._value.get() == before + 1
        with DigitsClient(s.target) as client:
            assert client.classify_pixels(digit_pixels(1)).model_version == good
            with pytest.raises(grpc.RpcError) as err:
                client.classify_pixels(digit_pixels(1), version=bad)
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
            [status] = client.list_models().models
        rejected = next(v for v in status.versions if v.version == bad)
        assert rejected.state == digits_pb2.VersionStatus.REJECTED and rejected.error


def test_a_corrupt_latest_at_start_up_serves_the_newest_good_version(redis_client, registry):
    good = publish(registry, tiny_model(6))
    bad = registry.publish_encoded(*corrupt_snapshots()["bad_hash"])
    with serving(redis_client) as s:
        wait_for(s.store.ready, what="a version loaded")
        assert s.store.models[MODEL].current.version == good
        assert bad in s.store.models[MODEL].rejected


def test_model_flag_parsing(monkeypatch):
    # Importing the entry point pins BLAS to one thread for later child processes: undo that.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from inference_service.__main__ import parse_args

    args = parse_args(["--model", "digits", "--model", "other=production", "--model", "x=3"])
    assert args.models == [("digits", "latest"), ("other", "production"), ("x", "3")]
    for bad in ("a:b", "digits=", "=latest"):
        with pytest.raises(SystemExit):
            parse_args(["--model", bad])


def test_several_models_are_served_at_once_each_by_its_policy(redis_client, registry):
    digits = [tiny_model(20), tiny_model(21)]
    for model in digits:
        publish(registry, model)
    other = tiny_model(22, hidden=8)
    publish(registry, other, name="other")
    pixels = digit_pixels(2)
    with serving(redis_client, {MODEL: "1", "other": "latest"}) as s:
        wait_for(s.store.ready, what="both models loaded")
        with DigitsClient(s.target) as client:
            with pytest.raises(grpc.RpcError) as err:  # two models: the name is required
                client.classify_pixels(pixels)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            pinned = client.classify_pixels(pixels, model=MODEL)
            assert (pinned.model_name, pinned.model_version) == (MODEL, 1)
            np.testing.assert_allclose(
                pinned.probabilities, expected(digits[0], pixels), rtol=1e-5, atol=1e-7
            )
            answer = client.classify_pixels(pixels, model="other")
            np.testing.assert_allclose(
                answer.probabilities, expected(other, pixels), rtol=1e-5, atol=1e-7
            )
            assert [m.name for m in client.list_models().models] == [MODEL, "other"]
