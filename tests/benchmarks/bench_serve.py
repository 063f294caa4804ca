"""Load-test the inference service on loopback against a bare grpcio echo server.

    python tests/benchmarks/bench_serve.py [--json] [--rounds 6] [--seconds 0.5] [--workers 2 4]

Starts a real redis-server, publishes a 784-128-64-10 network and a 784-1024-1024-10 one, and
runs ``python -m inference_service`` with its defaults (batching off) and with ``--batching``,
plus an echo server (generic handler, bytes in, the same bytes out: gRPC's own cost and nothing
else), each in its own process. A closed-loop load generator keeps ``concurrency`` requests
outstanding for single images and batches of 64, sending every server the same serialized
request, and reports requests/s, images/s, p50/p99 latency and the CPU time the server and the
client spent per call; rounds rotate between the servers so background load hits them alike.
The wide network shows where batching pays (its forward pass costs as much as gRPC). Then new
versions are published under load and the time to the first answer from each is measured. With
``--json`` the last line is one JSON object holding the headline figures. ``--workers`` takes
several thread counts: the first is the headline's, and each other one adds a plain server and
an echo server with that many threads to the single-image setups of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shared import defaults  # noqa: E402
from shared.mlp import MLP  # noqa: E402
from shared.redis_server import RedisServer, free_port  # noqa: E402
from shared.registry import Registry  # noqa: E402
from shared.snapshot import snapshot_manifest  # noqa: E402
from shared.wire.mnist.v1 import digits_pb2  # noqa: E402

MODEL = "bench"
WIDE = "bench-wide"  # a network whose forward pass costs as much as gRPC: where batching pays
SIZES = {MODEL: (784, 128, 64, 10), WIDE: (784, 1024, 1024, 10)}
ECHO_METHOD = "/bench.Echo/Echo"
CLASSIFY_METHOD = "/mnist.v1.Digits/Classify"
CONCURRENCY = (1, 8, 32)
BATCHES = (1, 64)
WARMUP_SECONDS = 0.2
CALL_TIMEOUT_SECONDS = 30.0  # a hung call shows up as an error instead of a hung benchmark


def echo_server(port: int, workers: int) -> None:
    """A bare grpcio server whose one method returns the request bytes unchanged."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def wait_until_listening(target: str) -> grpc.Channel:
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


def network(seed: int, sizes: tuple[int, ...]) -> MLP:
    activations = ("relu",) * (len(sizes) - 2) + ("softmax",)
    return MLP.create(sizes, activations, "cross_entropy", rng=np.random.default_rng(seed))


def publish(registry: Registry, seed: int, name: str = MODEL) -> int:
    model = network(seed, SIZES[name])
    manifest = snapshot_manifest(model, model_name=name, metrics={"test_accuracy": 0.0})
    return registry.publish_snapshot(model, manifest)


