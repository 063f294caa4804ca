"""Queue semantics on a real Redis: idempotent submit, leases, reclaim, hand-back, dead letter."""

from __future__ import annotations

import threading
import time

from trainer_support import TOY_JOB, dumps, wait_until

from shared import keys
from trainer_service.queue import (
    _FORGET,
    JobQueue,
    LeaseKeeper,
    cancel_job,
    dead_letters,
    job_status,
    list_jobs,
    requeue_job,
    submit_job,
)


def queue(client, name: str, lease: float = 30.0, **options) -> JobQueue:
    q = JobQueue(client, name, lease_seconds=lease, **options)
    q.ensure_group()
    return q


def test_concurrent_submits_of_one_id_enqueue_once(redis_client):
    results: list[bool] = []

    def submit() -> None:
        results.append(submit_job(redis_client, dumps(TOY_JOB), "once")[1])

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert redis_client.xlen(keys.JOBS_STREAM) == 1
    assert job_status(redis_client, "once")["state"] == "queued"
    assert redis_client.zscore(keys.JOBS_INDEX, "once") is not None


def test_claim_takes_a_lease_with_a_random_token_and_ttl(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "j")
    delivery = queue(redis_client, "a", lease=5).claim(0.1)
    assert delivery is not None and delivery.job_id == "j" and delivery.attempt == 1
    assert redis_client.get(keys.job_lease("j")).decode() == delivery.token
    assert 0 < redis_client.pttl(keys.job_lease("j")) <= 5000
    status = job_status(redis_client, "j")
    assert status["state"] == "running" and status["worker"] == "a" and status["attempts"] == "1"


def test_a_job_written_straight_into_redis_gets_its_model_in_the_status(redis_client):
    redis_client.xadd(keys.JOBS_STREAM, {"job_id": "raw", "job": dumps({**TOY_JOB, "model": "m1"})})
    delivery = queue(redis_client, "a").claim(0.1)
    assert delivery is not None and delivery.job_id == "raw"
    status = job_status(redis_client, "raw")
    assert status["model"] == "m1" and status["state"] == "running"


def test_an_idle_entry_whose_lease_is_held_is_not_run_by_another_worker(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "held")
    a = queue(redis_client, "a", lease=30)
    delivery = a.claim(0.1)
    b = queue(redis_client, "b", lease=0.05)  # min-idle 50 ms: a's entry soon looks stale
    wait_until(lambda: b._claim_stale() is not None, what="b to autoclaim the idle entry")
    assert b.claim(0.05) is None  # ...but b cannot take the lease, so it never runs it
    assert a.renew(delivery)  # the holder takes the entry back and finishes normally
    assert a.finish(delivery, "succeeded")
    assert redis_client.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)["pending"] == 0


def test_a_dead_workers_job_is_reclaimed_after_its_lease_and_the_old_owner_is_fenced(
    redis_client,
):
    submit_job(redis_client, dumps(TOY_JOB), "orphan")
    a = queue(redis_client, "a", lease=0.2)
    old = a.claim(0.1)
    b = queue(redis_client, "b", lease=0.2)
    assert b.claim(0.05) is None  # a's lease is still alive
    wait_until(lambda: not redis_client.exists(keys.job_lease("orphan")), what="lease expiry")
    new = None

    def reclaimed() -> bool:
        nonlocal new
        new = b.claim(0.05)
        return new is not None

    wait_until(reclaimed, what="b to reclaim")
    assert new.job_id == "orphan" and new.attempt == 2 and new.token != old.token
    assert job_status(redis_client, "orphan")["worker"] == "b"
    assert not a.renew(old) and not a.finish(old, "succeeded") and not a.hand_back(old)
    assert b.finish(new, "succeeded")
    assert job_status(redis_client, "orphan")["state"] == "succeeded"


def test_heartbeat_keeps_a_long_job_from_being_reclaimed(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "long")
    a = queue(redis_client, "a", lease=0.15)
    delivery = a.claim(0.1)
    lost = threading.Event()
    b = queue(redis_client, "b", lease=0.15)
    with LeaseKeeper(a, delivery, on_lost=lost.set):
        deadline = time.monotonic() + 1.0  # several lease times
        while time.monotonic() < deadline:
            assert b.claim(0.05) is None
    assert not lost.is_set()
    assert a.finish(delivery, "succeeded")


def test_lease_that_expired_while_nobody_took_the_job_is_taken_again(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "outage")
    a = queue(redis_client, "a", lease=0.1)
    delivery = a.claim(0.1)
    wait_until(lambda: not redis_client.exists(keys.job_lease("outage")), what="lease expiry")
    assert a.renew(delivery)  # as after Redis was down longer than the lease
    assert redis_client.get(keys.job_lease("outage")).decode() == delivery.token


def test_hand_back_requeues_at_once_and_counts_only_failures(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "hb")
    a, b = queue(redis_client, "a"), queue(redis_client, "b")
    first = a.claim(0.1)
    assert a.hand_back(first)  # graceful: does not count
    assert job_status(redis_client, "hb")["state"] == "queued"
    assert not redis_client.exists(keys.job_lease("hb"))
    second = b.claim(0.1)
    assert second is not None and second.attempt == 1 and second.entry_id != first.entry_id
    assert b.hand_back(second, failed=True, error="boom")
    assert job_status(redis_client, "hb")["state"] == "retrying"
    third = a.claim(0.1)
    assert third.attempt == 2
    assert redis_client.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)["pending"] == 1


