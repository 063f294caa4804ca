"""Hot loading under load: new versions are served without a failed request, Redis may vanish."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from inference_support import MODEL, digit_pixels, publish, serving, tiny_model, wait_for

from inference_service.inputs import scale_pixels
from shared import keys
from shared.digits_client import DigitsClient
from shared.redis_server import RedisServer
from shared.registry import Registry


def test_twenty_publications_under_concurrent_load_fail_no_request(redis_client):
    registry = Registry(redis_client)
    pixels = digit_pixels(4)
    models = {publish(registry, tiny_model(0)): tiny_model(0)}
    stop = threading.Event()

    with serving(redis_client) as s:
        wait_for(s.store.ready, what="first version")

        def load(worker: int) -> list[tuple[int, np.ndarray]]:
            answers = []
            with DigitsClient(s.target) as client:
                while not stop.is_set():
                    batch = pixels[: 1 + worker % 4]  # single images and small batches
                    answer = client.classify_pixels(batch)  # any failure raises: test fails
                    answers.append((answer.model_version, batch, answer.probabilities))
            return answers

        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(load, i) for i in range(4)]
            for seed in range(1, 21):
                model = tiny_model(seed)
                models[publish(registry, model)] = model
            last = max(models)
            wait_for(lambda: s.store.models[MODEL].current.version == last, what="last version")
            with DigitsClient(s.target) as client:
                wait_for(
                    lambda: client.classify_pixels(pixels[:1]).model_version == last,
                    what="last version answering",
                )
            stop.set()
            answers = [a for w in workers for a in w.result(timeout=30)]

    assert len(answers) > 20
    seen = {version for version, _, _ in answers}
    assert seen <= set(models) and last in seen
    for version, batch, probabilities in answers:  # each answer came from the version it names
        model = models[version]
        np.testing.assert_allclose(
            probabilities, model.forward(scale_pixels(batch, model)), rtol=1e-5, atol=1e-7
        )


def test_serving_goes_on_without_redis_and_catches_up_when_it_returns():
    with RedisServer() as redis_server:
        client = redis_server.client()
        registry = Registry(client)
        first = publish(registry, tiny_model(1))
        with serving(redis_server.client()) as s:
            wait_for(s.store.ready, what="first version")
            with DigitsClient(s.target) as digits:
                redis_server.stop()
                for _ in range(20):
                    assert digits.classify_pixels(digit_pixels(1)).model_version == first
                with pytest.raises(grpc.RpcError) as err:  # an unloaded version needs Redis
                    digits.classify_pixels(digit_pixels(1), version=first + 1)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                redis_server.start()  # same port and data (append-only file)
                missed = publish(Registry(redis_server.client()), tiny_model(2))
                wait_for(
                    lambda: digits.classify_pixels(digit_pixels(1)).model_version == missed,
                    timeout=15,
                    what="the version published during the outage",
                )


def test_the_periodic_reconcile_catches_a_change_no_event_announced(redis_client):
    registry = Registry(redis_client)
    first, second = publish(registry, tiny_model(1)), publish(registry, tiny_model(2))
    registry.promote(MODEL, "production", first)
    with serving(redis_client, {MODEL: "production"}, reconcile_seconds=0.3) as s:
        wait_for(s.store.ready, what="production loaded")
        assert s.store.models[MODEL].current.version == first
        # Written behind the registry's back: no model event, only the reconcile can see it.
        redis_client.hset(keys.model_aliases(MODEL), "production", second)
        wait_for(
            lambda: s.store.models[MODEL].current.version == second,
            timeout=5,
            what="reconcile to pick up the alias move",
        )
