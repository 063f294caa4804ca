"""The training-job queue: a Redis stream read by one consumer group, with leases and a dead letter.

Design (README has the long form):

- Submitting XADDs ``{job_id, job}`` to ``keys.JOBS_STREAM`` and creates the job's status hash in
  one Lua script that does nothing if the status hash already exists, so submitting an id twice
  enqueues once. A client may also XADD a job directly; the trainer validates it and creates the
  status hash.
- Workers read with XREADGROUP in the group ``keys.JOBS_GROUP`` (at-least-once delivery). Before
  running a job a worker takes its lease: ``SET keys.job_lease(id) <random token> NX PX lease``.
  Only the lease holder runs the job, writes its checkpoint, publishes (the registry checks the
  token) and acknowledges it. A heartbeat thread renews the lease with a compare-and-pexpire script
  and also resets the entry's idle time in the pending list, so a live worker's job never looks
  stale; when the token no longer matches, the heartbeat sets the job's stop flag.
- A worker that dies stops renewing: after the lease time its entry is idle for at least that long
  and another worker takes it with XAUTOCLAIM (min-idle = lease), but runs it only if it can take
  the lease, i.e. the lease key is gone.
- Handing a job back (SIGTERM, or a failed attempt that will be retried) XADDs a fresh copy of the
  entry carrying ``attempts`` and ACKs the old one in one script: a fresh entry wakes workers
  blocked in XREADGROUP at once, whereas an entry made idle with XCLAIM would wait for the next
  reclaim scan.
- ``attempts`` (carried in the entry) plus the entry's delivery count is the job's delivery number;
  a job delivered more than ``max_deliveries`` times goes to ``keys.DEAD_LETTER_STREAM`` with its
  last error, from where ``requeue_job`` puts it back.
- An acknowledged entry is deleted at once (one group reads the stream), so the stream holds only
  queued and running jobs and XLEN is the backlog; history lives in status hashes and event streams.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from shared import defaults, keys
from shared.jobspec import JobSpecError, check_job_id, parse_job_json

log = logging.getLogger("trainer_service.queue")

STATES = ("queued", "running", "retrying", "succeeded", "failed", "cancelled", "dead-lettered")
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "dead-lettered")

# Shared by every fenced script: KEYS[1] lease, KEYS[2] status; ARGV[1] token, ARGV[2] worker,
# ARGV[3] lease ms. The caller owns the job if the lease holds its token, or if the lease expired
# (e.g. Redis was down longer than the lease) and the status still names it as the running worker:
# then nobody else has taken the job and the lease is taken again.
_OWNS = """
local function owns()
  local holder = redis.call('GET', KEYS[1])
  if holder == ARGV[1] then return true end
  if holder == false and redis.call('HGET', KEYS[2], 'state') == 'running'
      and redis.call('HGET', KEYS[2], 'worker') == ARGV[2] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
    return true
  end
  return false
end
"""
_STATE_EVENT = """
local function state_event(events, state, err, maxlen)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'event', 'state', 'state', state,
             'error', err)
end
"""
_RETAIN = """
local function retain(ttl_ms, ...)
  if tonumber(ttl_ms) > 0 then
    for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ttl_ms) end
  end
end
"""

# KEYS: status, stream, index, events. ARGV: job_id, job, now, now_ms, model, maxlen.
_SUBMIT = (
    _STATE_EVENT
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'state', 'queued', 'spec', ARGV[2], 'model', ARGV[5],
           'attempts', 0, 'submitted_at', ARGV[3], 'updated_at', ARGV[3], 'error', '')
redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[1], 'job', ARGV[2], 'attempts', 0)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
state_event(KEYS[4], 'queued', '', ARGV[6])
return 1
"""
)

