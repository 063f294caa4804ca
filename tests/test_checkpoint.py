"""Checkpoints: a TrainingState round-trips through Redis exactly, never via pickle, fenced."""

from __future__ import annotations

import io

import numpy as np
import pytest
from trainer_support import TOY_JOB

from shared import keys
from shared.jobspec import parse_job
from shared.training import TrainingCallbacks, fit
from trainer_service.checkpoint import (
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from trainer_service.worker import build_model


class KeepFirstEpoch(TrainingCallbacks):
    def __init__(self) -> None:
        self.encoded = None

    def on_epoch(self, report) -> None:
        if self.encoded is None:
            self.encoded = encode_checkpoint(report.state, "fp")


def toy_run(epochs: int, resume=None):
    spec = parse_job({**TOY_JOB, "epochs": epochs, "optimiser": "adam", "lr": 0.05})
    model = build_model(spec)
    keep = KeepFirstEpoch()
    fit(model, spec.inline, spec.training, resume=resume, callbacks=keep)
    return model, keep.encoded


def test_resuming_from_a_decoded_checkpoint_continues_bit_for_bit():
    straight, encoded = toy_run(5)
    state = decode_checkpoint(*encoded, "fp")
    assert state.epoch == 1 and "t" in state.optimiser
    resumed, _ = toy_run(5, resume=state)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert np.array_equal(a, b)


def test_a_checkpoint_of_another_spec_or_corrupt_bytes_is_refused():
    _, (meta, arrays) = toy_run(1)
    with pytest.raises(CheckpointError, match="different job spec"):
        decode_checkpoint(meta, arrays, "other")
    with pytest.raises(CheckpointError, match="unreadable"):
        decode_checkpoint(meta, arrays[:-10], "fp")
    pickled = io.BytesIO()
    np.savez(pickled, p0=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError, match="unreadable"):
        decode_checkpoint(meta, pickled.getvalue(), "fp")


def test_only_the_lease_holder_can_save(redis_client):
    _, encoded = toy_run(1)
    redis_client.set(keys.job_lease("j"), "mine")
    assert not save_checkpoint(redis_client, "j", encoded, token="stale")
    assert load_checkpoint(redis_client, "j", "fp") is None
    assert save_checkpoint(redis_client, "j", encoded, token="mine")
    assert load_checkpoint(redis_client, "j", "fp").epoch == 1
