"""Prometheus metrics of the inference service, and the wrapper that counts and times every RPC."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from inference_service.errors import RequestError

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "inference_requests_total", "RPCs answered, by method and status code.", ["method", "code"]
)
LATENCY = Histogram(
    "inference_request_seconds",
    "Time spent answering an RPC, by method.",
    ["method"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BATCH_ROWS = Histogram(
    "inference_batch_rows",
    "Images in one forward pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
MODEL_VERSION = Gauge(
    "inference_model_version", "Version answering requests that name none.", ["model"]
)
RELOADS = Counter("inference_reloads_total", "Versions loaded, verified and swapped in.", ["model"])
RELOAD_FAILURES = Counter(
    "inference_reload_failures_total", "Versions rejected by verification or warm-up.", ["model"]
)
LOAD_SECONDS = Histogram(
    "inference_load_seconds",
    "Fetch, verification and warm-up time of one version.",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
REDIS_ERRORS = Counter(
    "inference_redis_errors_total", "Failed reads of the registry while following it."
)

Handler = TypeVar("Handler", bound=Callable[..., Any])


def observed_rpc(method: str) -> Callable[[Handler], Handler]:
    """Count and time an RPC handler and turn RequestError into its status code.

    Anything else escaping the handler is a bug of the server: it is logged with its traceback
    and answered INTERNAL without details.
    """
    latency = LATENCY.labels(method)
    ok = REQUESTS.labels(method, grpc.StatusCode.OK.name)

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def observed(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response = handler(self, request, context)
            except RequestError as exc:
                REQUESTS.labels(method, exc.code.name).inc()
                latency.observe(time.perf_counter() - start)
                context.abort(exc.code, exc.message)
            except Exception:
                log.exception("unexpected failure in %s", method, extra={"method": method})
                REQUESTS.labels(method, grpc.StatusCode.INTERNAL.name).inc()
                context.abort(grpc.StatusCode.INTERNAL, f"{method} failed; see the server log")
            ok.inc()
            latency.observe(time.perf_counter() - start)
            return response

        return observed  # type: ignore[return-value]

    return wrap


def serve_metrics(port: int, host: str = "0.0.0.0") -> Callable[[], None]:
    """Expose the metrics over HTTP on ``port``; returns the function that stops the server."""
    server, thread = start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)

    return stop
