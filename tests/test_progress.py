"""Progress reporting: throttled, buffered, fenced by the lease, and the way cancels arrive."""

from __future__ import annotations

import threading

from shared import keys
from shared.training import BatchProgress
from trainer_service.progress import ProgressReporter


def progress(batch: int) -> BatchProgress:
    return BatchProgress(0, batch, 1000, 0.5, 0.9, 1000.0, 0.1, batch / 100)


def events(client, job_id: str) -> list[dict]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in client.xrange(keys.job_events(job_id))
    ]


def test_batch_progress_is_throttled_and_epochs_always_reported(redis_client):
    redis_client.set(keys.job_lease("p"), "tok")
    with ProgressReporter(redis_client, "p", token="tok", epochs=2, interval=3600) as reporter:
        for batch in range(1, 1001):
            reporter.batch(progress(batch))
        reporter.record("epoch", epoch=1, epochs=2, train_loss=0.25)
    written = events(redis_client, "p")
    assert [e["event"] for e in written] == ["progress", "epoch"]
    assert written[0]["batch"] == "1" and written[1]["train_loss"] == "0.25"
    status = redis_client.hgetall(keys.job_status("p"))
    assert status[b"epoch"] == b"1" and b"updated_at" in status


def test_nothing_is_written_without_the_lease(redis_client):
    redis_client.set(keys.job_lease("q"), "someone-else")
    with ProgressReporter(redis_client, "q", token="mine", epochs=1, interval=0.01) as reporter:
        reporter.record("epoch", epoch=1)
        assert reporter.flush()  # Redis answered; the events stay buffered
    assert events(redis_client, "q") == []
    assert not redis_client.exists(keys.job_status("q"))


def test_the_cancel_flag_reaches_the_training_thread(redis_client):
    redis_client.set(keys.job_lease("c"), "tok")
    cancelled = threading.Event()
    with ProgressReporter(redis_client, "c", token="tok", epochs=1, interval=0.01,
                          on_cancel=cancelled.set):  # fmt: skip
        redis_client.set(keys.job_cancel("c"), "now")
        assert cancelled.wait(5)
