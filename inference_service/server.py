"""The gRPC server: our Digits service, the Open Inference Protocol, health and reflection."""

from __future__ import annotations

import functools
import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from inference_service.digits_servicer import DigitsServicer
from inference_service.kserve_servicer import KServeServicer
from inference_service.models import ModelStore
from shared import defaults
from shared.wire.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from shared.wire.mnist.v1 import digits_pb2, digits_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = (
    digits_pb2.DESCRIPTOR.services_by_name["Digits"].full_name,
    grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def on_own_threads(servicer: object, method: str, pool: futures.ThreadPoolExecutor) -> None:
    """Run ``servicer``'s RPC ``method`` on ``pool`` instead of the server's request threads.

    The threaded server keeps a thread for the whole life of a stream, so a few long streams
    (a health Watch lasts as long as its client) could take every request thread. grpcio runs a
    handler that carries an ``experimental_thread_pool`` on that pool instead (see
    ``_select_thread_pool_for_behavior`` in grpc/_server.py; a test holds streams open on a
    one-thread server and classifies).
    """
    handler = functools.partial(getattr(type(servicer), method), servicer)
    setattr(handler, "experimental_thread_pool", pool)  # noqa: B010 (partial has no such slot)
    setattr(servicer, method, handler)


class InferenceServer:
    """A gRPC server answering from ``store``; health is SERVING once every model is loaded."""

    def __init__(
        self,
        store: ModelStore,
        *,
        host: str = "0.0.0.0",
        port: int = defaults.GRPC_PORT,
        workers: int = defaults.SERVER_WORKERS,
        max_message_bytes: int = defaults.MAX_MESSAGE_BYTES,
        stream_workers: int = defaults.STREAM_WORKERS,
    ) -> None:
        self.store = store
        self.health = health.HealthServicer()
        self.stream_pool = futures.ThreadPoolExecutor(
            max_workers=stream_workers, thread_name_prefix="grpc-stream"
        )
        on_own_threads(self.health, "Watch", self.stream_pool)
        reflector = reflection.ReflectionServicer(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        )
        on_own_threads(reflector, "ServerReflectionInfo", self.stream_pool)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        digits_pb2_grpc.add_DigitsServicer_to_server(DigitsServicer(store), self.server)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(store), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        store.on_change = self.update_health
        self.update_health()

    def update_health(self) -> None:
        status = SERVING if self.store.ready() else NOT_SERVING
        for service in ("", *SERVICES):
            self.health.set(service, status)

    def start(self) -> InferenceServer:
        self.server.start()
        log.info("listening", extra={"port": self.port})
        return self

    def stop(self, grace_seconds: float) -> None:
        """Refuse new RPCs, let running ones finish for up to ``grace_seconds``, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_seconds).wait()
        self.stream_pool.shutdown(wait=False, cancel_futures=True)
