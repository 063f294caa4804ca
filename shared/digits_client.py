"""Classify digits over gRPC with the ``mnist.v1.Digits`` service: arrays in, arrays out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from shared.wire.mnist.v1 import digits_pb2, digits_pb2_grpc

PIXELS = 784


@dataclass(frozen=True)
class Classification:
    """Answers for a batch: ``labels (n,)``, ``probabilities (n, classes)`` and who answered."""

    labels: np.ndarray
    probabilities: np.ndarray
    model_name: str
    model_version: int


class DigitsClient:
    """A channel to an inference server; ``grpc.RpcError`` carries the server's status."""

    def __init__(
        self, target: str, *, timeout: float | None = 10.0, max_message_bytes: int | None = None
    ) -> None:
        options = []
        if max_message_bytes:
            options = [
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ]
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = digits_pb2_grpc.DigitsStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DigitsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def classify_pixels(
        self, pixels: np.ndarray, *, model: str = "", version: str | int = ""
    ) -> Classification:
        """Classify uint8 images ``(n, 28, 28)`` or ``(n, 784)`` of 0..255 pixels (0 = paper)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, PIXELS)
        images = [digits_pb2.Image(pixels=row.tobytes()) for row in pixels]
        return self._classify(images, model, version)

    def classify_scaled(
        self, rows: np.ndarray, *, model: str = "", version: str | int = ""
    ) -> Classification:
        """Classify rows ``(n, 784)`` already scaled as the model's manifest says."""
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, PIXELS)
        images = [
            digits_pb2.Image(scaled=digits_pb2.ScaledPixels(values=row.tolist())) for row in rows
        ]
        return self._classify(images, model, version)

    def classify_encoded(
        self, files: Sequence[bytes], *, model: str = "", version: str | int = ""
    ) -> Classification:
        """Classify 28x28 PNG or JPEG files (the server neither resizes nor centres them)."""
        return self._classify([digits_pb2.Image(encoded=data) for data in files], model, version)

    def list_models(self):
        """The server's ``ListModelsResponse``: models, policies, versions and their states."""
        return self.stub.ListModels(digits_pb2.ListModelsRequest(), timeout=self.timeout)

    def _classify(self, images, model: str, version: str | int) -> Classification:
        response = self.stub.Classify(
            digits_pb2.ClassifyRequest(model_name=model, model_version=str(version), images=images),
            timeout=self.timeout,
        )
        probabilities = np.array(
            [list(p.probabilities) for p in response.predictions], dtype=np.float32
        )
        labels = np.array([p.label for p in response.predictions], dtype=np.int64)
        return Classification(labels, probabilities, response.model_name, response.model_version)
