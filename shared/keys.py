"""Every Redis key and stream name, so that trainer, server and CLI cannot disagree about one."""

from __future__ import annotations

from shared import defaults

PREFIX = defaults.KEY_PREFIX

# --- training jobs ---------------------------------------------------------------------------
JOBS_STREAM = f"{PREFIX}:jobs"  # XADD job=<json> to submit; consumed by a consumer group
JOBS_GROUP = "trainers"
DEAD_LETTER_STREAM = f"{PREFIX}:jobs:dead"
JOBS_INDEX = f"{PREFIX}:jobs:index"  # sorted set of job ids by submission time


def job_status(job_id: str) -> str:
    """Hash with the job's state, attempts, worker, progress, error and published versions."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Stream of the job's progress events, for live watching."""
    return f"{PREFIX}:job:{job_id}:events"


def job_lease(job_id: str) -> str:
    """String holding the lease token of the worker running the job; expires unless renewed."""
    return f"{PREFIX}:job:{job_id}:lease"


def job_checkpoint(job_id: str) -> str:
    """Hash with the job's last end-of-epoch checkpoint (state JSON and arrays as .npz bytes)."""
    return f"{PREFIX}:job:{job_id}:checkpoint"


def job_cancel(job_id: str) -> str:
    """Flag set when a job is cancelled, read by the worker at batch boundaries."""
    return f"{PREFIX}:job:{job_id}:cancel"


# --- models and snapshots --------------------------------------------------------------------
MODELS = f"{PREFIX}:models"  # set of model names
MODEL_EVENTS = f"{PREFIX}:model-events"  # stream: published versions and alias moves


def model_versions(name: str) -> str:
    """Sorted set of the model's published versions (score = version)."""
    return f"{PREFIX}:model:{name}:versions"


def model_next_version(name: str) -> str:
    return f"{PREFIX}:model:{name}:next"


def snapshot_weights(name: str, version: int) -> str:
    return f"{PREFIX}:model:{name}:v{version}:weights"


def snapshot_manifest(name: str, version: int) -> str:
    return f"{PREFIX}:model:{name}:v{version}:manifest"


def model_aliases(name: str) -> str:
    """Hash alias -> version."""
    return f"{PREFIX}:model:{name}:aliases"


def alias_history(name: str) -> str:
    """Stream of alias moves (alias, from, to, reason)."""
    return f"{PREFIX}:model:{name}:alias-history"


def model_publications(name: str) -> str:
    """Hash publication key (job id and epoch) -> version, so a re-run job never publishes twice."""
    return f"{PREFIX}:model:{name}:publications"
