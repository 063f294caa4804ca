"""deploy/ end to end: build the images, start the compose stack, and drive it from the host.

Jobs are submitted and watched with mnistctl over Redis published on a loopback port; digits are
classified over gRPC; containers are found by their compose labels and killed, restarted and
scaled. One stack serves the whole module and is torn down with its volumes at the end.
"""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import pytest
import redis
from compose_support import (
    COMPOSE_FILE,
    REDIS_PORT_FILE,
    Stack,
    build_images,
    compose_variables,
    docker_unavailable_reason,
    example_settings,
    run_cli,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import keys
from shared.digits_client import DigitsClient
from shared.mnist import load_mnist
from shared.redis_server import free_port
from shared.registry import Registry

# A job that trains in well under a second on 2,000 images and still classifies most digits.
TINY_JOB = {
    "preset": "seed002",
    "sizes": [784, 32, 10],
    "activations": ["relu", "softmax"],
    "epochs": 2,
    "limit": 2000,
}
# About a second per epoch here: long enough to be killed after its first epoch, short to finish.
LONG_JOB = {**TINY_JOB, "sizes": [784, 256, 10], "limit": 20000, "batch_size": 32, "epochs": 10}
PARALLEL_JOB = {**LONG_JOB, "epochs": 4}  # two at once on 2 cores: each still runs several seconds
LEASE_SECONDS = 3  # a killed trainer's job is taken over this soon after the restart
WATCH_SECONDS = 120  # the longest job here takes ~15 s on 2 busy cores


# --- without an engine: the compose files and .env.example agree ---------------------------------


def test_env_example_lists_every_setting_the_compose_files_read():
    missing = compose_variables(COMPOSE_FILE, REDIS_PORT_FILE) - set(example_settings())
    assert not missing, f"deploy/.env.example does not list {sorted(missing)}"


# --- with an engine ------------------------------------------------------------------------------


def docker_test(test):
    """Marks a test that drives the compose stack (the first one also builds the images)."""
    return pytest.mark.docker(pytest.mark.slow(pytest.mark.timeout(1500)(test)))


@pytest.fixture(scope="module")
def stack(mnist_dir, tmp_path_factory):
    """Build the images and start redis, one trainer and inference on free loopback ports."""
    reason = docker_unavailable_reason()
    if reason:
        pytest.skip(f"compose end-to-end test needs Docker: {reason}")
    import docker

    client = docker.from_env(timeout=120)
    stack = Stack.create(
        client,
        tmp_path_factory.mktemp("compose"),
        {
            "REDIS_PASSWORD": f"e2e-{time.time_ns():x}",
            # What build_bases.sh makes: the test needs no registry.
            "PYTHON_BASE": "mnist-base/python:3.11-bookworm",
            "REDIS_IMAGE": "mnist-base/redis:7-bookworm",
            "APP_IMAGE": "mnist-mlp-service:e2e",
            "INFERENCE_BIND_ADDRESS": "127.0.0.1",
            "INFERENCE_GRPC_PORT": str(free_port()),
            "INFERENCE_METRICS_PORT": str(free_port()),
            "REDIS_HOST_PORT": str(free_port()),
            "MNIST_HOST_DIR": str(mnist_dir),
            "TRAINER_LEASE_SECONDS": str(LEASE_SECONDS),
        },
    )
    try:
        timings = build_images(stack)
        started = time.monotonic()
        stack.compose("up", "--detach", "--no-build")
        stack.wait_healthy(stack.container("redis"))
        stack.wait_healthy(stack.container("inference"))
        timings["up until healthy"] = time.monotonic() - started
        print("compose timings:", {k: f"{v:.1f} s" for k, v in timings.items()})
        yield stack
    finally:
        stack.down()
        client.close()


@pytest.fixture(scope="module")
def redis_url(stack) -> str:
    return f"redis://:{stack.settings['REDIS_PASSWORD']}@127.0.0.1:{stack.settings['REDIS_HOST_PORT']}/0"


@pytest.fixture(scope="module")
def registry(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield Registry(client)
    client.close()


@pytest.fixture(scope="module")
def grpc_target(stack) -> str:
    return f"127.0.0.1:{stack.settings['INFERENCE_GRPC_PORT']}"


@pytest.fixture(scope="module")
def mnist_test_digits(mnist_dir):
    _, test = load_mnist(mnist_dir)
    return test.take(500)


def submit(stack: Stack, redis_url: str, model: str, job: dict) -> str:
    """``mnistctl jobs submit`` from the host; the new job's id."""
    spec = json.dumps({"model": model, **job})
    result = run_cli("jobs", "submit", "-", "--redis-url", redis_url, "--json", stdin=spec)
    assert result.returncode == 0, f"jobs submit failed:\n{result.stdout}{result.stderr}"
    return json.loads(result.stdout)["job_id"]


def watch(stack: Stack, redis_url: str, job_id: str) -> None:
    """``mnistctl jobs watch`` until the job ends; it must succeed."""
    result = run_cli("jobs", "watch", job_id, "--redis-url", redis_url, timeout=WATCH_SECONDS)
    assert result.returncode == 0, (
        f"job {job_id} did not succeed (watch exited {result.returncode}):\n"
        f"{result.stdout[-3000:]}{result.stderr[-3000:]}\n{stack.logs()}"
    )


def wait_for_event(
    client: redis.Redis, stream: str, matches, timeout: float, stack: Stack
) -> dict[str, str]:
    """Block on a Redis stream until an entry satisfies ``matches``; that entry's fields."""
    deadline = time.monotonic() + timeout
    last_id = "0"
    while (left := deadline - time.monotonic()) > 0:
        for _, entries in client.xread({stream: last_id}, block=int(left * 1000) + 1) or []:
            for entry_id, raw in entries:
                last_id = entry_id
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                if matches(fields):
                    return fields
    raise AssertionError(f"no matching event on {stream} within {timeout} s\n{stack.logs()}")


def wait_serving(target: str, timeout: float = 60) -> None:
    """Follow grpc.health.v1 Health/Watch from the host until the server is SERVING."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        stub = health_pb2_grpc.HealthStub(channel)
        for update in stub.Watch(health_pb2.HealthCheckRequest(), timeout=timeout):
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                return


def health_status(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def classify(target: str, digits, model: str):
    with DigitsClient(target) as client:
        return client.classify_pixels(digits.features, model=model)


def job_records(client: redis.Redis) -> dict:
    """Every job's status hash, and the queue stream's entries (what a trainer would claim)."""
    ids = [job_id.decode() for job_id in client.zrange(keys.JOBS_INDEX, 0, -1)]
    return {
        "status": {job_id: client.hgetall(keys.job_status(job_id)) for job_id in ids},
        "stream": client.xrange(keys.JOBS_STREAM),
    }


def ensure_model(stack, redis_url, registry, model: str = "digits") -> int:
    """The latest version of ``model``, training a tiny one first if there is none."""
    if registry.latest_version(model) is None:
        watch(stack, redis_url, submit(stack, redis_url, model, TINY_JOB))
    version = registry.latest_version(model)
    assert version is not None, f"job succeeded but {model} has no version\n{stack.logs()}"
    return version


@docker_test
def test_fresh_stack_is_healthy_with_no_model_and_runs_as_non_root(stack, grpc_target):
    inference = stack.container("inference")
    assert health_status(grpc_target) == "NOT_SERVING"  # healthy for Docker, not yet for traffic
    assert inference.exec_run(["mnist-healthcheck"]).exit_code == 0
    assert inference.exec_run(["mnist-healthcheck", "--serving"]).exit_code == 1
    assert inference.exec_run(["id", "-u"]).output.decode().strip() == "10001"
    image = stack.client.images.get(stack.settings["APP_IMAGE"])
    assert image.attrs["Config"]["User"] == "10001:10001"
    size_mb = image.attrs["Size"] / 1e6
    print(f"{stack.settings['APP_IMAGE']}: {size_mb:.0f} MB")
    assert size_mb < 400, f"the app image grew to {size_mb:.0f} MB"
    metrics_url = f"http://127.0.0.1:{stack.settings['INFERENCE_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        assert response.status == 200
    # Redis is reachable from the host only through the loopback port the override publishes.
    ports = stack.container("redis").attrs["NetworkSettings"]["Ports"]["6379/tcp"]
    assert [p["HostIp"] for p in ports] == ["127.0.0.1"]


@docker_test
def test_job_submitted_from_the_host_trains_and_is_served(
    stack, redis_url, registry, grpc_target, mnist_test_digits
):
    job_id = submit(stack, redis_url, "digits", TINY_JOB)
    watch(stack, redis_url, job_id)
    version = registry.latest_version("digits")
    assert version is not None
    assert registry.manifest("digits", version)["job_id"] == job_id
    wait_serving(grpc_target)
    assert stack.container("inference").exec_run(["mnist-healthcheck", "--serving"]).exit_code == 0
    answer = classify(grpc_target, mnist_test_digits, "digits")
    assert (answer.model_name, answer.model_version) == ("digits", version)
    accuracy = float((answer.labels == mnist_test_digits.labels).mean())
    assert accuracy > 0.7, f"served model classifies only {accuracy:.0%} of test digits"


@docker_test
def test_trainer_killed_mid_job_comes_back_and_the_job_completes(stack, redis_url, registry):
    client = registry.client
    job_id = submit(stack, redis_url, "killed", LONG_JOB)
    wait_for_event(
        client,
        keys.job_events(job_id),
        lambda e: e["event"] == "epoch" and e["epoch"] == "1",
        WATCH_SECONDS,
        stack,
    )
    stack.compose("kill", "trainer")  # SIGKILL: no hand-back, the lease must expire
    status = client.hgetall(keys.job_status(job_id))
    assert status[b"state"] == b"running", f"job was not mid-run when killed: {status}"
    stack.compose("start", "trainer")
    watch(stack, redis_url, job_id)
    status = client.hgetall(keys.job_status(job_id))
    assert int(status[b"attempts"]) >= 2, f"the job was not delivered again: {status}"
    assert registry.latest_version("killed") is not None
    assert "resuming after epoch" in stack.logs("trainer", tail=200)


@docker_test
def test_restarted_inference_serves_the_latest_version_again(
    stack, redis_url, registry, grpc_target, mnist_test_digits
):
    version = ensure_model(stack, redis_url, registry)
    inference = stack.container("inference")
    inference.restart(timeout=20)
    stack.wait_healthy(inference)
    wait_serving(grpc_target)
    answer = classify(grpc_target, mnist_test_digits, "digits")
    assert answer.model_version == version == registry.latest_version("digits")


@docker_test
def test_restarted_redis_loses_no_job_and_no_snapshot(stack, redis_url, registry):
    ensure_model(stack, redis_url, registry)
    client = registry.client
    stack.compose("stop", "trainer")  # so that a job is still queued across the restart
    queued = submit(stack, redis_url, "after-restart", TINY_JOB)
    jobs_before = job_records(client)
    snapshots_before = {
        (name, v): registry.manifest(name, v)["weights_sha256"]
        for name in registry.models()
        for v in registry.versions(name)
    }
    assert queued in jobs_before["status"] and snapshots_before

    redis_container = stack.container("redis")
    redis_container.restart(timeout=20)
    stack.wait_healthy(redis_container)
    client.connection_pool.disconnect()  # the old connections died with the server

    jobs_after = job_records(client)
    assert jobs_after == jobs_before
    snapshots_after = {
        (name, v): registry.load(name, v).manifest["weights_sha256"]  # verifies the weights too
        for name in registry.models()
        for v in registry.versions(name)
    }
    assert snapshots_after == snapshots_before
    stack.compose("start", "trainer")
    watch(stack, redis_url, queued)


@docker_test
def test_two_trainers_train_two_jobs_at_once(stack, redis_url, registry):
    stack.compose("up", "--detach", "--no-build", "--no-recreate", "--scale", "trainer=2")
    trainers = stack.containers("trainer")
    assert len(trainers) == 2
    client = registry.client
    jobs = [submit(stack, redis_url, f"parallel-{i}", PARALLEL_JOB) for i in range(2)]
    # Both must be running before either finishes.
    for job_id in jobs:
        wait_for_event(
            client,
            keys.job_events(job_id),
            lambda e: e["event"] == "state" and e["state"] in ("running", "succeeded"),
            WATCH_SECONDS,
            stack,
        )
    states = [client.hget(keys.job_status(job_id), "state") for job_id in jobs]
    assert states == [b"running", b"running"], f"not both running at once: {states}"
    for job_id in jobs:
        watch(stack, redis_url, job_id)
    claimed_by = {
        job_id: [t.name for t in trainers if f"job {job_id}: claimed" in t.logs().decode()]
        for job_id in jobs
    }
    owners = sorted(name for names in claimed_by.values() for name in names)
    assert owners == sorted(t.name for t in trainers), f"one job per trainer: {claimed_by}"
