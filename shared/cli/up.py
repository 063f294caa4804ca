"""``mnistctl up``: the whole stack as local processes (Redis, a trainer, the inference service).

It submits a training job, shows its progress, classifies test digits over gRPC as soon as the
first snapshot is served, and keeps serving until Ctrl-C, which stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import defaults
from shared.dataset import Dataset
from shared.digits_client import DigitsClient
from shared.mnist import load_mnist
from shared.presets import PRESETS
from shared.redis_server import RedisServer

MODEL = "digits"  # the model name the default job publishes under
SHOW_DIGITS = 10  # test digits classified and printed once a snapshot is served
STOP_SECONDS = 15.0  # how long a child gets to exit after SIGTERM before SIGKILL


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run Redis, a trainer and the inference service locally, train and serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", metavar="DIR", help="folder holding the four MNIST files")
    parser.add_argument("--download", action="store_true", help="fetch missing MNIST files")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--limit", type=int, help="train on the first N images only")
    parser.add_argument("--grpc-port", type=int, default=defaults.GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=defaults.METRICS_PORT)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument(
        "--once", action="store_true", help="stop everything once the job has finished"
    )
    parser.set_defaults(run=run)


def trainer_data_flags(args: argparse.Namespace) -> list[str]:
    """The trainer finds MNIST as this command did: same --data, same $MNIST_DIR, same cache."""
    return (["--data", args.data] if args.data else []) + (["--download"] if args.download else [])


class Stack:
    """The processes ``up`` started; ``stop`` ends them all, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.redis: RedisServer | None = None

    def spawn(self, name: str, module: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        # Children ignore the terminal's Ctrl-C: the stack stops them in order instead.
        child = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.children.append((name, child))
        return child

    def check_alive(self) -> None:
        for name, child in self.children:
            if child.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{name} exited with {child.returncode}:\n{tail}")

    def stop(self) -> None:
        for _, child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for _, child in reversed(self.children):
            try:
                child.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if self.redis is not None:
            self.redis.close()


def wait_until_serving(address: str, stack: Stack, timeout: float) -> None:
    """Follow the health service's Watch stream until the model is SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            stack.check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the inference service at {address} served nothing")
            try:
                for reply in stub.Watch(
                    health_pb2.HealthCheckRequest(service=""), timeout=min(remaining, 5.0)
                ):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as exc:
                # DEADLINE_EXCEEDED: look at the children again; UNAVAILABLE: not listening yet.
                if exc.code() not in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    raise
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    channel_ready = grpc.channel_ready_future(channel)
                    with contextlib.suppress(grpc.FutureTimeoutError):
                        channel_ready.result(timeout=min(remaining, 1.0))


def show_predictions(address: str, test: Dataset, out) -> float:
    """Classify the first test digits over gRPC and print each answer; returns the accuracy."""
    images = test.features[:SHOW_DIGITS]
    truth = test.labels[:SHOW_DIGITS]
    with DigitsClient(address) as client:
        answer = client.classify_pixels(images, model=MODEL)
    confidence = answer.probabilities.max(axis=1)
    for i, (label, true, p) in enumerate(zip(answer.labels, truth, confidence, strict=True)):
        mark = "ok" if label == true else "WRONG"
        print(f"  test digit {i}: predicted {label} ({p:.1%}), true {true}  {mark}", file=out)
    accuracy = float(np.mean(answer.labels == truth))
    print(
        f"  {answer.model_name} v{answer.model_version}: {accuracy:.0%} of {SHOW_DIGITS} right",
        file=out,
    )
    return accuracy


def run(args: argparse.Namespace) -> int:
    from shared.cli.jobs import watch
    from trainer_service.queue import submit_job

    out = sys.stdout
    try:
        _, test = load_mnist(args.data, download=args.download)  # says how to fix a miss
    except ValueError as exc:
        print(f"mnistctl up: {exc}", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="mnistctl-up-"))
    stack = Stack(log_dir)
    try:
        if args.redis_url:
            url = args.redis_url
        else:
            stack.redis = RedisServer(data_dir=log_dir).start()
            url = stack.redis.url
        print(f"redis      {url}  (logs in {log_dir})", file=out)
        stack.spawn("trainer", "trainer_service", "--redis-url", url, *trainer_data_flags(args))
        address = f"localhost:{args.grpc_port}"
        stack.spawn(
            "inference",
            "inference_service",
            "--redis-url",
            url,
            "--grpc-port",
            str(args.grpc_port),
            "--metrics-port",
            str(args.metrics_port),
            "--model",
            MODEL,
        )
        print(f"inference  {address} (gRPC), metrics on :{args.metrics_port}", file=out)

        job: dict = {"model": MODEL, "preset": args.preset, "publish": {"every_epoch": True}}
        if args.epochs:
            job["epochs"] = args.epochs
        if args.limit:
            job["limit"] = args.limit
        client = redis.Redis.from_url(url)
        job_id, _ = submit_job(client, json.dumps(job))
        print(f"job        {job_id}: {json.dumps(job)}", file=out)

        served = threading.Event()

        def classify_once_served() -> None:
            # Runs beside the progress display: the first snapshot is served mid-training.
            with contextlib.suppress(Exception):
                wait_until_serving(address, stack, timeout=3600)
                print("first snapshot served; classifying test digits over gRPC:", file=out)
                show_predictions(address, test, out)
                served.set()

        threading.Thread(target=classify_once_served, daemon=True).start()
        code = watch(client, job_id)
        if code != 0:
            stack.check_alive()
            return code
        if not served.wait(timeout=120):
            stack.check_alive()
            print("mnistctl up: the inference service never reported SERVING", file=sys.stderr)
            return 1
        print("after training:", file=out)
        show_predictions(address, test, out)
        if args.once:
            return 0
        print(f"serving on {address}; Ctrl-C stops everything", file=out)
        while True:
            stack.check_alive()
            time.sleep(1.0)  # nothing to wait for but Ctrl-C or a child's death
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError, redis.RedisError, grpc.RpcError) as exc:
        print(f"mnistctl up: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping ...", file=sys.stderr)
        stack.stop()