# KEYS: lease, status, cancel, index, events. ARGV: token, worker, lease_ms, job_id, job, attempt,
# max_deliveries, now, now_ms, maxlen, entry_id, model.
_START = (
    _OWNS
    + _STATE_EVENT
    + """
if not owns() then return 'lost' end
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'succeeded' or state == 'failed' or state == 'cancelled' or state == 'dead-lettered'
  then return state end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'cancel' end
if tonumber(ARGV[6]) > tonumber(ARGV[7]) then return 'dead' end
if not state then
  redis.call('HSET', KEYS[2], 'job_id', ARGV[4], 'spec', ARGV[5], 'submitted_at', ARGV[8],
             'error', '', 'model', ARGV[12])
  redis.call('ZADD', KEYS[4], 'NX', ARGV[9], ARGV[4])
end
redis.call('HSET', KEYS[2], 'state', 'running', 'worker', ARGV[2], 'attempts', ARGV[6],
           'started_at', ARGV[8], 'updated_at', ARGV[8], 'entry', ARGV[11])
state_event(KEYS[5], 'running', '', ARGV[10])
return 'running'
"""
)

# KEYS: lease, status, stream. ARGV: token, worker, lease_ms, group, entry_id.
_RENEW = (
    _OWNS
    + """
if not owns() then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('XCLAIM', KEYS[3], ARGV[4], ARGV[2], 0, ARGV[5], 'JUSTID')
return 1
"""
)

# KEYS: lease, status, stream, events. ARGV: token, worker, lease_ms, group, entry_id, job_id, job,
# attempts, state, error, now, maxlen.
_HAND_BACK = (
    _OWNS
    + _STATE_EVENT
    + """
if not owns() then return 0 end
redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[6], 'job', ARGV[7], 'attempts', ARGV[8])
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
redis.call('XDEL', KEYS[3], ARGV[5])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'state', ARGV[9], 'worker', '', 'updated_at', ARGV[11])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[10]) end
state_event(KEYS[4], ARGV[9], ARGV[10], ARGV[12])
return 1
"""
)

# KEYS: lease, status, stream, events, checkpoint, dead, cancel. ARGV: token, worker, lease_ms,
# group, entry_id, job_id, job, attempts, state, error, now, maxlen, fields (JSON object for the
# status), retention ms.
_FINISH = (
    _OWNS
    + _STATE_EVENT
    + _RETAIN
    + """
if not owns() then return 0 end
local state = ARGV[9]
if state == 'dead-lettered' then
  redis.call('XADD', KEYS[6], '*', 'job_id', ARGV[6], 'job', ARGV[7], 'attempts', ARGV[8],
             'error', ARGV[10], 'failed_at', ARGV[11], 'entry', ARGV[5])
end
if state == 'succeeded' then redis.call('DEL', KEYS[5]) end
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
redis.call('XDEL', KEYS[3], ARGV[5])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'state', state, 'worker', '', 'updated_at', ARGV[11],
           'finished_at', ARGV[11])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[10]) end
for name, value in pairs(cjson.decode(ARGV[13])) do
  redis.call('HSET', KEYS[2], name, tostring(value))
end
state_event(KEYS[4], state, ARGV[10], ARGV[12])
retain(ARGV[14], KEYS[2], KEYS[4], KEYS[5], KEYS[7])
return 1
"""
)

# KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: status, cancel, events. ARGV: now, maxlen, retention ms.
_CANCEL = (
    _STATE_EVENT
    + _RETAIN
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' or state == 'dead-lettered'
  then return state end
redis.call('SET', KEYS[2], ARGV[1])
if state == 'running' then return 'cancelling' end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'updated_at', ARGV[1], 'finished_at', ARGV[1])
state_event(KEYS[3], 'cancelled', '', ARGV[2])
retain(ARGV[3], KEYS[1], KEYS[2], KEYS[3])
return 'cancelled'
"""
)


# KEYS: index, then the status of each job. ARGV: the job ids. Removes from the index the jobs
# whose status is gone; returns how many.
_FORGET = """
local removed = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i - 1])
  end