class ClosedLoop:
    """Keeps ``concurrency`` calls outstanding for a while; records latencies and answers."""

    def __init__(self, call, request, concurrency: int, seconds: float, on_answer=None) -> None:
        self.call, self.request, self.concurrency = call, request, concurrency
        self.on_answer = on_answer
        self.last_answer = None
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.calls = 0  # answered or failed, warm-up included: what the CPU figures divide by
        self.server_cpu = self.client_cpu = 0.0  # seconds over the whole loop, warm-up included
        self.errors = 0
        self.outstanding = concurrency
        self.done = threading.Event()
        self.start = time.perf_counter() + WARMUP_SECONDS
        self.end = self.start + seconds

    def run(self, server_pid: int | None = None) -> ClosedLoop:
        cpu_before = cpu_seconds(server_pid), time.process_time()
        for _ in range(self.concurrency):
            self._issue()
        if not self.done.wait(self.end - time.perf_counter() + CALL_TIMEOUT_SECONDS + 5):
            raise RuntimeError(f"{self.outstanding} calls never completed")
        self.server_cpu = cpu_seconds(server_pid) - cpu_before[0]
        self.client_cpu = time.process_time() - cpu_before[1]
        return self

    def stop(self) -> None:
        self.end = time.perf_counter()

    def _issue(self) -> None:
        sent = time.perf_counter()
        future = self.call.future(self.request, timeout=CALL_TIMEOUT_SECONDS)
        future.add_done_callback(lambda f: self._finished(f, sent))

    def _finished(self, future, sent: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.calls += 1
        try:
            answer = future.result()
        except Exception:  # an RpcError, a timeout: counted, and the loop goes on
            with self.lock:
                self.errors += 1
            answer = None
        try:
            if answer is not None:
                self.last_answer = answer
                if self.on_answer is not None:
                    self.on_answer(answer, now)
            if self.start <= now <= self.end:
                with self.lock:
                    self.latencies.append(now - sent)
            if now < self.end:
                self._issue()
                return
        except Exception:
            with self.lock:
                self.errors += 1
        with self.lock:
            self.outstanding -= 1
            if self.outstanding == 0:
                self.done.set()


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU time a process has used so far (0 without a pid)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def figures(loops: list[ClosedLoop], seconds: float, images: int) -> dict:
    """Requests/s, images/s, latency percentiles and CPU per call, pooled over the rounds."""
    lat = np.concatenate([loop.latencies for loop in loops]) * 1000
    rps = len(lat) / (seconds * len(loops))
    calls = sum(loop.calls for loop in loops)
    return {
        "rps": round(rps, 1),
        "images_per_s": round(rps * images, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "server_cpu_us": round(sum(loop.server_cpu for loop in loops) / calls * 1e6, 1),
        "client_cpu_us": round(sum(loop.client_cpu for loop in loops) / calls * 1e6, 1),
        "errors": sum(loop.errors for loop in loops),
    }


def classify_call(channel: grpc.Channel):
    return channel.unary_unary(
        CLASSIFY_METHOD,
        request_serializer=digits_pb2.ClassifyRequest.SerializeToString,
        response_deserializer=digits_pb2.ClassifyResponse.FromString,
    )


def classify_request(images: int, model: str = MODEL) -> digits_pb2.ClassifyRequest:
    pixels = np.random.default_rng(images).integers(0, 256, (images, 784), dtype=np.uint8)
    return digits_pb2.ClassifyRequest(
        model_name=model, images=[digits_pb2.Image(pixels=row.tobytes()) for row in pixels]
    )


def start_inference(redis_url: str, port: int, workers: int, *flags: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "inference_service",
        "--model",
        MODEL,
        "--model",
        WIDE,
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(port),
        "--metrics-port",
        "0",
        "--workers",
        str(workers),
        "--log-level",
        "WARNING",
        *flags,
    ]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "REDIS_URL": redis_url})


