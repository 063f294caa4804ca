"""Shared fixtures: a real redis-server for the session, emptied before each test that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from shared.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port, for the whole test session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server) -> redis.Redis:
    """A client of the session's server, with the database emptied first."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files beside the repository; tests that need them skip when absent."""
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST files not found in {SHARED_MNIST}")
    return SHARED_MNIST
