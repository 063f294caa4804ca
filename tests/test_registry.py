"""The registry on a real redis-server: atomic publication, fences, dedupe, aliases, retention."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shared import defaults, keys
from shared.mlp import MLP
from shared.registry import PublishFenced, Registry, UnknownModel, UnknownVersion
from shared.snapshot import SnapshotError, encode_snapshot, manifest_json, snapshot_manifest

NAME = "digits"


def tiny_model(seed: int = 0) -> MLP:
    return MLP.create(
        (4, 3, 2), ("tanh", "softmax"), "cross_entropy", rng=np.random.default_rng(seed)
    )


def manifest_for(model: MLP, name: str = NAME, **extra) -> dict:
    return snapshot_manifest(model, model_name=name, metrics={"test_accuracy": 0.5}, **extra)


def publish(registry: Registry, seed: int = 0, name: str = NAME, **kwargs) -> int:
    model = tiny_model(seed)
    return registry.publish_snapshot(model, manifest_for(model, name), **kwargs)


@pytest.fixture
def registry(redis_client) -> Registry:
    return Registry(redis_client)


def event_count(client) -> int:
    return client.xlen(keys.MODEL_EVENTS)


# --- publishing -----------------------------------------------------------------------------


def test_publish_assigns_consecutive_versions(registry, redis_client):
    assert [publish(registry, seed) for seed in range(3)] == [1, 2, 3]
    assert registry.versions(NAME) == [1, 2, 3]
    assert registry.latest_version(NAME) == 3
    assert registry.models() == [NAME]
    for version in (1, 2, 3):
        assert (
            redis_client.exists(
                keys.snapshot_weights(NAME, version), keys.snapshot_manifest(NAME, version)
            )
            == 2
        )
    assert registry.manifest(NAME, 2)["version"] == 2
    assert registry.manifest(NAME, "latest")["version"] == 3


def test_loaded_snapshot_predicts_bit_for_bit(registry):
    model = tiny_model(7)
    version = registry.publish_snapshot(model, manifest_for(model, job_id="job-1"))
    snapshot = registry.load(NAME, version)
    raw = np.random.default_rng(0).integers(0, 256, size=(20, 4))
    assert snapshot.model.predict_proba(raw).tobytes() == model.predict_proba(raw).tobytes()
    assert (snapshot.name, snapshot.version, snapshot.manifest["job_id"]) == (NAME, 1, "job-1")


def test_models_are_numbered_independently(registry):
    assert publish(registry, name="a") == 1
    assert publish(registry, name="b") == 1
    assert publish(registry, name="a") == 2
    assert registry.models() == ["a", "b"]


def test_concurrent_publishers_get_distinct_consecutive_versions(redis_server, redis_client):
    threads, per_thread = 4, 5
    start = threading.Barrier(threads)
    results: list[int] = []
    lock = threading.Lock()

    def publisher(seed: int) -> None:
        client = redis_server.client()
        registry = Registry(client)
        start.wait()
        for i in range(per_thread):
            version = publish(registry, seed * 100 + i)
            with lock:
                results.append(version)
        client.close()

    workers = [threading.Thread(target=publisher, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(results) == list(range(1, threads * per_thread + 1))
    assert Registry(redis_client).versions(NAME) == sorted(results)


def test_fence_mismatch_publishes_nothing(registry, redis_client):
    lease = keys.job_lease("job-1")
    redis_client.set(lease, "new-worker-token")
    with pytest.raises(PublishFenced, match="no longer holds this worker's token"):
        publish(registry, fence=(lease, "old-worker-token"))
    redis_client.delete(lease)  # an expired lease fences too
    with pytest.raises(PublishFenced):
        publish(registry, fence=(lease, "old-worker-token"))
    assert registry.versions(NAME) == []
    assert registry.models() == []
    assert event_count(redis_client) == 0
    assert redis_client.get(keys.model_next_version(NAME)) is None
    redis_client.set(lease, "token")
    assert publish(registry, fence=(lease, "token")) == 1


def test_publication_is_deduplicated(registry, redis_client):
    first = publish(registry, 1, publication="job-1:epoch3")
    again = publish(registry, 2, publication="job-1:epoch3")
    other = publish(registry, 3, publication="job-1:epoch4")
    assert (first, again, other) == (1, 1, 2)
    assert registry.versions(NAME) == [1, 2]
    assert event_count(redis_client) == 2


def test_publish_encoded_stores_unverified_bytes_that_load_then_refuses(registry):
    model = tiny_model()
    weights, manifest = encode_snapshot(model, manifest_for(model))
    corrupt = bytearray(weights)
    corrupt[-30] ^= 0xFF
    version = registry.publish_encoded(bytes(corrupt), manifest)
    with pytest.raises(SnapshotError, match="sha256 mismatch"):
        registry.load(NAME, version)


def test_load_refuses_a_manifest_stored_under_another_version(registry, redis_client):
    publish(registry, 1)
    publish(registry, 2)
    redis_client.set(
        keys.snapshot_manifest(NAME, 2), redis_client.get(keys.snapshot_manifest(NAME, 1))
    )
    redis_client.set(
        keys.snapshot_weights(NAME, 2), redis_client.get(keys.snapshot_weights(NAME, 1))
    )
    with pytest.raises(SnapshotError, match="digits v2 holds a manifest for digits v1"):
        registry.load(NAME, 2)


def test_publish_refuses_bad_names_and_oversized_weights(registry, redis_client, monkeypatch):
    model = tiny_model()
    weights, manifest = encode_snapshot(model, manifest_for(model))
    for bad in ("a:b", "x}", "", "-lead", "a" * 65, None):
        with pytest.raises(ValueError, match="invalid model name"):
            registry.publish_encoded(weights, {**manifest, "model_name": bad})
    monkeypatch.setattr(defaults, "MAX_SNAPSHOT_BYTES", len(weights) - 1)
    with pytest.raises(SnapshotError, match="over the"):
        registry.publish_encoded(weights, manifest)
    assert redis_client.keys("*") == []


def test_reading_with_a_bad_name_is_refused(registry):
    with pytest.raises(ValueError, match="invalid model name 'a:b'"):
        registry.versions("a:b")


def test_a_decoding_client_is_given_a_binary_sibling(redis_server, redis_client):
    registry = Registry(redis_server.client(decode_responses=True))
    version = publish(registry)
    assert registry.load(NAME, version).version == 1
    assert registry.aliases(NAME) == {}


def test_manifest_json_keeps_version_first_and_exact(registry, redis_client):
    publish(registry)
    stored = redis_client.get(keys.snapshot_manifest(NAME, 1)).decode()
    assert stored.startswith('{"version":1,')
    manifest = registry.manifest(NAME, 1)
    assert manifest_json({k: v for k, v in manifest.items() if k != "version"}) == (
        "{" + stored[len('{"version":1,') :]
    )


# --- resolving ------------------------------------------------------------------------------


def test_resolve_accepts_latest_numbers_and_aliases(registry):
    publish(registry, 1)
    publish(registry, 2)
    registry.promote(NAME, "production", 1)
    assert registry.resolve(NAME, None) == 2
    assert registry.resolve(NAME, "latest") == 2
    assert registry.resolve(NAME, 1) == 1
    assert registry.resolve(NAME, "2") == 2
    assert registry.resolve(NAME, "production") == 1
    with pytest.raises(UnknownVersion, match="no version 9"):
        registry.resolve(NAME, 9)
    with pytest.raises(UnknownVersion, match="no alias 'staging'"):
        registry.resolve(NAME, "staging")
    with pytest.raises(UnknownModel, match="no model named 'other'"):
        registry.resolve("other", None)
    with pytest.raises(UnknownModel):
        registry.resolve("other", "production")
    with pytest.raises(UnknownModel):
        registry.load("other", 1)


# --- aliases --------------------------------------------------------------------------------


def test_promote_and_rollback_walk_the_history_back(registry):
    for seed in range(3):
        publish(registry, seed)
    registry.promote(NAME, "production", 1)
    registry.promote(NAME, "production", 2, reason="better accuracy")
    registry.promote(NAME, "production", 3)
    registry.promote(NAME, "production", 3)  # already there: no move recorded
    registry.promote(NAME, "staging", "latest")
    assert registry.aliases(NAME) == {"production": 3, "staging": 3}
    assert registry.rollback(NAME, "production") == 2
    assert registry.rollback(NAME, "production") == 1
    with pytest.raises(UnknownVersion, match="no earlier target"):
        registry.rollback(NAME, "production")
    assert registry.aliases(NAME) == {"production": 1, "staging": 3}
    moves = [(h["action"], h["alias"], h["from"], h["to"]) for h in registry.alias_history(NAME)]
    assert moves == [
        ("promote", "production", None, 1),
        ("promote", "production", 1, 2),
        ("promote", "production", 2, 3),
        ("promote", "staging", None, 3),
        ("rollback", "production", 3, 2),
        ("rollback", "production", 2, 1),
    ]
    assert registry.alias_history(NAME)[1]["reason"] == "better accuracy"


def test_promote_after_rollback_then_rolls_back_to_the_rollback_target(registry):
    for seed in range(3):
        publish(registry, seed)
    registry.promote(NAME, "production", 1)
    registry.promote(NAME, "production", 2)
    registry.rollback(NAME, "production")
    registry.promote(NAME, "production", 3)
    assert registry.rollback(NAME, "production") == 1


def test_alias_errors_are_named(registry, redis_client):
    publish(registry)
    with pytest.raises(UnknownVersion, match="no version 5"):
        registry.promote(NAME, "production", 5)
    with pytest.raises(UnknownModel):
        registry.promote("other", "production", 1)
    with pytest.raises(UnknownVersion, match="no alias 'production'"):
        registry.rollback(NAME, "production")
    with pytest.raises(UnknownModel):
        registry.rollback("other", "production")
    for bad in ("7", "latest", "a:b"):
        with pytest.raises(ValueError, match="alias"):
            registry.promote(NAME, bad, 1)
    assert registry.aliases(NAME) == {}
    assert registry.alias_history(NAME) == []
    assert event_count(redis_client) == 1


# --- events ---------------------------------------------------------------------------------


def test_events_announce_publications_and_alias_moves_in_order(registry):
    assert registry.last_event_id() == "0-0"
    publish(registry, 1)
    publish(registry, 2)
    registry.promote(NAME, "production", 2)
    registry.promote(NAME, "production", 1)
    registry.rollback(NAME, "production")
    events = [event for _, event in registry.read_events("0-0")]
    assert events == [
        {"event": "published", "model": NAME, "version": 1},
        {"event": "published", "model": NAME, "version": 2},
        {"event": "alias", "model": NAME, "alias": "production", "version": 2},
        {"event": "alias", "model": NAME, "alias": "production", "version": 1},
        {"event": "alias", "model": NAME, "alias": "production", "version": 2},
    ]
    last = registry.last_event_id()
    assert registry.read_events(last) == []
    publish(registry, 3)
    assert [e for _, e in registry.read_events(last)] == [
        {"event": "published", "model": NAME, "version": 3}
    ]


def test_a_blocked_reader_wakes_on_publication(redis_server, registry):
    last = registry.last_event_id()
    received: list = []
    reader = Registry(redis_server.client())

    def wait_for_event() -> None:
        received.extend(reader.read_events(last, block_ms=10_000))

    thread = threading.Thread(target=wait_for_event)
    thread.start()
    publish(registry)
    thread.join(timeout=15)
    assert [e for _, e in received] == [{"event": "published", "model": NAME, "version": 1}]


def test_event_stream_is_capped(redis_client):
    registry = Registry(redis_client, events_maxlen=10, retention=1)
    model = tiny_model()
    weights, manifest = encode_snapshot(model, manifest_for(model))
    for _ in range(300):
        registry.publish_encoded(weights, manifest)
    assert event_count(redis_client) < 300  # approximate trimming drops whole stream nodes


# --- retention ------------------------------------------------------------------------------


def test_retention_keeps_the_last_k_plus_aliased_versions(redis_client):
    registry = Registry(redis_client, retention=3)
    publish(registry, 1)
    publish(registry, 2)
    registry.promote(NAME, "production", 2)
    for seed in range(3, 9):
        publish(registry, seed)
    assert registry.versions(NAME) == [2, 6, 7, 8]
    for gone in (1, 3, 4, 5):
        assert not redis_client.exists(
            keys.snapshot_weights(NAME, gone), keys.snapshot_manifest(NAME, gone)
        )
    assert registry.load(NAME, "production").version == 2

    registry.promote(NAME, "production", 8)  # v2 stays: rollback would return to it
    for seed in range(9, 12):
        publish(registry, seed)
    assert registry.versions(NAME) == [2, 8, 9, 10, 11]
    assert registry.rollback(NAME, "production") == 2
    publish(registry, 12)  # nothing would roll back to v8 now
    assert registry.versions(NAME) == [2, 10, 11, 12]


def test_rollback_to_a_pruned_version_is_refused(redis_client):
    registry = Registry(redis_client, retention=1)
    for seed in range(3):
        publish(registry, seed)
        registry.promote(NAME, "production", seed + 1)
    publish(registry, 4)  # v1 is neither aliased nor the rollback target any more
    assert registry.versions(NAME) == [2, 3, 4]
    assert registry.rollback(NAME, "production") == 2
    with pytest.raises(UnknownVersion, match="earlier target v1 was pruned"):
        registry.rollback(NAME, "production")
    assert registry.aliases(NAME) == {"production": 2}


def test_retention_must_keep_a_version(redis_client):
    with pytest.raises(ValueError, match="at least one"):
        Registry(redis_client, retention=0)


# --- readers never see half a version -------------------------------------------------------


def test_a_reader_never_sees_an_indexed_version_without_its_data(redis_server, redis_client):
    publisher = Registry(redis_client, retention=3)
    publish(publisher, 0)
    done = threading.Event()
    violations: list[str] = []
    reads = [0]

    def read_in_a_tight_loop() -> None:
        client = redis_server.client()
        reader = Registry(client)
        while not done.is_set():
            reader.load(NAME, "latest")  # the latest is never pruned: must always load
            for version in reader.versions(NAME):
                present = client.exists(
                    keys.snapshot_weights(NAME, version), keys.snapshot_manifest(NAME, version)
                )
                # Missing data is fine only if the version left the index first (pruned).
                if present != 2 and client.zscore(keys.model_versions(NAME), version) is not None:
                    violations.append(f"v{version} indexed with {present}/2 keys")
            reads[0] += 1
        client.close()

    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            read_in_a_tight_loop()
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    thread = threading.Thread(target=guarded)
    thread.start()
    try:
        for seed in range(1, 60):
            publish(publisher, seed)
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert violations == []
    assert reads[0] > 0
    assert publisher.versions(NAME) == [58, 59, 60]
