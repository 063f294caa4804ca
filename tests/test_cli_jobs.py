"""``mnistctl jobs`` as a user runs it: a real process talking to a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from trainer_support import TOY_JOB, WorkerProcess, dumps, tiny_job, write_tiny_mnist

from shared import keys
from shared.cli.jobs import progress_line
from shared.redis_server import RedisServer
from trainer_service.queue import job_status
from trainer_service.worker import Worker

REPO = Path(__file__).resolve().parents[1]


def mnistctl(
    redis_url: str,
    *args: str,
    stdin: str | None = None,
    env_url: bool = False,
    env: dict[str, str] | None = None,
):
    """Run ``mnistctl jobs ...``; the URL goes in $REDIS_URL or --redis-url."""
    env = {**os.environ, **(env or {})}
    if env_url:
        env["REDIS_URL"] = redis_url
    command = [sys.executable, "-m", "shared.cli", "jobs", *args]
    if not env_url:
        command += ["--redis-url", redis_url]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=60)  # fmt: skip


def run_worker(client, data_dir=None) -> threading.Thread:
    worker = Worker(client, "cli-w", data_dir=data_dir, progress_interval=0.05,
                    claim_block_seconds=0.2)  # fmt: skip
    thread = threading.Thread(target=worker.run, kwargs={"exit_when_idle": True})
    thread.start()
    return thread


def test_submit_from_a_file_is_idempotent_with_a_job_id(redis_server, redis_client, tmp_path):
    path = tmp_path / "job.json"
    path.write_text(dumps(TOY_JOB))
    first = mnistctl(redis_server.url, "submit", str(path), "--job-id", "cli1", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"job_id": "cli1", "created": True}
    again = mnistctl(redis_server.url, "submit", str(path), "--job-id", "cli1", "--json",
                     env_url=True)  # fmt: skip
    assert json.loads(again.stdout) == {"job_id": "cli1", "created": False}
    assert job_status(redis_client, "cli1")["state"] == "queued"


def test_submit_from_stdin_with_flags_overriding_the_file(redis_server, redis_client):
    flags = ["--epochs", "3", "--model", "renamed", "--json"]
    done = mnistctl(redis_server.url, "submit", "-", *flags, stdin=dumps(TOY_JOB))
    assert done.returncode == 0, done.stderr
    spec = json.loads(job_status(redis_client, json.loads(done.stdout)["job_id"])["spec"])
    assert spec["epochs"] == 3 and spec["model"] == "renamed"


def test_an_invalid_job_is_refused_naming_the_field(redis_server, redis_client):
    done = mnistctl(redis_server.url, "submit", "-", stdin=dumps({**TOY_JOB, "lr": -1}))
    assert done.returncode == 2
    assert "lr:" in done.stderr
    assert redis_client.exists("mnist:jobs") == 0


def test_watch_follows_the_job_and_exits_with_its_outcome(redis_server, redis_client, tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist")
    job = tiny_job(epochs=3, publish={"every_epoch": True})
    submitted = mnistctl(redis_server.url, "submit", "-", "--job-id", "w1", stdin=dumps(job))
    assert submitted.stdout.strip() == "w1"
    worker = run_worker(redis_client, data)
    watched = mnistctl(redis_server.url, "watch", "w1")
    worker.join(30)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    lines = watched.stdout.splitlines()
    assert lines[0] == "queued" and "running" in lines
    assert sum(line.startswith("epoch ") for line in lines) == 3
    assert lines[-1] == "job w1 succeeded: tiny versions [1, 2, 3]"
    as_json = mnistctl(redis_server.url, "watch", "w1", "--json")
    assert json.loads(as_json.stdout.splitlines()[-1])["state"] == "succeeded"


@pytest.mark.parametrize(("change", "state", "code"), [({"epochs": 0}, "failed", 1)])
def test_watch_exit_code_says_how_the_job_ended(redis_server, redis_client, change, state, code):
    redis_client.xadd("mnist:jobs", {"job_id": "bad1", "job": dumps({**TOY_JOB, **change})})
    run_worker(redis_client).join(30)
    watched = mnistctl(redis_server.url, "watch", "bad1")
    assert watched.returncode == code
    assert watched.stdout.splitlines()[-1].startswith(f"job bad1 {state}: epochs:")


@pytest.mark.slow  # ten mnistctl processes
def test_cancel_list_show_dead_and_requeue(redis_server, redis_client):
    assert mnistctl(redis_server.url, "submit", "-", "--job-id", "c1", stdin=dumps(TOY_JOB)).stdout
    cancelled = mnistctl(redis_server.url, "cancel", "c1")
    assert cancelled.stdout.strip() == "c1: cancelled"
    assert mnistctl(redis_server.url, "watch", "c1").returncode == 4
    listed = json.loads(mnistctl(redis_server.url, "list", "--json").stdout)
    assert [(j["job_id"], j["state"]) for j in listed] == [("c1", "cancelled")]
    shown = json.loads(mnistctl(redis_server.url, "show", "c1", "--json").stdout)
    assert shown["state"] == "cancelled" and json.loads(shown["spec"]) == TOY_JOB
    assert "(no dead-lettered jobs)" in mnistctl(redis_server.url, "dead").stdout
    requeued = mnistctl(redis_server.url, "requeue", "c1")
    assert requeued.returncode == 0, requeued.stderr
    run_worker(redis_client).join(30)
    assert mnistctl(redis_server.url, "watch", "c1").returncode == 0
    unknown = mnistctl(redis_server.url, "show", "nope")
    assert unknown.returncode == 2 and "unknown job" in unknown.stderr


def test_cancel_uses_the_workers_retention_setting(redis_server, redis_client):
    mnistctl(redis_server.url, "submit", "-", "--job-id", "short", stdin=dumps(TOY_JOB))
    retention = {"JOB_RETENTION_SECONDS": "120"}
    assert mnistctl(redis_server.url, "cancel", "short", env=retention).returncode == 0
    assert 110 <= redis_client.ttl(keys.job_status("short")) <= 120


def test_dead_lists_poison_jobs_and_requeue_takes_them_back(redis_server, redis_client, tmp_path):
    submitted = mnistctl(redis_server.url, "submit", "-", "--job-id", "p1", stdin=dumps(tiny_job()))
    assert submitted.returncode == 0
    run_worker(redis_client, tmp_path).join(30)  # tmp_path holds no MNIST: every delivery fails
    assert mnistctl(redis_server.url, "watch", "p1").returncode == 3
    [dead] = json.loads(mnistctl(redis_server.url, "dead", "--json").stdout)
    assert dead["job_id"] == "p1" and "MnistNotFound" in dead["error"]
    assert mnistctl(redis_server.url, "requeue", "p1").returncode == 0
    assert json.loads(mnistctl(redis_server.url, "dead", "--json").stdout) == []
    assert job_status(redis_client, "p1")["state"] == "queued"


def test_worker_and_cli_find_a_password_protected_redis_in_the_environment():
    with RedisServer(password="s3cret") as server:
        worker = WorkerProcess(None, "env-w", None, env={"REDIS_URL": server.url})
        try:
            submitted = mnistctl(server.url, "submit", "-", "--job-id", "pw", "--watch",
                                 stdin=dumps(TOY_JOB), env_url=True)  # fmt: skip
            assert submitted.returncode == 0, submitted.stderr
            assert submitted.stdout.splitlines()[-1].startswith("job pw succeeded")
        finally:
            worker.stop()
        refused = mnistctl(server.url.replace("s3cret", "wrong"), "list")
        assert refused.returncode == 2 and "redis:" in refused.stderr


def test_progress_line_shows_bar_loss_accuracy_and_eta():
    line = progress_line({"epoch": "2", "epochs": "4", "batch": "5", "batches": "10",
                          "loss": "0.25", "accuracy": "0.9", "samples_per_second": "1000",
                          "eta_seconds": "75"})  # fmt: skip
    assert line.startswith("[" + "#" * 11 + "-" * 19 + "] epoch 2/4 batch 5/10")
    assert "loss 0.2500" in line and "acc 90.0%" in line and "ETA 1:15" in line