def start_echo(port: int, workers: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--echo-server", str(port), "--workers", str(workers)]
    return subprocess.Popen(command)


def pick(channels: dict[str, grpc.Channel], names: tuple[str, ...]) -> dict[str, grpc.Channel]:
    return {name: channels[name] for name in names}


def measure(
    channels: dict[str, grpc.Channel],
    pids: dict[str, int],
    model: str,
    images: int,
    concurrency: int,
    args: argparse.Namespace,
) -> dict[str, dict]:
    """Figures per server for one setup; rounds rotate the order so none is always first."""
    request = classify_request(images, model)
    payload = request.SerializeToString()
    names = list(channels)
    pooled: dict[str, list[ClosedLoop]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            # Both clients send the same bytes and leave the answer as bytes: the client's CPU
            # (it shares the two cores) then costs both servers alike.
            method = ECHO_METHOD if name.startswith("echo") else CLASSIFY_METHOD
            loop = ClosedLoop(
                channels[name].unary_unary(method), payload, concurrency, args.seconds
            )
            pooled[name].append(loop.run(pids[name]))
            if not name.startswith("echo"):
                if loop.last_answer is None:
                    raise RuntimeError(f"{name}: no call was answered ({loop.errors} errors)")
                answer = digits_pb2.ClassifyResponse.FromString(loop.last_answer)
                if len(answer.predictions) != images:
                    raise RuntimeError(
                        f"{name}: {len(answer.predictions)} predictions, not {images}"
                    )
    return {name: figures(loops, args.seconds, images) for name, loops in pooled.items()}


def publish_to_serve(channel: grpc.Channel, registry: Registry, versions: int) -> list[float]:
    """Milliseconds from publishing a version to the first answer it produced, under load."""
    first_seen: dict[int, float] = {}
    seen = threading.Condition()

    def on_answer(answer, now: float) -> None:
        with seen:
            if answer.model_version not in first_seen:
                first_seen[answer.model_version] = now
                seen.notify_all()

    loop = ClosedLoop(classify_call(channel), classify_request(1), 4, 3600, on_answer)
    runner = threading.Thread(target=loop.run)
    runner.start()
    delays = []
    try:
        for seed in range(100, 100 + versions):
            published_at = time.perf_counter()
            version = publish(registry, seed)
            with seen:
                if not seen.wait_for(lambda v=version: v in first_seen, timeout=10):
                    raise RuntimeError(f"version {version} was not served within 10 s")
            delays.append((first_seen[version] - published_at) * 1000)
    finally:
        loop.stop()
        runner.join()
    return delays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--seconds", type=float, default=0.5, help="measured time per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per setup, interleaved")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[defaults.SERVER_WORKERS],
        help="server threads (the same for both servers); more counts compare them in one run",
    )
    parser.add_argument("--publications", type=int, default=20)
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        echo_server(args.echo_server, args.workers[0])
        return 0
    workers, *other_workers = args.workers

    processes: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    with RedisServer() as redis_server:
        registry = Registry(redis_server.client())
        publish(registry, 0)
        publish(registry, 0, WIDE)
        try:
            ports = {name: free_port() for name in ("classify", "classify_batched", "echo")}
            started = {
                "classify": start_inference(redis_server.url, ports["classify"], workers),
                "classify_batched": start_inference(
                    redis_server.url, ports["classify_batched"], workers, "--batching"
                ),
                "echo": start_echo(ports["echo"], workers),
            }
            for count in other_workers:
                ports[f"classify_w{count}"] = free_port()
                ports[f"echo_w{count}"] = free_port()
                started[f"classify_w{count}"] = start_inference(
                    redis_server.url, ports[f"classify_w{count}"], count
                )
                started[f"echo_w{count}"] = start_echo(ports[f"echo_w{count}"], count)
            processes += started.values()
            pids = {name: process.pid for name, process in started.items()}
            channels = {
                name: wait_until_listening(f"127.0.0.1:{port}") for name, port in ports.items()
            }
            headline_servers = ("classify", "classify_batched", "echo")
            setups = [
                (MODEL, images, c, channels if images == 1 else pick(channels, headline_servers))
                for images in BATCHES
                for c in CONCURRENCY
            ]
            classify_only = pick(channels, ("classify", "classify_batched"))
            setups += [(WIDE, 1, c, classify_only) for c in CONCURRENCY[1:]]
            for model, images, concurrency, servers in setups:
                figures_by_server = measure(servers, pids, model, images, concurrency, args)
                for name, numbers in figures_by_server.items():
                    prefix = "wide_" if model == WIDE else ""
                    key = f"{prefix}{name}_b{images}_c{concurrency}"
                    results[key] = numbers
                    print(f"{key:32s} {numbers}", flush=True)
            delays = publish_to_serve(channels["classify"], registry, args.publications)
            for channel in channels.values():
                channel.close()
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)

    headline = {
        "classify_rps_c32": results["classify_b1_c32"]["rps"],
        "classify_batched_rps_c32": results["classify_batched_b1_c32"]["rps"],
        "wide_rps_c32": results["wide_classify_b1_c32"]["rps"],
        "wide_batched_rps_c32": results["wide_classify_batched_b1_c32"]["rps"],
        "echo_rps_c32": results["echo_b1_c32"]["rps"],
        "ratio_echo_c32": round(
            results["classify_b1_c32"]["rps"] / results["echo_b1_c32"]["rps"], 3
        ),
        "p99_ms_c8": results["classify_b1_c8"]["p99_ms"],
        "echo_p99_ms_c8": results["echo_b1_c8"]["p99_ms"],
        "p99_ratio_c8": round(
            results["classify_b1_c8"]["p99_ms"] / results["echo_b1_c8"]["p99_ms"], 3
        ),
        "publish_to_serve_p50_ms": round(float(np.percentile(delays, 50)), 2),
        "publish_to_serve_p99_ms": round(float(np.percentile(delays, 99)), 2),
        "errors": sum(r["errors"] for r in results.values()),
        "by_workers": {
            count: {
                "ratio_echo_c32": round(
                    results[f"classify{tag}_b1_c32"]["rps"] / results[f"echo{tag}_b1_c32"]["rps"], 3
                ),
                "p99_ratio_c8": round(
                    results[f"classify{tag}_b1_c8"]["p99_ms"]
                    / results[f"echo{tag}_b1_c8"]["p99_ms"],
                    3,
                ),
                "classify_rps_c32": results[f"classify{tag}_b1_c32"]["rps"],
            }
            for count, tag in [(workers, ""), *((c, f"_w{c}") for c in other_workers)]
        },
        "runs": results,
    }
    print(f"publish->serve ms: {[round(d, 1) for d in delays]}")
    if args.json:
        print(json.dumps(headline))
    else:
        print(json.dumps({k: v for k, v in headline.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
