"""``mnistctl jobs``: submit training jobs to the queue, follow them, cancel, requeue, inspect.

``watch`` follows the job's event stream with blocking XREAD and exits with the job's final state:
0 succeeded, 1 failed, 3 dead-lettered, 4 cancelled (2: the command itself could not run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import redis

from shared import defaults, keys
from shared.jobspec import JobSpecError
from trainer_service.queue import (
    TERMINAL_STATES,
    cancel_job,
    connect,
    dead_letters,
    job_status,
    list_jobs,
    requeue_job,
    submit_job,
)

EXIT_CODES = {"succeeded": 0, "failed": 1, "dead-lettered": 3, "cancelled": 4}
EXIT_ERROR = 2
WATCH_BLOCK_MS = 5_000  # one XREAD waits this long; the loop waits as long as the job runs
BAR_WIDTH = 30


def register(subparsers: argparse._SubParsersAction) -> None:
    jobs = subparsers.add_parser(
        "jobs", help="training jobs on the Redis queue", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help)
        parser.add_argument(
            "--redis-url",
            help=f"Redis holding the queue (default: $REDIS_URL, then {defaults.REDIS_URL})",
        )
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(run=lambda args: _guarded(run, args))
        return parser

    submit = command("submit", run_submit, "submit a training job (JSON file, - for stdin)")
    submit.add_argument("file", nargs="?", help="job JSON file, or - to read standard input")
    submit.add_argument("--preset", help="base settings from a preset (fields override it)")
    submit.add_argument("--model", help="name the published model")
    submit.add_argument("--epochs", type=int, help="number of epochs")
    submit.add_argument("--limit", type=int, help="train on the first N examples only")
    submit.add_argument("--job-id", help="your id for the job: submitting it twice enqueues once")
    submit.add_argument("--watch", action="store_true", help="then follow it as `watch` does")

    listing = command("list", run_list, "the most recently submitted jobs")
    listing.add_argument("--count", type=int, default=20, help="how many (default 20)")

    for name, run, help in (
        ("show", run_show, "a job's status"),
        ("watch", run_watch, "follow a job's progress until it ends; exit with its outcome"),
        ("cancel", run_cancel, "cancel a queued job, or stop a running one"),
        ("requeue", run_requeue, "queue a dead-lettered, failed or cancelled job again"),
    ):
        command(name, run, help).add_argument("job_id")
    command("dead", run_dead, "jobs in the dead-letter stream")


def _client(args: argparse.Namespace) -> redis.Redis:
    return connect(args.redis_url or os.environ.get("REDIS_URL") or defaults.REDIS_URL)


def _guarded(run, args: argparse.Namespace) -> int:
    """Run a command; errors become one line on stderr and exit code 2."""
    try:
        return int(run(args))
    except (JobSpecError, LookupError, ValueError, OSError) as exc:
        print(f"mnistctl jobs: {exc}", file=sys.stderr)
    except redis.RedisError as exc:
        print(f"mnistctl jobs: redis: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _print_json(value: Any) -> None:
    print(json.dumps(value, sort_keys=True))


# --- submit -------------------------------------------------------------------------------------


def run_submit(args: argparse.Namespace) -> int:
    job: dict[str, Any] = {}
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        try:
            job = json.loads(text)
        except ValueError as exc:
            raise JobSpecError("job", f"is not valid JSON: {exc}") from None
        if not isinstance(job, dict):
            raise JobSpecError("job", "must be a JSON object")
    for name in ("preset", "model", "epochs", "limit"):
        if getattr(args, name) is not None:
            job[name] = getattr(args, name)
    if not job:
        raise ValueError("give a job file (or -), or at least --preset")
    client = _client(args)
    job_id, created = submit_job(client, json.dumps(job), args.job_id)
    if args.json:
        _print_json({"job_id": job_id, "created": created})
    elif created:
        print(job_id)
    else:
        print(f"{job_id} (already submitted; not enqueued again)")
    if args.watch:
        return watch(client, job_id, as_json=args.json)
    return 0


# --- list, show, dead ---------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    jobs = list_jobs(_client(args), args.count)
    if args.json:
        _print_json([{k: v for k, v in job.items() if k != "spec"} for job in jobs])
        return 0
    print(f"{'JOB':<20} {'STATE':<14} {'MODEL':<14} {'EPOCH':>9} {'ACCURACY':>9}  WORKER")
    for job in jobs:
        epoch = f"{job.get('epoch', '-')}/{job.get('epochs', '-')}"
        accuracy = job.get("test_accuracy", "") or "-"
        print(f"{job.get('job_id', ''):<20} {job.get('state', ''):<14} {job.get('model', ''):<14} "
              f"{epoch:>9} {accuracy:>9}  {job.get('worker', '')}")  # fmt: skip
    return 0


def run_show(args: argparse.Namespace) -> int:
    status = job_status(_client(args), args.job_id)
    if status is None:
        raise LookupError(f"unknown job {args.job_id!r}")
    if args.json:
        _print_json(status)
        return 0
    for name in sorted(status):
        if name != "spec":
            print(f"{name:>20}: {status[name]}")
    print(f"{'spec':>20}: {status.get('spec', '')}")
    return 0


def run_dead(args: argparse.Namespace) -> int:
    entries = dead_letters(_client(args))
    if args.json:
        _print_json([{k: v for k, v in e.items() if k != "job"} for e in entries])
        return 0
    for entry in entries:
        print(f"{entry.get('job_id', ''):<20} {entry.get('failed_at', ''):<26} "
              f"attempts={entry.get('attempts', '')}  {entry.get('error', '')}")  # fmt: skip
    if not entries:
        print("(no dead-lettered jobs)")
    return 0


# --- cancel, requeue ----------------------------------------------------------------------------


def run_cancel(args: argparse.Namespace) -> int:
    # The same setting as the workers': a job cancelled while queued is finished by this call.
    retention = float(os.environ.get("JOB_RETENTION_SECONDS", defaults.JOB_RETENTION_SECONDS))
    state = cancel_job(_client(args), args.job_id, retention_seconds=retention)
    if state is None:
        raise LookupError(f"unknown job {args.job_id!r}")
    if args.json:
        _print_json({"job_id": args.job_id, "state": state})
    else:
        print(f"{args.job_id}: {state}")
    return 0


def run_requeue(args: argparse.Namespace) -> int:
    requeue_job(_client(args), args.job_id)
    if args.json:
        _print_json({"job_id": args.job_id, "state": "queued"})
    else:
        print(f"{args.job_id}: queued")
    return 0


# --- watch --------------------------------------------------------------------------------------


def run_watch(args: argparse.Namespace) -> int:
    return watch(_client(args), args.job_id, as_json=args.json)


def watch(client: redis.Redis, job_id: str, *, as_json: bool = False) -> int:
    """Follow the job's latest run on its event stream until a final state; return its exit
    code. For a job that already ended, its last run is replayed."""
    status = job_status(client, job_id)
    if status is None:
        raise LookupError(f"unknown job {job_id!r}")
    bar = ProgressBar(sys.stderr, enabled=not as_json)
    stream = keys.job_events(job_id)
    ended = status.get("state") in TERMINAL_STATES
    finals = _final_events(client, stream, 2)
    if ended and not finals:  # its events were deleted: nothing to replay
        return _finish(client, job_id, status["state"], as_json, bar)
    earlier = finals[1:] if ended else finals[:1]  # where the run being watched began
    last_id = earlier[0] if earlier else "0"
    while True:
        reply = client.xread({stream: last_id}, block=WATCH_BLOCK_MS, count=200)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last_id = _text(entry_id)
                event = {_text(k): _text(v) for k, v in fields.items()}
                if as_json:
                    _print_json(event)
                else:
                    bar.show(event)
                state = event.get("state")
                if event.get("event") == "state" and state in TERMINAL_STATES:
                    return _finish(client, job_id, state, as_json, bar)


def _final_events(client: redis.Redis, stream: str, count: int) -> list[str]:
    """Ids of the stream's last ``count`` final-state events, newest first (a requeued job ends
    more than once)."""
    found: list[str] = []
    end = "+"
    while len(found) < count:
        page = client.xrevrange(stream, max=end, count=500)
        for entry_id, fields in page:
            if _text(fields.get(b"state", b"")) in TERMINAL_STATES:
                found.append(_text(entry_id))
        if len(page) < 500:
            break
        end = "(" + _text(page[-1][0])
    return found[:count]


def _finish(client: redis.Redis, job_id: str, state: str, as_json: bool, bar: ProgressBar) -> int:
    status = job_status(client, job_id) or {}
    if as_json:
        _print_json({"job_id": job_id, "state": state, "published": status.get("published"),
                     "error": status.get("error", "")})  # fmt: skip
    else:
        bar.clear()
        detail = status.get("error") or ""
        if status.get("published"):
            detail = f"{status.get('model')} versions {status['published']} {detail}".strip()
        print(f"job {job_id} {state}" + (f": {detail}" if detail else ""))
    return EXIT_CODES.get(state, 1)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class ProgressBar:
    """A redrawn progress line on a terminal; epoch and state lines on standard output."""

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interactive = stream.isatty()
        self.drawn = False

    def show(self, event: dict[str, str]) -> None:
        if not self.enabled:
            return
        kind = event.get("event")
        if kind == "progress" and self.interactive:
            self.stream.write("\r" + progress_line(event))
            self.stream.flush()
            self.drawn = True
        elif kind == "epoch":
            self.clear()
            accuracy = event.get("test_accuracy")
            test = f"  test accuracy {float(accuracy):.2%}" if accuracy else ""
            print(f"epoch {event.get('epoch')}/{event.get('epochs')}  loss "
                  f"{float(event.get('train_loss', 'nan')):.4f}  train accuracy "
                  f"{float(event.get('train_accuracy', 'nan')):.2%}{test}", flush=True)  # fmt: skip
        elif kind == "published":
            self.clear()
            print(f"published {event.get('model')} v{event.get('version')}", flush=True)
        elif kind == "state":
            self.clear()
            error = f" ({event['error']})" if event.get("error") else ""
            print(f"{event.get('state')}{error}", flush=True)

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
            self.drawn = False


def progress_line(event: dict[str, str]) -> str:
    """``[####------] epoch 2/5 batch 40/469 loss 0.3120 acc 91.2% 21,000/s ETA 0:35``."""
    epoch, epochs = int(event.get("epoch", 1)), int(event.get("epochs", 1))
    batch, batches = int(event.get("batch", 0)), max(int(event.get("batches", 1)), 1)
    done = ((epoch - 1) * batches + batch) / max(epochs * batches, 1)
    filled = int(done * BAR_WIDTH)
    eta = float(event.get("eta_seconds", -1))
    eta_text = f"{int(eta) // 60}:{int(eta) % 60:02d}" if eta >= 0 else "?"
    return (f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] epoch {epoch}/{epochs} "
            f"batch {batch}/{batches} loss {float(event.get('loss', 'nan')):.4f} "
            f"acc {float(event.get('accuracy', 'nan')):.1%} "
            f"{float(event.get('samples_per_second', 0)):,.0f}/s ETA {eta_text}")  # fmt: skip
