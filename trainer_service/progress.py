"""A running job's progress: its status hash and its event stream, written from a background thread.

The training thread only appends to an in-memory buffer (batch progress at most once per
``interval``, every epoch summary, every publication); a thread drains the buffer into Redis in one
pipeline per ``interval``, and reads the job's cancel flag on the same round trip. Training never
waits on Redis: while Redis is unreachable events stay buffered (bounded) and are written when it
is back. Event stream entries are flat string fields: ``event`` (progress, epoch, published, state)
and the numbers that go with it. Writes are fenced by the job's lease like every other write about
the job: a worker that lost the job does not scribble over its new worker's progress.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import redis

from shared import defaults, keys
from shared.training import BatchProgress
from trainer_service.queue import utc_now

log = logging.getLogger("trainer_service.progress")

MAX_BUFFERED_EVENTS = 10_000  # about 80 minutes of progress at two events a second

# KEYS: lease, status, events, cancel. ARGV: token, status fields [k, v, ...] as JSON, events
# [[k, v, ...], ...] as JSON, events maxlen. Returns -1 if the lease is not the caller's, else
# whether the job's cancel flag is set.
_WRITE_PROGRESS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
for _, event in ipairs(cjson.decode(ARGV[3])) do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
end
local status = cjson.decode(ARGV[2])
if #status > 0 then redis.call('HSET', KEYS[2], unpack(status)) end
return redis.call('EXISTS', KEYS[4])
"""


def _fields(values: dict) -> dict[str, str]:
    """Stream/hash fields as text, floats to 6 significant digits."""
    return {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in values.items()}


class ProgressReporter:
    """Buffers one job's progress and writes it to Redis every ``interval`` seconds."""

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        *,
        token: str,
        epochs: int,
        interval: float = defaults.PROGRESS_INTERVAL_SECONDS,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.token = token
        self.epochs = epochs
        self.interval = interval
        self.on_cancel = on_cancel
        self.cancelled = False
        self._events: deque[dict[str, str]] = deque(maxlen=MAX_BUFFERED_EVENTS)
        self._status: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._next_batch_report = 0.0
        self._baseline: tuple[int, float] | None = None  # (steps done, elapsed) when first seen
        self._thread = threading.Thread(target=self._run, name=f"progress-{job_id}", daemon=True)

    # --- called by the training thread: cheap, never touches Redis ---

    def batch(self, p: BatchProgress) -> None:
        """Record batch progress; at most one event per interval reaches Redis."""
        now = time.monotonic()
        if now < self._next_batch_report:
            return
        self._next_batch_report = now + self.interval
        steps = p.epoch * p.batches + p.batch
        if self._baseline is None:
            self._baseline = (steps, p.elapsed)
        done, since = steps - self._baseline[0], p.elapsed - self._baseline[1]
        remaining = self.epochs * p.batches - steps
        eta = remaining * since / done if done > 0 and since > 0 else -1.0
        self.record(
            "progress",
            epoch=p.epoch + 1,
            epochs=self.epochs,
            batch=p.batch,
            batches=p.batches,
            loss=p.loss,
            accuracy=p.accuracy,
            samples_per_second=p.samples_per_second,
            eta_seconds=eta,
        )

    def record(self, event: str, status: dict | None = None, **values: object) -> None:
        """Append an event for the next write; its values also update the status hash, or
        ``status`` does when given."""
        fields = _fields(values)
        with self._lock:
            self._events.append({"event": event, **fields})
            self._status.update(fields if status is None else _fields(status))
        if event != "progress":
            self._wake.set()

    # --- lifecycle ---

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Write what is buffered and stop the thread. While Redis is unreachable this waits for
        it, as the job's final state must wait anyway, so watchers see every epoch."""
        if not self._thread.is_alive():
            return
        self._closing = True
        self._wake.set()
        self._thread.join()

    def flush(self) -> bool:
        """Write buffered events and read the cancel flag (one script, one round trip); False if
        Redis is unreachable."""
        with self._lock:
            events = list(self._events)
            status = dict(self._status)
        if events or status:
            status["updated_at"] = utc_now()
        try:
            reply = self.client.eval(
                _WRITE_PROGRESS,
                4,
                keys.job_lease(self.job_id),
                keys.job_status(self.job_id),
                keys.job_events(self.job_id),
                keys.job_cancel(self.job_id),
                self.token,
                json.dumps([x for item in status.items() for x in item]),
                json.dumps([[x for item in e.items() for x in item] for e in events]),
                defaults.JOB_EVENTS_MAXLEN,
            )
        except redis.RedisError as exc:
            log.warning("job %s: progress not written (%s); buffering", self.job_id, exc)
            return False
        if reply == -1:  # not our lease (now, or until the heartbeat takes it again): keep them
            return True
        with self._lock:
            for _ in events:  # only what was written; the trainer may have appended meanwhile
                self._events.popleft()
            for name, value in status.items():
                if self._status.get(name) == value:
                    del self._status[name]
        if reply and not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()
        return True

    def _run(self) -> None:
        backoff = self.interval
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            written = self.flush()
            if self._closing and written:
                return
            backoff = self.interval if written else min(backoff * 2, defaults.RECONNECT_MAX_SECONDS)
