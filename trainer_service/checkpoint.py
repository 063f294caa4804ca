"""End-of-epoch checkpoints in Redis: a TrainingState as JSON plus .npz (allow_pickle=False).

The checkpoint hash (``keys.job_checkpoint``) holds ``meta`` (JSON: epoch, RNG state, the job's
fingerprint, array names) and ``arrays`` (.npz: parameters ``p0, p1, ...`` and optimiser arrays
``opt_<name>``). Writes are fenced by the job's lease so a worker that lost its job cannot overwrite
the checkpoint of the worker that took it over.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import redis

from shared import keys
from shared.training import TrainingState

CHECKPOINT_FORMAT = 1

# Write the checkpoint only while the caller still holds the lease.
_FENCED_SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'meta', ARGV[2], 'arrays', ARGV[3])
return 1
"""


class CheckpointError(ValueError):
    """A stored checkpoint that cannot be used; the job then starts from scratch."""


def encode_checkpoint(state: TrainingState, fingerprint: str) -> tuple[str, bytes]:
    """(meta JSON, .npz bytes) of ``state``; copies the arrays, so training may go on at once."""
    arrays = {f"p{i}": p for i, p in enumerate(state.parameters)}
    arrays.update({f"opt_{name}": a for name, a in state.optimiser.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    meta = {
        "format": CHECKPOINT_FORMAT,
        "epoch": state.epoch,
        "rng_state": state.rng_state,
        "parameters": len(state.parameters),
        "optimiser": sorted(state.optimiser),
        "fingerprint": fingerprint,
    }
    return json.dumps(meta), buffer.getvalue()


def decode_checkpoint(meta_json: str | bytes, arrays: bytes, fingerprint: str) -> TrainingState:
    """The TrainingState stored by ``encode_checkpoint``; CheckpointError when unusable."""
    try:
        meta = json.loads(meta_json)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"unknown checkpoint format {meta.get('format')!r}")
        if meta.get("fingerprint") != fingerprint:
            raise CheckpointError("checkpoint belongs to a different job spec")
        with np.load(io.BytesIO(arrays), allow_pickle=False) as npz:
            loaded = {name: npz[name] for name in npz.files}
        parameters = [loaded[f"p{i}"] for i in range(int(meta["parameters"]))]
        optimiser = {name: loaded[f"opt_{name}"] for name in meta["optimiser"]}
        return TrainingState(int(meta["epoch"]), parameters, optimiser, dict(meta["rng_state"]))
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"unreadable checkpoint: {type(exc).__name__}: {exc}") from None


def save_checkpoint(
    client: redis.Redis, job_id: str, encoded: tuple[str, bytes], *, token: str
) -> bool:
    """Store an encoded checkpoint if ``token`` still holds the job's lease, else return False."""
    meta, arrays = encoded
    stored = client.eval(
        _FENCED_SAVE, 2, keys.job_lease(job_id), keys.job_checkpoint(job_id), token, meta, arrays
    )
    return bool(stored)


def load_checkpoint(client: redis.Redis, job_id: str, fingerprint: str) -> TrainingState | None:
    """The job's last checkpoint, or None when there is none (CheckpointError when unusable)."""
    meta, arrays = client.hmget(keys.job_checkpoint(job_id), ["meta", "arrays"])
    if meta is None or arrays is None:
        return None
    return decode_checkpoint(meta, arrays, fingerprint)


def checkpoint_epoch(client: redis.Redis, job_id: str) -> int | None:
    """The epoch of the job's stored checkpoint, without reading its arrays."""
    meta = client.hget(keys.job_checkpoint(job_id), "meta")
    return None if meta is None else int(json.loads(meta)["epoch"])