end
return removed
"""


def retention_ms(seconds: float) -> int:
    """A retention time for the scripts: milliseconds, 0 (keep forever) for 0 or less."""
    return max(int(seconds * 1000), 0)


def utc_now() -> str:
    """The current time as ISO 8601 UTC, as every timestamp in a status hash."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _model_name(job_json: str) -> str:
    """The job's model name for its status, "" if the JSON has none (validation says why later)."""
    try:
        data = json.loads(job_json)
    except ValueError:
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else ""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def connect(url: str, **options) -> redis.Redis:
    """A client for ``url`` (redis:// or rediss:// for TLS; password in the URL)."""
    options.setdefault("socket_connect_timeout", 5.0)
    # A hung connection must fail rather than stall a worker; longer than any XREAD block we use.
    options.setdefault("socket_timeout", 30.0)
    options.setdefault("socket_keepalive", True)
    options.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(url, **options)


class JobExists(ValueError):  # noqa: N818 (reads as the condition callers catch)
    """Submitting a job id that is already known: nothing was enqueued."""


# --- what clients call ----------------------------------------------------------------------------


def submit_job(client: redis.Redis, job_json: str, job_id: str | None = None) -> tuple[str, bool]:
    """Validate and enqueue a job: (job id, False if that id was already known, so not enqueued)."""
    spec = parse_job_json(job_json)
    job_id = check_job_id(job_id) if job_id is not None else uuid.uuid4().hex[:16]
    created = client.eval(
        _SUBMIT,
        4,
        keys.job_status(job_id),
        keys.JOBS_STREAM,
        keys.JOBS_INDEX,
        keys.job_events(job_id),
        job_id,
        job_json,
        utc_now(),
        int(time.time() * 1000),
        spec.model,
        defaults.JOB_EVENTS_MAXLEN,
    )
    return job_id, bool(created)


def job_status(client: redis.Redis, job_id: str) -> dict[str, str] | None:
    """The job's status hash as text (None for an unknown job)."""
    raw = client.hgetall(keys.job_status(job_id))
    return {_text(k): _text(v) for k, v in raw.items()} if raw else None


def list_jobs(client: redis.Redis, count: int = 50) -> list[dict[str, str]]:
    """Status of the ``count`` most recently submitted jobs, newest first.

    Index entries whose status hash is gone (expired after the retention time) are removed.
    """
    found: list[dict[str, str]] = []
    start = 0
    while len(found) < count:
        ids = [_text(i) for i in client.zrevrange(keys.JOBS_INDEX, start, start + count - 1)]
        if not ids:
            break
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job_status(job_id))
        statuses = pipe.execute()
        gone = [job_id for job_id, raw in zip(ids, statuses, strict=True) if not raw]
        removed = 0
        if gone:  # in a script: an id submitted again meanwhile keeps its entry
            status_keys = [keys.job_status(job_id) for job_id in gone]
            removed = int(client.eval(_FORGET, 1 + len(gone), keys.JOBS_INDEX, *status_keys, *gone))
        found += [{_text(k): _text(v) for k, v in raw.items()} for raw in statuses if raw]
        start += len(ids) - removed
    return found[:count]


def cancel_job(
    client: redis.Redis, job_id: str, *, retention_seconds: float = defaults.JOB_RETENTION_SECONDS
) -> str | None:
    """Cancel a queued job now or ask its worker to stop; the resulting state (None if unknown).

    A job cancelled while queued is finished here, so its keys expire after ``retention_seconds``.
    """
    state = client.eval(
        _CANCEL,
        3,
        keys.job_status(job_id),
        keys.job_cancel(job_id),
        keys.job_events(job_id),
        utc_now(),
        defaults.JOB_EVENTS_MAXLEN,
        retention_ms(retention_seconds),
    )
    return None if state is None else _text(state)


