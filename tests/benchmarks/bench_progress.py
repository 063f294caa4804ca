"""What reporting progress to Redis costs a training job (the target is under 2%).

Trains the same small job (784-128-10, batch 64, on the first --limit MNIST images) alternately
without callbacks and with the trainer's progress callbacks (ProgressReporter writing the status
hash and event stream every PROGRESS_INTERVAL_SECONDS, reading the cancel flag, plus the lease
heartbeat thread), against a real redis-server started for the purpose, and prints the overhead
ratio from the fastest of --repeats runs of each, in wall time and in the process's CPU time
(which counts the reporter's threads and is less disturbed by other work on a shared machine).
BLAS is single-threaded, as in the trainer service. On a shared machine pairs of runs differ by
several percent either way, so it also times the callbacks and one progress write directly and
turns that into a share of the job's training time, a figure the noise does not reach.

    python tests/benchmarks/bench_progress.py [--data DIR] [--limit 60000] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the trainer service runs
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shared import defaults  # noqa: E402
from shared.jobspec import parse_job  # noqa: E402
from shared.mnist import load_mnist  # noqa: E402
from shared.redis_server import RedisServer  # noqa: E402
from shared.training import BatchProgress, TrainingCallbacks, fit  # noqa: E402
from trainer_service.progress import ProgressReporter  # noqa: E402
from trainer_service.queue import JobQueue, LeaseKeeper, submit_job  # noqa: E402
from trainer_service.worker import build_model  # noqa: E402

JOB = {"model": "bench", "sizes": [784, 128, 10], "activations": ["relu", "softmax"],
       "optimiser": "momentum", "lr": 0.05, "batch_size": 64, "epochs": 3, "seed": 1}  # fmt: skip


class Reporting(TrainingCallbacks):
    """The progress part of the worker's callbacks: the same calls, without checkpoints."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self.stop = threading.Event()

    def on_batch(self, progress: BatchProgress) -> None:
        self.reporter.batch(progress)

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def on_epoch(self, report) -> None:
        self.reporter.record("epoch", **report.summary())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("MNIST_DIR") or str(REPO.parent / "shared" / "mnist")
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--limit", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    spec = parse_job({**JOB, "limit": args.limit})
    train, test = load_mnist(args.data)
    train = train.take(args.limit)
    test = test.take(2000)
    bare: list[tuple[float, float]] = []  # (wall, cpu) seconds
    reported: list[tuple[float, float]] = []
    writes = 0
    with RedisServer() as server:
        client = server.client()
        submit_job(client, json.dumps(JOB), "bench")
        queue = JobQueue(client, "bench-worker", lease_seconds=defaults.LEASE_SECONDS)
        queue.ensure_group()
        delivery = queue.claim(1.0)
        assert delivery is not None
        events_key = f"{defaults.KEY_PREFIX}:job:bench:events"

        def run_bare() -> None:
            model = build_model(spec)
            started, cpu = time.perf_counter(), time.process_time()
            fit(model, train, spec.training, test=test)
            bare.append((time.perf_counter() - started, time.process_time() - cpu))

        def run_reported() -> None:
            nonlocal writes
            model = build_model(spec)
            before = client.xlen(events_key)
            reporter = ProgressReporter(
                client, "bench", token=delivery.token, epochs=spec.training.epochs
            )
            callbacks = Reporting(reporter)
            assert queue.renew(delivery)  # progress writes are fenced by the lease
            with LeaseKeeper(queue, delivery, on_lost=callbacks.stop.set), reporter:
                started, cpu = time.perf_counter(), time.process_time()
                fit(model, train, spec.training, test=test, callbacks=callbacks)
                reported.append((time.perf_counter() - started, time.process_time() - cpu))
            writes = client.xlen(events_key) - before

        for i in range(args.repeats):  # alternate the order so neither always runs second
            for run in (run_bare, run_reported) if i % 2 == 0 else (run_reported, run_bare):
                run()

        # The same cost measured directly, free of run-to-run noise: the callbacks the training
        # thread makes per batch, and one write of buffered progress (done by another thread).
        assert queue.renew(delivery)
        reporter = ProgressReporter(client, "bench", token=delivery.token, epochs=3)
        callbacks = Reporting(reporter)
        sample = BatchProgress(0, 1, 938, 0.3, 0.9, 30_000.0, 0.05, 1.0)
        calls = 200_000
        started = time.perf_counter()
        for _ in range(calls):
            callbacks.on_batch(sample)
            callbacks.should_stop()
        per_batch = (time.perf_counter() - started) / calls
        flushes = 200
        started = time.perf_counter()
        for _ in range(flushes):
            reporter.record("progress", epoch=1, batch=1, loss=0.3, accuracy=0.9)
            reporter.flush()
        per_flush = (time.perf_counter() - started) / flushes
        client.close()

    wall = (min(w for w, _ in bare), min(w for w, _ in reported))
    cpu = (min(c for _, c in bare), min(c for _, c in reported))
    overhead, cpu_overhead = wall[1] / wall[0] - 1, cpu[1] / cpu[0] - 1
    result = {"bare_seconds": wall[0], "reported_seconds": wall[1], "overhead_ratio": overhead,
              "bare_cpu_seconds": cpu[0], "reported_cpu_seconds": cpu[1],
              "cpu_overhead_ratio": cpu_overhead, "events_per_run": writes,
              "batches_per_run": spec.training.epochs * -(-len(train) // 64),
              "interval_seconds": defaults.PROGRESS_INTERVAL_SECONDS}  # fmt: skip
    print(f"training {args.limit} images x {spec.training.epochs} epochs, batch 64, "
          f"{args.repeats} runs each (fastest shown)")  # fmt: skip
    print(f"  without progress callbacks: {wall[0]:.3f} s wall, {cpu[0]:.3f} s CPU")
    print(f"  with Redis progress:        {wall[1]:.3f} s wall, {cpu[1]:.3f} s CPU "
          f"({writes} events for {result['batches_per_run']} batches)")  # fmt: skip
    print(f"  overhead: {overhead:+.2%} wall, {cpu_overhead:+.2%} CPU")
    per_second = len(train) * spec.training.epochs / wall[0] / 64  # batches per second
    direct = per_batch * per_second + per_flush / defaults.PROGRESS_INTERVAL_SECONDS
    result.update(per_batch_seconds=per_batch, per_flush_seconds=per_flush, direct_ratio=direct)
    print(f"  measured directly: {per_batch * 1e6:.2f} us of callbacks per batch, "
          f"{per_flush * 1e3:.2f} ms per write every {defaults.PROGRESS_INTERVAL_SECONDS} s "
          f"= {direct:.3%} of this job's training time")  # fmt: skip
    pairs = sorted(r[1] / b[1] - 1 for b, r in zip(bare, reported, strict=True))
    print(f"  CPU overhead per pair of runs: {', '.join(f'{p:+.1%}' for p in pairs)}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
