"""``python -m trainer_service``: flags and environment, connect to Redis, run the worker loop.

Environment (flags win): REDIS_URL (redis:// or rediss://, password in the URL), MNIST_DIR,
MNIST_DOWNLOAD=1, TRAINER_WORKER_ID, TRAINER_LEASE_SECONDS, TRAINER_MAX_DELIVERIES,
JOB_RETENTION_SECONDS.
The first SIGTERM or SIGINT stops training at the next batch and hands the job back; a second
one exits at once (the job is then reclaimed when its lease expires).
"""

from __future__ import annotations

import os

# One BLAS thread per worker: scale by running one worker per core. Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import logging
import sys

from shared import defaults
from shared.shutdown import stop_on_signals
from trainer_service.queue import connect
from trainer_service.worker import Worker, default_worker_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m trainer_service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--redis-url", default=env("REDIS_URL", defaults.REDIS_URL))
    parser.add_argument("--worker-id", default=env("TRAINER_WORKER_ID") or default_worker_id())
    parser.add_argument("--data", default=env("MNIST_DIR"), help="folder holding the MNIST files")
    parser.add_argument(
        "--download",
        action="store_true",
        default=env("MNIST_DOWNLOAD") == "1",
        help="download missing MNIST files into the cache (SHA-256 checked)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=float(env("TRAINER_LEASE_SECONDS", defaults.LEASE_SECONDS)),
    )
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=int(env("TRAINER_MAX_DELIVERIES", defaults.MAX_DELIVERIES)),
    )
    parser.add_argument(
        "--job-retention-seconds",
        type=float,
        default=float(env("JOB_RETENTION_SECONDS", defaults.JOB_RETENTION_SECONDS)),
        help="how long a finished job's status and events stay in Redis (0: forever)",
    )
    parser.add_argument(
        "--progress-interval", type=float, default=defaults.PROGRESS_INTERVAL_SECONDS
    )
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    client = connect(args.redis_url)
    worker = Worker(
        client,
        args.worker_id,
        data_dir=args.data,
        download=args.download,
        lease_seconds=args.lease_seconds,
        max_deliveries=args.max_deliveries,
        retention_seconds=args.job_retention_seconds,
        progress_interval=args.progress_interval,
    )

    stop_on_signals(  # a second signal leaves at once; the job's lease then expires on its own
        worker.shutdown,
        lambda name: logging.getLogger("trainer_service").info(
            "%s: stopping at the next batch and handing the job back", name
        ),
    )
    worker.run(max_jobs=args.max_jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
