"""How quickly the trainer reacts: submit -> running on an idle worker, and take-over after SIGKILL.

Starts a redis-server and real ``python -m trainer_service`` processes on tiny generated MNIST.

- pickup: with one idle, warmed-up worker, time from ``submit_job`` returning to the job's
  ``running`` state event (the worker has claimed it, holds the lease and starts training).
- recovery: with two workers, SIGKILL the one running a job after its second epoch and time
  until the other has claimed it (``job ...: claimed`` in its log); set by the lease.

    python tests/benchmarks/bench_trainer_latency.py [--jobs 20] [--kills 3] [--lease 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from trainer_support import (  # noqa: E402
    TOY_JOB,
    WorkerProcess,
    dumps,
    tiny_job,
    wait_for_event,
    wait_for_state,
    write_tiny_mnist,
)

from shared.redis_server import RedisServer  # noqa: E402
from trainer_service.queue import job_status, submit_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = write_tiny_mnist(Path(tempfile.mkdtemp(prefix="bench-mnist-")), train=1000, test=100)
    lease = ["--lease-seconds", str(args.lease)]
    long_job = tiny_job(epochs=30, batch_size=10)
    pickups: list[float] = []
    recoveries: list[float] = []
    with RedisServer() as server:
        client = server.client()
        worker = WorkerProcess(server.url, "idle", data, *lease)
        submit_job(client, dumps(TOY_JOB), "warm-up")
        wait_for_state(client, "warm-up", "succeeded")
        for i in range(args.jobs):
            started = time.perf_counter()
            submit_job(client, dumps(TOY_JOB), f"pickup{i}")
            wait_for_state(client, f"pickup{i}", "running")
            pickups.append(time.perf_counter() - started)
            wait_for_state(client, f"pickup{i}", "succeeded", "failed")
        worker.stop()

        pool = {name: WorkerProcess(server.url, name, data, *lease) for name in ("a", "b")}
        for i in range(args.kills):
            job_id = f"kill{i}"
            submit_job(client, dumps(long_job), job_id)
            wait_for_event(client, job_id, lambda e: e["event"] == "epoch" and e["epoch"] == "2")
            victim = job_status(client, job_id)["worker"]
            survivor = pool["b" if victim == "a" else "a"]
            mark = len(survivor.lines)
            pool[victim].signal(signal.SIGKILL)
            killed = time.perf_counter()
            survivor.wait_for_line(f"job {job_id}: claimed", start=mark)
            recoveries.append(time.perf_counter() - killed)
            wait_for_state(client, job_id, "succeeded", "failed")
            pool[victim].stop()
            pool[victim] = WorkerProcess(server.url, victim, data, *lease)
        for worker in pool.values():
            worker.stop()
        client.close()

    result = {
        "pickup_median_ms": statistics.median(pickups) * 1000,
        "pickup_max_ms": max(pickups) * 1000,
        "recovery_seconds": recoveries,
        "lease_seconds": args.lease,
    }
    print(f"submit -> running on an idle worker: median {result['pickup_median_ms']:.1f} ms, "
          f"max {result['pickup_max_ms']:.1f} ms over {args.jobs} jobs")  # fmt: skip
    print(
        f"SIGKILL -> claimed by another worker (lease {args.lease} s): "
        + ", ".join(f"{r:.2f} s" for r in recoveries)
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
