"""Helpers for the inference tests: tiny models, publication, and a server on a loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import redis

from inference_service.models import BatchingConfig, ModelStore
from inference_service.server import InferenceServer
from inference_service.watcher import ModelWatcher
from shared.mlp import MLP
from shared.registry import Registry
from shared.snapshot import encode_snapshot, snapshot_manifest
from shared.wire.inference import grpc_predict_v2_pb2_grpc
from shared.wire.mnist.v1 import digits_pb2_grpc

MODEL = "digits"


def tiny_model(seed: int = 0, hidden: int = 16, dtype: str = "float32") -> MLP:
    """A random 784-hidden-10 softmax network: enough to tell versions apart, cheap to run."""
    return MLP.create(
        (784, hidden, 10),
        ("relu", "softmax"),
        "cross_entropy",
        rng=np.random.default_rng(seed),
        dtype=dtype,
    )


def manifest_for(model: MLP, name: str = MODEL) -> dict:
    return snapshot_manifest(
        model, model_name=name, metrics={"test_accuracy": 0.5, "test_loss": 1.0}
    )


def publish(registry: Registry, model: MLP, name: str = MODEL) -> int:
    return registry.publish_snapshot(model, manifest_for(model, name))


def corrupt_snapshots(seed: int = 99) -> dict[str, tuple[bytes, dict]]:
    """Encoded snapshots that decode_snapshot must refuse, each for a different reason."""
    model = tiny_model(seed)
    weights, manifest = encode_snapshot(model, manifest_for(model))
    bad_hash = bytearray(weights)
    bad_hash[len(bad_hash) // 2] ^= 0xFF
    wide = tiny_model(seed, hidden=32)
    wide_weights, wide_manifest = encode_snapshot(wide, manifest_for(wide))
    wrong_shape = {**wide_manifest, "sizes": [784, 16, 10]}  # hash fine, arrays 32 wide
    nan_model = tiny_model(seed)
    nan_model.weights[0][3, 4] = np.nan
    nan_weights, nan_manifest = encode_snapshot(nan_model, manifest_for(nan_model))
    return {
        "bad_hash": (bytes(bad_hash), manifest),
        "wrong_shape": (wide_weights, wrong_shape),
        "nan": (nan_weights, nan_manifest),
    }


def digit_pixels(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 784), dtype=np.uint8)


@dataclass
class Serving:
    """A running server with its store, watcher and client stubs."""

    server: InferenceServer
    store: ModelStore
    watcher: ModelWatcher
    channel: grpc.Channel

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def digits(self) -> digits_pb2_grpc.DigitsStub:
        return digits_pb2_grpc.DigitsStub(self.channel)

    @property
    def kserve(self) -> grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub:
        return grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(self.channel)


@contextlib.contextmanager
def serving(
    client: redis.Redis,
    policies: dict[str, str] | None = None,
    *,
    max_rows: int = 64,
    max_message_bytes: int = 4 * 1024 * 1024,
    reconcile_seconds: float = 30.0,
    workers: int = 8,
) -> Iterator[Serving]:
    """An inference server on a free loopback port following the registry in ``client``."""
    registry = Registry(client)
    store = ModelStore(registry, policies, batching=BatchingConfig(max_rows=max_rows))
    server = InferenceServer(
        store, host="127.0.0.1", port=0, workers=workers, max_message_bytes=max_message_bytes
    ).start()
    watcher = ModelWatcher(
        store,
        registry,
        reconcile_seconds=reconcile_seconds,
        block_seconds=0.2,
        backoff_max_seconds=0.5,
    ).start()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    try:
        yield Serving(server, store, watcher, channel)
    finally:
        channel.close()
        watcher.stop()
        server.stop(1.0)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds; for states that have no event to await."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
