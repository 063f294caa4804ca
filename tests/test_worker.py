"""The worker in-process on a real Redis: train, publish, resume, refuse, cancel, dead-letter."""

from __future__ import annotations

import json
import threading

import pytest
from trainer_support import (
    TOY_JOB,
    dumps,
    tiny_job,
    wait_for_event,
    wait_for_state,
    write_tiny_mnist,
)

from shared import keys
from shared.jobspec import parse_job
from shared.registry import Registry
from trainer_service.queue import (
    cancel_job,
    dead_letters,
    job_status,
    requeue_job,
    submit_job,
)
from trainer_service.worker import Worker, build_model, parameters_equal


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist"))


def make_worker(client, data_dir, name="w1", **options) -> Worker:
    options.setdefault("lease_seconds", 5.0)
    options.setdefault("progress_interval", 0.05)
    options.setdefault("claim_block_seconds", 0.1)
    return Worker(client, name, data_dir=data_dir, **options)


def test_submitted_job_is_trained_and_published_with_its_manifest(redis_client, tiny_mnist):
    job_id, created = submit_job(redis_client, dumps(tiny_job(publish={"every_epoch": True})), "j1")
    assert created
    make_worker(redis_client, tiny_mnist).run(exit_when_idle=True)
    status = job_status(redis_client, job_id)
    assert status is not None and status["state"] == "succeeded", status
    assert json.loads(status["published"]) == [1, 2, 3]
    registry = Registry(redis_client)
    manifest = registry.manifest("tiny", 3)
    assert manifest["job_id"] == job_id and manifest["metrics"]["epoch"] == 3
    assert manifest["training"]["epochs"] == 3 and manifest["training"]["seed"] == 7
    assert manifest["sizes"] == [784, 16, 10] and manifest["parent"] is None
    assert manifest["metrics"]["test_accuracy"] == pytest.approx(float(status["test_accuracy"]))
    # The published weights are what an in-process fit of the same job gives.
    assert registry.load("tiny", 3).model.parameter_count == 784 * 16 + 16 + 16 * 10 + 10


def test_inline_toy_job_and_warm_start_record_their_parent(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "toy-a")
    warm = {**TOY_JOB, "epochs": 2, "warm_start": {"model": "toy", "version": "latest"}}
    submit_job(redis_client, dumps(warm), "toy-b")
    make_worker(redis_client, None).run(exit_when_idle=True)
    registry = Registry(redis_client)
    assert registry.versions("toy") == [1, 2]
    assert registry.manifest("toy", 2)["parent"] == {"model_name": "toy", "version": 1}
    assert job_status(redis_client, "toy-b")["warm_start_version"] == "1"


def test_submitting_the_same_id_twice_enqueues_once(redis_client):
    assert submit_job(redis_client, dumps(TOY_JOB), "same") == ("same", True)
    assert submit_job(redis_client, dumps(TOY_JOB), "same") == ("same", False)
    assert redis_client.xlen(keys.JOBS_STREAM) == 1


def test_bad_job_written_straight_into_redis_fails_with_its_reason(redis_client):
    bad = {**TOY_JOB, "epochs": 0}
    redis_client.xadd(keys.JOBS_STREAM, {"job_id": "raw-bad", "job": json.dumps(bad)})
    redis_client.xadd(keys.JOBS_STREAM, {"job_id": "raw-junk", "job": "{not json"})
    entry_id = redis_client.xadd(keys.JOBS_STREAM, {"job": json.dumps(TOY_JOB)}).decode()
    make_worker(redis_client, None).run(exit_when_idle=True)
    assert job_status(redis_client, "raw-bad")["state"] == "failed"
    assert job_status(redis_client, "raw-bad")["error"].startswith("epochs: ")
    assert job_status(redis_client, "raw-junk")["error"].startswith("job: is not valid JSON")
    assert job_status(redis_client, entry_id)["state"] == "succeeded"
    assert redis_client.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)["pending"] == 0
    assert redis_client.xlen(keys.JOBS_STREAM) == 0  # settled entries are deleted: XLEN = backlog


def test_cancelling_a_queued_job_means_it_never_runs(redis_client):
    submit_job(redis_client, dumps(TOY_JOB), "c1")
    assert cancel_job(redis_client, "c1") == "cancelled"
    make_worker(redis_client, None).run(exit_when_idle=True)
    assert job_status(redis_client, "c1")["state"] == "cancelled"
    assert Registry(redis_client).models() == []
    assert redis_client.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)["pending"] == 0


