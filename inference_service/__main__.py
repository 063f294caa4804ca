"""``python -m inference_service``: serve published models over gRPC, following the registry.

The first SIGTERM or SIGINT stops taking requests and lets running ones finish (for up to
--grace-seconds); a second one exits at once.

Flags override the environment (GRPC_PORT, METRICS_PORT, REDIS_URL), which overrides defaults.
"""

from __future__ import annotations

import os

# Concurrency comes from concurrent requests: a multithreaded BLAS on top oversubscribes the
# cores (a batch of 64 measured 4x slower on 2 cores). Must be set before NumPy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import logging
import sys

import redis

from inference_service.logs import configure_logging
from inference_service.metrics import serve_metrics
from inference_service.models import LATEST, BatchingConfig, ModelStore
from inference_service.server import InferenceServer
from inference_service.watcher import ModelWatcher
from shared import defaults
from shared.registry import Registry
from shared.shutdown import ShutdownRequest, stop_on_signals
from shared.snapshot import check_name

log = logging.getLogger("inference_service")


def model_policy(text: str) -> tuple[str, str]:
    """``NAME`` or ``NAME=POLICY`` with POLICY latest, an alias or a version number."""
    name, _, policy = text.partition("=")
    try:
        check_name(name)
        if policy:
            check_name(policy, "policy")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--model {text!r}: {exc}") from None
    if _ and not policy:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=POLICY, got {text!r}")
    return name, policy or LATEST


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m inference_service", description=__doc__)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--grpc-port", type=int, default=int(env.get("GRPC_PORT", defaults.GRPC_PORT)))
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(env.get("METRICS_PORT", defaults.METRICS_PORT)),
        help="Prometheus metrics over HTTP; 0 turns them off",
    )
    p.add_argument("--redis-url", default=env.get("REDIS_URL", defaults.REDIS_URL))
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        type=model_policy,
        metavar="NAME[=POLICY]",
        help="serve NAME (repeatable); POLICY is latest (default), an alias or a "
        "version number. Without --model every published model is served.",
    )
    p.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=defaults.BATCHING,
        help="adaptive dynamic batching of concurrent requests (never waits on an empty queue)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=defaults.MAX_BATCH,
        help="with --batching: images in one forward pass",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=defaults.MAX_QUEUE_DELAY_MS,
        help="how long a batch may wait to fill up; 0 never waits",
    )
    p.add_argument("--workers", type=int, default=defaults.SERVER_WORKERS)
    p.add_argument("--max-message-bytes", type=int, default=defaults.MAX_MESSAGE_BYTES)
    p.add_argument("--reconcile-seconds", type=float, default=defaults.RECONCILE_SECONDS)
    p.add_argument("--grace-seconds", type=float, default=defaults.SHUTDOWN_GRACE_SECONDS)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    stop = ShutdownRequest()
    stop_on_signals(stop, lambda name: log.info("stop requested", extra={"signal": name}))

    # Socket timeout above the watcher's blocking read, so a silent network fails it, not hangs.
    client = redis.Redis.from_url(
        args.redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=defaults.EVENTS_BLOCK_SECONDS + 5.0,
    )
    registry = Registry(client)
    store = ModelStore(
        registry,
        dict(args.models) if args.models else None,
        batching=BatchingConfig(
            max_rows=args.max_batch if args.batching else 1,
            max_delay_seconds=args.max_queue_delay_ms / 1000,
        ),
    )
    server = InferenceServer(
        store,
        host=args.host,
        port=args.grpc_port,
        workers=args.workers,
        max_message_bytes=args.max_message_bytes,
    ).start()
    stop_metrics = serve_metrics(args.metrics_port) if args.metrics_port else None
    watcher = ModelWatcher(store, registry, reconcile_seconds=args.reconcile_seconds).start()
    log.info(
        "started",
        extra={
            "grpc_port": server.port,
            "metrics_port": args.metrics_port,
            "models": dict(args.models or []) or "all",
        },
    )

    stop.wait()
    log.info("stopping: finishing in-flight requests", extra={"grace": args.grace_seconds})
    server.stop(args.grace_seconds)
    watcher.stop()
    if stop_metrics:
        stop_metrics()
    client.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