def test_job_delivered_too_often_is_dead_lettered_with_its_last_error(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "poison")
    a = queue(redis_client, "a", max_deliveries=2)
    for _ in range(2):
        delivery = a.claim(0.1)
        assert a.hand_back(delivery, failed=True, error="ValueError: bad")
    assert a.claim(0.1) is None  # the third delivery goes to the dead letter instead
    status = job_status(redis_client, "poison")
    assert status["state"] == "dead-lettered" and "ValueError: bad" in status["error"]
    [dead] = dead_letters(redis_client)
    assert dead["job_id"] == "poison" and dead["attempts"] == "3"
    assert redis_client.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)["pending"] == 0
    requeue_job(redis_client, "poison")
    assert dead_letters(redis_client) == []
    again = a.claim(0.1)
    assert again is not None and again.attempt == 1


def test_entry_without_a_usable_job_id_goes_to_the_dead_letter(redis_client):
    redis_client.xadd(keys.JOBS_STREAM, {"job_id": "no spaces allowed", "job": "{}"})
    assert queue(redis_client, "a").claim(0.1) is None
    [dead] = dead_letters(redis_client)
    assert dead["error"].startswith("job_id:")


def test_cancel_a_running_job_sets_its_flag(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "run")
    a = queue(redis_client, "a")
    delivery = a.claim(0.1)
    assert cancel_job(redis_client, "run") == "cancelling"
    assert redis_client.exists(keys.job_cancel("run"))
    assert a.finish(delivery, "cancelled")
    assert cancel_job(redis_client, "run") == "cancelled"
    assert cancel_job(redis_client, "unknown") is None


def test_a_vanished_stream_and_group_are_recreated_not_fatal(redis_client):
    a = queue(redis_client, "a")
    redis_client.flushall()  # as a Redis restarted without persistence
    assert a.claim(0.05) is None
    submit_job(redis_client, dumps(TOY_JOB), "after")
    assert a.claim(0.5).job_id == "after"


def ttls(client, job_id: str) -> dict[str, int]:
    """Seconds to live of the job's keys (-1: kept forever, -2: absent)."""
    names = {
        "status": keys.job_status(job_id),
        "events": keys.job_events(job_id),
        "checkpoint": keys.job_checkpoint(job_id),
        "cancel": keys.job_cancel(job_id),
    }
    return {name: client.ttl(key) for name, key in names.items()}


def test_a_finished_job_expires_after_the_retention_time_and_a_requeue_keeps_it(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "done")
    a = queue(redis_client, "a", retention_seconds=3600)
    delivery = a.claim(0.1)
    redis_client.set(keys.job_checkpoint("done"), b"weights")  # as a run leaves one behind
    assert ttls(redis_client, "done")["status"] == -1  # running: kept
    assert a.finish(delivery, "failed", error="boom")
    left = ttls(redis_client, "done")
    assert all(3590 <= left[name] <= 3600 for name in ("status", "events", "checkpoint")), left
    requeue_job(redis_client, "done")
    left = ttls(redis_client, "done")
    assert left["status"] == left["events"] == left["checkpoint"] == -1, left


def test_cancelled_jobs_expire_whether_queued_or_running(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "waiting")
    assert cancel_job(redis_client, "waiting", retention_seconds=60) == "cancelled"
    left = ttls(redis_client, "waiting")
    assert 50 <= left["status"] <= 60 and 50 <= left["events"] <= 60 and 50 <= left["cancel"] <= 60
    submit_job(redis_client, dumps(TOY_JOB), "busy")
    a = queue(redis_client, "a", retention_seconds=60)
    delivery = a.claim(0.1)
    assert cancel_job(redis_client, "busy", retention_seconds=60) == "cancelling"
    assert ttls(redis_client, "busy")["status"] == -1  # still running until its worker stops
    assert a.finish(delivery, "cancelled")
    left = ttls(redis_client, "busy")
    assert 50 <= left["status"] <= 60 and 50 <= left["cancel"] <= 60, left


def test_zero_retention_keeps_finished_jobs(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "kept")
    a = queue(redis_client, "a", retention_seconds=0)
    assert a.finish(a.claim(0.1), "succeeded")
    assert ttls(redis_client, "kept")["status"] == -1 and ttls(redis_client, "kept")["events"] == -1


def test_listing_forgets_jobs_whose_status_expired(redis_client):
    for i in range(5):
        submit_job(redis_client, dumps(TOY_JOB), f"j{i}")
    redis_client.delete(keys.job_status("j4"), keys.job_status("j2"))  # as if they expired
    assert [job["job_id"] for job in list_jobs(redis_client, 2)] == ["j3", "j1"]
    assert [job["job_id"] for job in list_jobs(redis_client)] == ["j3", "j1", "j0"]
    assert sorted(m.decode() for m in redis_client.zrange(keys.JOBS_INDEX, 0, -1)) == [
        "j0",
        "j1",
        "j3",
    ]


def test_forgetting_index_entries_spares_a_job_submitted_again_meanwhile(redis_client):
    # list_jobs saw no status for "again", but it was submitted anew before the clean-up ran.
    submit_job(redis_client, dumps(TOY_JOB), "again")
    redis_client.zadd(keys.JOBS_INDEX, {"expired": 1})
    status_keys = [keys.job_status("again"), keys.job_status("expired")]
    removed = redis_client.eval(_FORGET, 3, keys.JOBS_INDEX, *status_keys, "again", "expired")
    assert removed == 1
    assert [m.decode() for m in redis_client.zrange(keys.JOBS_INDEX, 0, -1)] == ["again"]