def dead_letters(client: redis.Redis, count: int = 100) -> list[dict[str, str]]:
    """The dead-letter stream's entries, newest first, each with its stream ``id``."""
    entries = client.xrevrange(keys.DEAD_LETTER_STREAM, count=count)
    return [
        {"id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
        for entry_id, fields in entries
    ]


def requeue_job(client: redis.Redis, job_id: str) -> None:
    """Queue a dead-lettered, failed or cancelled job again with a fresh delivery count."""
    status_key = keys.job_status(job_id)
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(status_key, keys.DEAD_LETTER_STREAM)
        status = job_status(pipe, job_id)  # type: ignore[arg-type]
        if status is None:
            raise LookupError(f"unknown job {job_id!r}")
        if status.get("state") not in ("dead-lettered", "failed", "cancelled"):
            raise ValueError(
                f"job {job_id} is {status.get('state')}; only dead-lettered, failed "
                "or cancelled jobs can be requeued"
            )
        dead_ids = [
            entry_id
            for entry_id, fields in pipe.xrange(keys.DEAD_LETTER_STREAM)
            if _text(fields.get(b"job_id")) == job_id
        ]
        pipe.multi()
        pipe.xadd(
            keys.JOBS_STREAM, {"job_id": job_id, "job": status.get("spec", ""), "attempts": 0}
        )
        if dead_ids:
            pipe.xdel(keys.DEAD_LETTER_STREAM, *dead_ids)
        pipe.delete(keys.job_cancel(job_id))
        for key in (status_key, keys.job_events(job_id), keys.job_checkpoint(job_id)):
            pipe.persist(key)  # running again: kept until it finishes again
        now = utc_now()
        pipe.hset(
            status_key,
            mapping={"state": "queued", "attempts": 0, "updated_at": now, "finished_at": ""},
        )
        pipe.xadd(
            keys.job_events(job_id),
            {"event": "state", "state": "queued", "error": ""},
            maxlen=defaults.JOB_EVENTS_MAXLEN,
            approximate=True,
        )
        pipe.execute()


# --- what workers call ----------------------------------------------------------------------------


@dataclass
class Delivery:
    """A job this worker holds the lease of."""

    entry_id: str
    job_id: str
    job_json: str
    attempt: int  # 1-based delivery number of the job, across hand-backs
    token: str  # the lease token: the fence for every write about this job


class LeaseLost(RuntimeError):  # noqa: N818 (reads as the condition callers catch)
    """Another worker holds the job's lease now: stop, and write nothing more about the job."""


class JobQueue:
    """One worker's view of the queue: claim, renew, hand back, finish."""

    def __init__(
        self,
        client: redis.Redis,
        worker: str,
        *,
        lease_seconds: float = defaults.LEASE_SECONDS,
        max_deliveries: int = defaults.MAX_DELIVERIES,
        retention_seconds: float = defaults.JOB_RETENTION_SECONDS,
    ) -> None:
        self.client = client
        self.worker = worker
        self.lease_ms = max(int(lease_seconds * 1000), 1)
        self.max_deliveries = max_deliveries
        self.retention_ms = retention_ms(retention_seconds)
        self._reclaim_cursor = "0-0"

    def ensure_group(self) -> None:
        """Create the consumer group (reading from the stream's start) unless it exists."""
        try:
            self.client.xgroup_create(keys.JOBS_STREAM, keys.JOBS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim(self, block_seconds: float = defaults.CLAIM_BLOCK_SECONDS) -> Delivery | None:
        """A job to run: first a stale one whose worker died, else a new one; None if none came
        within ``block_seconds``. Entries that need no run (cancelled, finished, dead) are settled
        on the way."""
        try:
            return self._claim(block_seconds)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group vanished (a Redis restarted without persistence, a FLUSHALL):
            # recreate them rather than crash; jobs submitted from now on are seen.
            log.warning("consumer group missing (%s); creating it again", exc)
            self.ensure_group()
            self._reclaim_cursor = "0-0"
            return None

    def _claim(self, block_seconds: float) -> Delivery | None:
        deadline = time.monotonic() + block_seconds
        while True:
            stale = self._claim_stale()
            if stale is not None:
                delivery = self._start(*stale)
                if delivery is not None:
                    return delivery
                continue
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return None
            # Wake up now and then to look for stale entries: a dead worker's job is taken over
            # within about 1.25 lease times.
            block_ms = min(remaining_ms, max(self.lease_ms // 4, 1))
            response = self.client.xreadgroup(
                keys.JOBS_GROUP, self.worker, {keys.JOBS_STREAM: ">"}, count=1, block=block_ms
            )
            if not response:
                continue
            entry_id, fields = response[0][1][0]
            delivery = self._start(_text(entry_id), fields, 1)
            if delivery is not None:
                return delivery

    def _claim_stale(self) -> tuple[str, dict, int] | None:
        """XAUTOCLAIM one entry idle for at least the lease time, with its delivery count."""
        reply = self.client.xautoclaim(
            keys.JOBS_STREAM,
            keys.JOBS_GROUP,
            self.worker,
            min_idle_time=self.lease_ms,
            start_id=self._reclaim_cursor,
            count=1,
        )
        self._reclaim_cursor = _text(reply[0])
        for entry_id, fields in reply[1]:
            if not fields:  # deleted from the stream while pending: nothing to run
                self._drop_entry(entry_id)
                continue
            pending = self.client.xpending_range(
                keys.JOBS_STREAM, keys.JOBS_GROUP, entry_id, entry_id, 1
            )
            delivered = int(pending[0]["times_delivered"]) if pending else 1
            return _text(entry_id), fields, delivered
        return None

    def _start(self, entry_id: str, fields: dict, delivered: int) -> Delivery | None:
        """Take the lease and mark the job running, or settle entries that need no run."""
        job_id = _text(fields.get(b"job_id")) or entry_id
        job_json = _text(fields.get(b"job"))
        try:
            check_job_id(job_id)
        except JobSpecError as exc:
            self._dead_letter_unusable(entry_id, job_id, job_json, str(exc))
            return None
        try:
            prior = max(int(_text(fields.get(b"attempts")) or 0), 0)
        except ValueError:
            prior = 0
        token = secrets.token_hex(16)
        if not self.client.set(keys.job_lease(job_id), token, nx=True, px=self.lease_ms):
            # Its worker is alive (or just handed it back): it acknowledges the entry itself.
            log.info("job %s: lease held by another worker, leaving entry %s", job_id, entry_id)
            return None
        delivery = Delivery(entry_id, job_id, job_json, prior + delivered, token)
        outcome = _text(
            self.client.eval(
                _START,
                5,
                keys.job_lease(job_id),
                keys.job_status(job_id),
                keys.job_cancel(job_id),
                keys.JOBS_INDEX,
                keys.job_events(job_id),
                token,
                self.worker,
                self.lease_ms,
                job_id,
                job_json,
                delivery.attempt,
                self.max_deliveries,
                utc_now(),
                int(time.time() * 1000),
                defaults.JOB_EVENTS_MAXLEN,
                entry_id,
                _model_name(job_json),
            )
        )
        if outcome == "running":
            return delivery
        if outcome == "cancel":
            self.finish(delivery, "cancelled")
        elif outcome == "dead":
            last = (job_status(self.client, job_id) or {}).get("error", "")
            error = f"delivered {delivery.attempt} times (max {self.max_deliveries})"
            self.finish(delivery, "dead-lettered", error=f"{error}; last error: {last or 'none'}")
        elif outcome in TERMINAL_STATES:  # a duplicate entry of a finished job
            log.info("job %s is already %s; dropping entry %s", job_id, outcome, entry_id)
            self._drop_entry(entry_id)
            self.release(delivery)
        return None

    def _dead_letter_unusable(self, entry_id: str, job_id: str, job_json: str, error: str) -> None:
        """An entry without a usable job id has no status hash: dead-letter it as it is."""
        log.warning("entry %s: %s; dead-lettering it", entry_id, error)
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(
            keys.DEAD_LETTER_STREAM,
            {
                "job_id": job_id,
                "job": job_json,
                "attempts": 0,
                "error": error,
                "failed_at": utc_now(),
                "entry": entry_id,
            },
        )
        pipe.xack(keys.JOBS_STREAM, keys.JOBS_GROUP, entry_id)
        pipe.xdel(keys.JOBS_STREAM, entry_id)
        pipe.execute()

    def _drop_entry(self, entry_id: str) -> None:
        """Acknowledge and delete an entry that needs no run."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(keys.JOBS_STREAM, keys.JOBS_GROUP, entry_id)
        pipe.xdel(keys.JOBS_STREAM, entry_id)
        pipe.execute()

    def _fenced(self, script: str, delivery: Delivery, extra_keys: list[str], args: list) -> int:
        lease_keys = [keys.job_lease(delivery.job_id), keys.job_status(delivery.job_id)]
        all_keys = lease_keys + extra_keys
        return int(
            self.client.eval(
                script, len(all_keys), *all_keys, delivery.token, self.worker, self.lease_ms, *args
            )
        )

    def renew(self, delivery: Delivery) -> bool:
        """Extend the lease and keep the entry from looking idle; False if the lease is lost."""
        return bool(
            self._fenced(_RENEW, delivery, [keys.JOBS_STREAM], [keys.JOBS_GROUP, delivery.entry_id])
        )

    def release(self, delivery: Delivery) -> None:
        """Give up the lease if this worker still holds it."""
        self.client.eval(_RELEASE, 1, keys.job_lease(delivery.job_id), delivery.token)

    def hand_back(self, delivery: Delivery, *, failed: bool = False, error: str = "") -> bool:
        """Requeue the job at once (fresh entry, old one ACKed, lease released).

        A failed attempt counts towards the dead letter and leaves the job ``retrying``; a hand-back
        on shutdown does not count and leaves it ``queued``. False if the lease was lost.
        """
        attempts = delivery.attempt if failed else delivery.attempt - 1
        return bool(
            self._fenced(
                _HAND_BACK,
                delivery,
                [keys.JOBS_STREAM, keys.job_events(delivery.job_id)],
                [
                    keys.JOBS_GROUP,
                    delivery.entry_id,
                    delivery.job_id,
                    delivery.job_json,
                    attempts,
                    "retrying" if failed else "queued",
                    error,
                    utc_now(),
                    defaults.JOB_EVENTS_MAXLEN,
                ],
            )
        )

    def finish(
        self, delivery: Delivery, state: str, *, error: str = "", fields: dict | None = None
    ) -> bool:
        """Record a final state, ACK the entry and drop the lease; False if the lease was lost.

        The job's status, events, checkpoint and cancel flag expire after the retention time.
        """
        assert state in TERMINAL_STATES, state
        return bool(
            self._fenced(
                _FINISH,
                delivery,
                [
                    keys.JOBS_STREAM,
                    keys.job_events(delivery.job_id),
                    keys.job_checkpoint(delivery.job_id),
                    keys.DEAD_LETTER_STREAM,
                    keys.job_cancel(delivery.job_id),
                ],
                [
                    keys.JOBS_GROUP,
                    delivery.entry_id,
                    delivery.job_id,
                    delivery.job_json,
                    delivery.attempt,
                    state,
                    error,
                    utc_now(),
                    defaults.JOB_EVENTS_MAXLEN,
                    json.dumps(fields or {}),
                    self.retention_ms,
                ],
            )
        )


class LeaseKeeper:
    """Renews a job's lease from a background thread every third of the lease time.

    Redis being unreachable does not stop training (the job keeps its lease when Redis comes back,
    see ``_OWNS``); the lease turning out to be someone else's calls ``on_lost`` once.
    """

    def __init__(self, queue: JobQueue, delivery: Delivery, on_lost: Callable[[], None]) -> None:
        self.queue = queue
        self.delivery = delivery
        self.on_lost = on_lost
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{delivery.job_id}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = self.queue.lease_ms / 3000
        while not self._stop.wait(interval):
            try:
                held = self.queue.renew(self.delivery)
            except redis.RedisError as exc:
                log.warning(
                    "job %s: cannot renew lease (%s); still training", self.delivery.job_id, exc
                )
                continue
            if not held:
                log.warning("job %s: lease lost to another worker; stopping", self.delivery.job_id)
                self.lost = True
                self.on_lost()
                return