def test_cancelling_a_running_job_stops_it(redis_client, tiny_mnist):
    submit_job(redis_client, dumps(tiny_job(epochs=500)), "c2")
    worker = make_worker(redis_client, tiny_mnist)
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
    thread.start()
    wait_for_event(redis_client, "c2", lambda e: e["event"] == "epoch")
    assert cancel_job(redis_client, "c2") == "cancelling"
    assert wait_for_state(redis_client, "c2", "cancelled", "succeeded") == "cancelled"
    thread.join(10)
    assert not thread.is_alive()
    assert Registry(redis_client).models() == []


def test_interrupted_and_resumed_job_ends_bitwise_equal(redis_client, tiny_mnist):
    job = tiny_job(epochs=40, optimiser="adam", lr=0.01, dropout=0.1)
    submit_job(redis_client, dumps(job), "r1")
    first = make_worker(redis_client, tiny_mnist, name="first")
    thread = threading.Thread(target=first.run)
    thread.start()
    wait_for_event(redis_client, "r1", lambda e: e["event"] == "epoch" and e["epoch"] == "2")
    first.shutdown.set()
    thread.join(10)
    status = job_status(redis_client, "r1")
    assert status["state"] == "queued", status
    assert redis_client.hget(keys.job_checkpoint("r1"), "meta") is not None
    make_worker(redis_client, tiny_mnist, name="second").run(exit_when_idle=True)
    assert job_status(redis_client, "r1")["state"] == "succeeded"
    resumed = Registry(redis_client).load("tiny", 1).model

    submit_job(redis_client, dumps({**job, "model": "reference"}), "r2")
    make_worker(redis_client, tiny_mnist).run(exit_when_idle=True)
    reference = Registry(redis_client).load("reference", 1).model
    assert parameters_equal(resumed, reference)
    assert not parameters_equal(resumed, build_model(parse_job(job)))


def test_job_failing_every_delivery_is_dead_lettered_and_can_be_requeued(
    redis_client, tmp_path, tiny_mnist
):
    submit_job(redis_client, dumps(tiny_job()), "p1")
    empty = tmp_path / "no-mnist"
    empty.mkdir()
    make_worker(redis_client, empty, max_deliveries=3).run(exit_when_idle=True)
    status = job_status(redis_client, "p1")
    assert status["state"] == "dead-lettered" and status["attempts"] == "3"
    assert "MnistNotFound" in status["error"]
    [dead] = dead_letters(redis_client)
    assert dead["job_id"] == "p1" and "MnistNotFound" in dead["error"]
    requeue_job(redis_client, "p1")
    assert dead_letters(redis_client) == []
    make_worker(redis_client, tiny_mnist).run(exit_when_idle=True)
    assert job_status(redis_client, "p1")["state"] == "succeeded"
    assert job_status(redis_client, "p1")["attempts"] == "1"


def test_min_accuracy_not_reached_publishes_nothing(redis_client):
    contradictory = {"features": [[0, 0], [0, 0]], "labels": [0, 1]}  # at best half right
    job = {**TOY_JOB, "dataset": contradictory, "publish": {"min_accuracy": 0.9}}
    submit_job(redis_client, dumps(job), "m1")
    make_worker(redis_client, None).run(exit_when_idle=True)
    status = job_status(redis_client, "m1")
    assert status["state"] == "failed" and "min_accuracy" in status["error"]
    assert Registry(redis_client).models() == []


def test_published_weights_match_an_in_process_fit(redis_client, tiny_mnist):
    from shared.mnist import load_mnist
    from shared.training import fit

    job = tiny_job(epochs=2)
    submit_job(redis_client, dumps(job), "f1")
    make_worker(redis_client, tiny_mnist).run(exit_when_idle=True)
    spec = parse_job(job)
    model = build_model(spec)
    train, test = load_mnist(tiny_mnist)
    fit(model, train, spec.training, test=test)
    published = Registry(redis_client).load("tiny", 1).model
    assert parameters_equal(model, published)


@pytest.mark.slow
def test_a_preset_job_on_real_mnist_learns(redis_client, mnist_dir):
    job = {"preset": "seed002", "model": "real", "epochs": 1, "limit": 3000}
    submit_job(redis_client, dumps(job), "real")
    make_worker(redis_client, mnist_dir).run(exit_when_idle=True)
    status = job_status(redis_client, "real")
    assert status["state"] == "succeeded", status
    manifest = Registry(redis_client).manifest("real", 1)
    assert manifest["metrics"]["test_examples"] == 10_000
    assert manifest["metrics"]["test_accuracy"] > 0.7  # 79.7% measured; chance is 10%
    assert manifest["input_scaling"] == {"offset": 0.0, "scale": 1 / 255}
