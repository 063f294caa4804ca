"""Real trainer processes, real signals, a real Redis restart: nothing is lost or done twice."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from trainer_support import (
    TOY_JOB,
    WorkerProcess,
    dumps,
    tiny_job,
    wait_for_event,
    wait_for_state,
    wait_until,
    write_tiny_mnist,
)

from shared import keys
from shared.jobspec import parse_job
from shared.mnist import load_mnist
from shared.redis_server import RedisServer
from shared.registry import Registry
from shared.training import fit
from trainer_service.queue import job_status, submit_job
from trainer_service.worker import build_model, parameters_equal

LEASE = "1.0"  # seconds: a dead worker's job is taken over this quickly in these tests
# Long enough (1000 examples in batches of 10, 25 epochs) to be signalled mid-job, yet ~1 s.
LONG_JOB = tiny_job(epochs=25, batch_size=10, publish={"every_epoch": True})


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist"), train=1000, test=100)


@pytest.fixture
def workers(redis_server, redis_client, mnist):
    """Start trainer processes with ``start(name)``; all are killed after the test."""
    started: list[WorkerProcess] = []

    def start(name: str, *args: str, url: str | None = None, data=mnist) -> WorkerProcess:
        worker = WorkerProcess(url or redis_server.url, name, data, "--lease-seconds", LEASE, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def published_once_per_epoch(client, model: str, job_id: str, epochs: int) -> None:
    """Each epoch published exactly one version and no publication was ever repeated."""
    publications = client.hgetall(keys.model_publications(model))
    assert sorted(publications) == sorted(
        f"{job_id}:epoch{n}".encode() for n in range(1, epochs + 1)
    )
    assert len(set(publications.values())) == epochs
    assert int(client.get(keys.model_next_version(model))) == epochs  # no version was wasted


def process_state(pid: int) -> str:
    """The state letter in /proc/PID/stat (R running, S sleeping, T stopped, ...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def epoch_event(n: int):
    return lambda e: e["event"] == "epoch" and e["epoch"] == str(n)


def published_event(epoch: int):
    return lambda e: e["event"] == "published" and e["epoch"] == str(epoch)


def reference_model(mnist, job: dict):
    spec = parse_job(job)
    model = build_model(spec)
    train, test = load_mnist(mnist)
    fit(model, train, spec.training, test=test)
    return model


def test_submitted_job_trains_and_publishes_in_a_trainer_process(redis_client, workers):
    started = time.monotonic()
    worker = workers("solo")
    ready = time.monotonic()
    submit_job(redis_client, dumps(TOY_JOB), "e2e")
    submitted = time.monotonic()
    wait_for_state(redis_client, "e2e", "running")
    print(
        f"\nstartup {ready - started:.2f} s; submit -> running {time.monotonic() - submitted:.3f} s"
    )
    assert wait_for_state(redis_client, "e2e", "succeeded", "failed") == "succeeded"
    manifest = Registry(redis_client).manifest("toy", 1)
    assert manifest["job_id"] == "e2e" and manifest["sizes"] == [2, 2, 1]
    assert manifest["training"]["epochs"] == TOY_JOB["epochs"]
    assert job_status(redis_client, "e2e")["worker"] == ""
    assert worker.process.poll() is None  # still serving the queue


def test_sigkill_mid_job_is_finished_by_another_worker_after_the_lease(redis_client, workers):
    pool = {name: workers(name) for name in ("a", "b")}  # both idle and ready
    submit_job(redis_client, dumps(LONG_JOB), "k1")
    wait_for_event(redis_client, "k1", lambda e: e["event"] == "epoch" and e["epoch"] == "2")
    doomed = job_status(redis_client, "k1")["worker"]
    second = pool["b" if doomed == "a" else "a"]
    mark = len(second.lines)  # on a loaded machine it may have run k1 before: look after here
    pool[doomed].signal(signal.SIGKILL)
    killed = time.monotonic()
    line = second.wait_for_line("job k1: claimed", start=mark)
    taken = time.monotonic()
    print(f"\nSIGKILL -> job reclaimed by another worker: {taken - killed:.2f} s (lease {LEASE} s)")
    assert "delivery 1)" not in second.lines[line]
    assert wait_for_state(redis_client, "k1", "succeeded", "failed") == "succeeded"
    second.wait_for_line("resuming after epoch", start=mark)
    published_once_per_epoch(redis_client, "tiny", "k1", LONG_JOB["epochs"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_hands_the_job_back_and_the_resumed_run_is_bitwise_equal(
    redis_client, workers, mnist, sig
):
    pool = {name: workers(name) for name in ("a", "b")}  # both idle and ready
    submit_job(redis_client, dumps(LONG_JOB), "t1")
    last, _ = wait_for_event(redis_client, "t1", epoch_event(2))
    leaving = job_status(redis_client, "t1")["worker"]
    first, second = pool[leaving], pool["b" if leaving == "a" else "a"]
    mark = len(second.lines)
    first.signal(sig)
    signalled = time.monotonic()
    wait_for_event(redis_client, "t1", lambda e: e.get("state") == "queued", last_id=last)
    handed_back = time.monotonic()
    so_far = json.loads(job_status(redis_client, "t1")["published"])  # listed as they come
    assert so_far == list(range(1, len(so_far) + 1)) and len(so_far) >= 2
    wait_for_event(redis_client, "t1", lambda e: e.get("state") == "running", last_id=last)
    assert first.process.wait(10) == 0
    print(f"\n{sig.name} -> handed back {handed_back - signalled:.3f} s, "
          f"running again {time.monotonic() - signalled:.3f} s")  # fmt: skip
    assert wait_for_state(redis_client, "t1", "succeeded", "failed") == "succeeded"
    second.wait_for_line("job t1: resuming after epoch", start=mark)
    final = Registry(redis_client).load(
        "tiny", int(job_status(redis_client, "t1")["latest_version"])
    )
    assert final.manifest["metrics"]["epoch"] == LONG_JOB["epochs"]
    assert parameters_equal(final.model, reference_model(mnist, LONG_JOB))
    published_once_per_epoch(redis_client, "tiny", "t1", LONG_JOB["epochs"])


def test_paused_worker_does_not_publish_after_another_took_its_job(redis_client, workers):
    paused = workers("paused")
    submit_job(redis_client, dumps(LONG_JOB), "s1")
    # Not the epoch event: that is written by the reporter thread, possibly before the main
    # thread publishes the epoch, and a stop in between would log that earlier publication late.
    last, _ = wait_for_event(redis_client, "s1", published_event(2))
    paused.signal(signal.SIGSTOP)
    try:
        taker = workers("taker")
        wait_for_event(redis_client, "s1", lambda e: e.get("state") == "running", last_id=last)
        assert job_status(redis_client, "s1")["worker"] == "taker"
        resumed_at = len(paused.lines)
    finally:
        paused.signal(signal.SIGCONT)
    paused.wait_for_line("lease lost", start=resumed_at)
    assert wait_for_state(redis_client, "s1", "succeeded", "failed") == "succeeded"
    taker.wait_for_line("job s1: succeeded")
    assert not any("published" in line for line in paused.lines[resumed_at:]), paused.log
    published_once_per_epoch(redis_client, "tiny", "s1", LONG_JOB["epochs"])


def test_poison_job_is_dead_lettered_and_the_worker_lives_on(redis_client, workers, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    worker = workers("no-data", "--max-deliveries", "2", data=empty)
    submit_job(redis_client, dumps(tiny_job()), "poison")
    assert wait_for_state(redis_client, "poison", "dead-lettered", "succeeded") == "dead-lettered"
    status = job_status(redis_client, "poison")
    assert status["attempts"] == "2" and "MnistNotFound" in status["error"]
    submit_job(redis_client, dumps(TOY_JOB), "after")  # needs no MNIST
    assert wait_for_state(redis_client, "after", "succeeded", "failed") == "succeeded"
    assert worker.process.poll() is None


def test_redis_down_during_a_job_loses_nothing(workers, mnist):
    job = tiny_job(epochs=40, batch_size=10, publish={"every_epoch": True})
    with RedisServer() as server:
        client = server.client()
        worker = workers("survivor", url=server.url)
        submit_job(client, dumps(job), "rr")
        wait_for_event(client, "rr", epoch_event(2))
        server.stop()  # a clean shutdown: the append-only file keeps everything written
        worker.wait_for_line("retrying in 0.4 s")  # backing off: 0.1, 0.2, 0.4, ... s
        server.start()
        client = server.client()
        assert wait_for_state(client, "rr", "succeeded", "failed", timeout=60) == "succeeded"
        published_once_per_epoch(client, "tiny", "rr", job["epochs"])
        final = Registry(client).load("tiny", job["epochs"])
        assert parameters_equal(final.model, reference_model(mnist, job))
        assert worker.process.poll() is None
        client.close()


def test_a_second_signal_exits_at_once(redis_client, workers):
    worker = workers("impatient")
    submit_job(redis_client, dumps(LONG_JOB), "twice")
    wait_for_event(redis_client, "twice", epoch_event(2))
    worker.signal(signal.SIGSTOP)  # both signals then arrive together: no race with hand-back
    # A SIGCONT sent before the stop took effect would cancel it: wait until it is stopped.
    wait_until(lambda: process_state(worker.process.pid) == "T", what="the worker to stop")
    worker.signal(signal.SIGTERM)
    worker.signal(signal.SIGINT)
    worker.signal(signal.SIGCONT)
    assert worker.process.wait(10) in (128 + signal.SIGINT, 128 + signal.SIGTERM)
    assert job_status(redis_client, "twice")["state"] == "running"  # reclaimed after its lease


@pytest.mark.slow
def test_three_workers_twenty_jobs_each_done_once(redis_client, workers):
    started = [workers(f"pool{i}") for i in range(3)]
    ids = [submit_job(redis_client, dumps(TOY_JOB), f"many{i}")[0] for i in range(20)]
    for job_id in ids:
        assert wait_for_state(redis_client, job_id, "succeeded", "failed") == "succeeded"
    claims = [line for w in started for line in w.lines if ": claimed (delivery" in line]
    assert sorted(line.split("job ")[1].split(":")[0] for line in claims) == sorted(ids)
    assert all(job_status(redis_client, i)["attempts"] == "1" for i in ids)
    publications = redis_client.hgetall(keys.model_publications("toy"))
    assert len(publications) == 20 and len(set(publications.values())) == 20
    assert sum(1 for w in started if any("claimed" in line for line in w.lines)) >= 2
