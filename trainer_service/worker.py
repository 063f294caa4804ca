"""Runs training jobs: claim one, validate it, train it with checkpoints, publish, settle it.

One job at a time per process. The training loop runs in the main thread; a lease keeper and a
progress reporter run beside it. Training never waits on Redis: checkpoints and publications that
cannot be written are kept and written at the next epoch or at the end, once Redis is back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import redis

from shared import defaults, keys
from shared.dataset import Dataset
from shared.jobspec import JobSpec, JobSpecError, parse_job_json
from shared.mlp import MLP
from shared.mnist import load_mnist
from shared.registry import PublishFenced, Registry
from shared.shutdown import ShutdownRequest
from shared.snapshot import snapshot_manifest
from shared.training import (
    BatchProgress,
    EpochReport,
    Evaluation,
    TrainingCallbacks,
    evaluate,
    fit,
)
from trainer_service.checkpoint import (
    CheckpointError,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from trainer_service.progress import ProgressReporter
from trainer_service.queue import Delivery, JobQueue, LeaseKeeper, LeaseLost

log = logging.getLogger("trainer_service.worker")
T = TypeVar("T")


def build_model(spec: JobSpec, warm_start: MLP | None = None) -> MLP:
    """The job's initial network: seeded from ``spec.training.seed``, or a warm start's weights."""
    model = spec.initial_model()
    if warm_start is not None:
        if (warm_start.sizes, warm_start.activations, warm_start.loss) != (
            model.sizes,
            model.activations,
            model.loss,
        ):
            raise JobSpecError(
                "warm_start",
                f"snapshot is {list(warm_start.sizes)} {list(warm_start.activations)} "
                f"{warm_start.loss}; the job wants {list(model.sizes)} "
                f"{list(model.activations)} {model.loss}",
            )
        for p, saved in zip(model.parameters(), warm_start.parameters(), strict=True):
            p[...] = saved
    return model


def publication_id(job_id: str, epoch: int) -> str:
    """The registry's dedupe key: a re-run epoch never publishes a second version."""
    return f"{job_id}:epoch{epoch}"


class Worker:
    """Claims jobs from the queue and runs them until asked to shut down."""

    def __init__(
        self,
        client: redis.Redis,
        worker_id: str,
        *,
        data_dir: str | Path | None = None,
        download: bool = False,
        lease_seconds: float = defaults.LEASE_SECONDS,
        max_deliveries: int = defaults.MAX_DELIVERIES,
        retention_seconds: float = defaults.JOB_RETENTION_SECONDS,
        progress_interval: float = defaults.PROGRESS_INTERVAL_SECONDS,
        claim_block_seconds: float = defaults.CLAIM_BLOCK_SECONDS,
    ) -> None:
        self.client = client
        self.worker_id = worker_id
        self.data_dir = data_dir
        self.download = download  # fetch missing MNIST files (hash-checked) into the cache
        self.queue = JobQueue(
            client,
            worker_id,
            lease_seconds=lease_seconds,
            max_deliveries=max_deliveries,
            retention_seconds=retention_seconds,
        )
        self.registry = Registry(client)
        self.progress_interval = progress_interval
        self.claim_block_seconds = claim_block_seconds
        self.shutdown = ShutdownRequest()  # raised by the first SIGTERM/SIGINT
        self._mnist: tuple[Dataset, Dataset] | None = None

    # --- the loop ---

    def run(self, *, max_jobs: int | None = None, exit_when_idle: bool = False) -> None:
        """Claim and run jobs until ``shutdown`` is set, ``max_jobs`` have run, or (when
        ``exit_when_idle``) no job arrives within the claim block time."""
        idle = self.shutdown.is_set  # while no job is held, a shutdown request ends any retrying
        self.retry(self.queue.ensure_group, "create the consumer group", give_up=idle)
        log.info("worker %s ready", self.worker_id)
        done = 0
        while not self.shutdown.is_set() and (max_jobs is None or done < max_jobs):
            delivery = self.retry(
                lambda: self.queue.claim(self.claim_block_seconds), "claim a job", give_up=idle
            )
            if delivery is not None:
                try:
                    self.run_job(delivery)
                except Exception:  # e.g. Redis refusing a write: the lease expires, others retry
                    log.exception("job %s: left to be reclaimed after its lease", delivery.job_id)
                done += 1
            elif exit_when_idle:
                break
        self._leave_group()
        log.info("worker %s stopped", self.worker_id)

    def _leave_group(self) -> None:
        """Remove this worker's consumer from the group if it holds no entries (tidy XINFO)."""
        try:
            pending = self.client.xpending_range(
                keys.JOBS_STREAM, keys.JOBS_GROUP, "-", "+", 1, consumername=self.worker_id
            )
            if not pending:
                self.client.xgroup_delconsumer(keys.JOBS_STREAM, keys.JOBS_GROUP, self.worker_id)
        except redis.RedisError:
            pass  # only housekeeping: a left-over consumer name costs nothing

    def retry(
        self, action: Callable[[], T], what: str, *, give_up: Callable[[], bool] | None = None
    ) -> T | None:
        """``action()``, retried with exponential backoff (capped at RECONNECT_MAX_SECONDS) while
        Redis is unreachable; None if ``give_up()`` turns true meanwhile."""
        delay = 0.1
        while True:
            try:
                return action()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                log.warning(
                    "redis unavailable, cannot %s (%s); retrying in %.1f s", what, exc, delay
                )
                if give_up is None:
                    time.sleep(delay)
                elif self.shutdown.wait(delay) and give_up():  # wakes at once on a signal
                    return None
                delay = min(delay * 2, defaults.RECONNECT_MAX_SECONDS)

    # --- one job ---

    def run_job(self, delivery: Delivery) -> str:
        """Run one claimed job to a final state, a hand-back, or the loss of its lease."""
        log.info("job %s: claimed (delivery %d)", delivery.job_id, delivery.attempt)
        try:
            spec = parse_job_json(delivery.job_json)
        except JobSpecError as exc:
            log.warning("job %s: refused: %s", delivery.job_id, exc)
            return self._settle(delivery, "failed", error=str(exc))
        run = JobRun(self, delivery, spec)
        try:
            with (
                LeaseKeeper(self.queue, delivery, on_lost=run.stop.set) as keeper,
                ProgressReporter(
                    self.client,
                    delivery.job_id,
                    token=delivery.token,
                    epochs=spec.training.epochs,
                    interval=self.progress_interval,
                    on_cancel=run.stop.set,
                ) as reporter,
            ):
                run.reporter = reporter
                run.train()
                if keeper.lost:
                    raise LeaseLost(delivery.job_id)
                cancelled = reporter.cancelled
        except LeaseLost:
            log.warning(
                "job %s: lease lost; another worker has it, writing nothing", delivery.job_id
            )
            return "lost"
        except JobSpecError as exc:
            return self._settle(delivery, "failed", error=str(exc))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("job %s: delivery %d failed", delivery.job_id, delivery.attempt)
            if delivery.attempt >= self.queue.max_deliveries:
                return self._settle(delivery, "dead-lettered", error=error)
            return self._settle(delivery, "retrying", error=error)
        if run.completed:
            return self._settle(delivery, *run.outcome())
        if cancelled:
            return self._settle(delivery, "cancelled")
        return self._settle(delivery, "queued")  # shutdown: hand it back

    def _settle(
        self, delivery: Delivery, state: str, error: str = "", fields: dict | None = None
    ) -> str:
        """Write the job's new state (retrying while Redis is down); 'lost' if fenced out."""
        if state in ("queued", "retrying"):
            failed = state == "retrying"
            written = self.retry(
                lambda: self.queue.hand_back(delivery, failed=failed, error=error), "hand back"
            )
        else:
            written = self.retry(
                lambda: self.queue.finish(delivery, state, error=error, fields=fields), "finish"
            )
        if not written:
            log.warning("job %s: lease lost before it could be marked %s", delivery.job_id, state)
            return "lost"
        log.info(
            "job %s: %s%s",
            delivery.job_id,
            "handed back" if state == "queued" else state,
            f": {error}" if error else "",
        )
        return state

    def datasets(self, spec: JobSpec) -> tuple[Dataset, Dataset]:
        """(train, test) for the job; MNIST is read once per process."""
        if spec.inline is not None:
            data = spec.inline.take(spec.limit) if spec.limit else spec.inline
            return data, spec.inline  # a toy has no separate test set: it is scored on itself
        if self._mnist is None:
            self._mnist = load_mnist(self.data_dir, download=self.download)
        train, test = self._mnist
        return (train.take(spec.limit) if spec.limit else train), test


class JobRun(TrainingCallbacks):
    """One delivery of one job: the training callbacks and the writes they cause."""

    def __init__(self, worker: Worker, delivery: Delivery, spec: JobSpec) -> None:
        self.worker = worker
        self.delivery = delivery
        self.spec = spec
        self.fence = (keys.job_lease(delivery.job_id), delivery.token)
        self.fingerprint = spec.fingerprint()
        self.stop = threading.Event()  # cancel or lease lost
        self.reporter: ProgressReporter | None = None
        self.model: MLP | None = None
        self.parent: dict | None = None
        self.completed = False
        self.final: Evaluation | None = None
        self.train_summary: dict = {}
        self._pending_checkpoint: tuple[int, tuple[str, bytes]] | None = None
        self._pending_publications: list[tuple[int, MLP, dict]] = []
        self._publish_skipped = ""
        self._write_delay = 0.0  # backoff of writes attempted between epochs while Redis is down
        self._next_write = 0.0
        self._published_epochs: set[int] = set()
        self._versions: list[int] = []

    # --- training ---

    def train(self) -> None:
        """Warm-start or resume, fit, and publish; leaves the outcome in ``completed``."""
        spec, job_id = self.spec, self.delivery.job_id
        train, test = self.worker.datasets(spec)
        self.model = build_model(spec, self._warm_start())
        resume = None
        try:
            resume = self.worker.retry(
                lambda: load_checkpoint(self.worker.client, job_id, self.fingerprint),
                "read the checkpoint",
            )
        except CheckpointError as exc:
            log.warning("job %s: ignoring checkpoint: %s", job_id, exc)
        if resume is not None:
            log.info("job %s: resuming after epoch %d", job_id, resume.epoch)
        # Versions earlier deliveries published, so the status lists all of them as they come.
        self._versions = self.worker.retry(self.published_versions, "list published versions") or []
        result = fit(self.model, train, spec.training, test=test, resume=resume, callbacks=self)
        if result.stopped:
            self._write_pending(block=True)  # keep the last checkpoint for whoever resumes
            return
        self.final = evaluate(
            self.model,
            test,
            target_low=spec.training.target_low,
            target_high=spec.training.target_high,
        )
        if result.history:
            self.train_summary = result.history[-1]
        last = spec.training.epochs
        if spec.publish.at_end and last not in self._published_epochs:
            self._queue_publication(spec.training.epochs, self.final, self.train_summary)
        self._write_pending(block=True)
        self.completed = not self.stop.is_set()

    def _warm_start(self) -> MLP | None:
        """The warm-start snapshot's model, resolved once per job so retries start alike."""
        warm = self.spec.warm_start
        if warm is None:
            return None
        status_key = keys.job_status(self.delivery.job_id)
        registry = self.worker.registry
        try:
            version = registry.resolve(warm.model, warm.version)
        except LookupError as exc:
            raise JobSpecError("warm_start", str(exc)) from None
        self.worker.client.hsetnx(status_key, "warm_start_version", version)
        version = int(self.worker.client.hget(status_key, "warm_start_version") or version)
        self.parent = {"model_name": warm.model, "version": version}
        return registry.load(warm.model, version).model

    # --- callbacks from fit() ---

    def on_batch(self, progress: BatchProgress) -> None:
        assert self.reporter is not None
        self.reporter.batch(progress)

    def should_stop(self) -> bool:
        return self.stop.is_set() or self.worker.shutdown.is_set()

    def on_epoch(self, report: EpochReport) -> None:
        assert self.reporter is not None
        summary = report.summary()
        self.reporter.record("epoch", **summary)
        encoded = encode_checkpoint(report.state, self.fingerprint)
        self._pending_checkpoint = (report.epoch, encoded)
        if self.spec.publish.every_epoch and report.test is not None:
            self._queue_publication(report.epoch, report.test, summary)
        self._write_pending(block=False)

    # --- publishing and checkpoints ---

    def _queue_publication(self, epoch: int, test: Evaluation, summary: dict) -> None:
        minimum = self.spec.publish.min_accuracy
        if minimum is not None and test.accuracy < minimum:
            self._publish_skipped = (
                f"test accuracy {test.accuracy:.4f} below min_accuracy {minimum} at epoch {epoch}"
            )
            log.info("job %s: not publishing: %s", self.delivery.job_id, self._publish_skipped)
            return
        assert self.model is not None
        metrics = {
            "test_accuracy": test.accuracy,
            "test_loss": test.loss,
            "test_examples": test.count,
            "epoch": epoch,
        }
        for name in ("train_loss", "train_accuracy"):
            if name in summary:
                metrics[name] = summary[name]
        manifest = snapshot_manifest(
            self.model,
            model_name=self.spec.model,
            metrics=metrics,
            job_id=self.delivery.job_id,
            parent=self.parent,
            training=self.spec.training.as_dict(),
        )
        self._pending_publications.append((epoch, self.model.copy(), manifest))

    def _write_pending(self, *, block: bool) -> None:
        """Write pending publications, then the pending checkpoint; keep them if Redis is down.

        Publications go first: a checkpoint of epoch n written before epoch n was published
        would let a worker resuming from it skip that publication.
        """
        if not block and time.monotonic() < self._next_write:
            return  # Redis was unreachable a moment ago: don't stall training on it every epoch
        try:
            if block:
                self.worker.retry(self._write_once, "write checkpoint and publish")
            else:
                self._write_once()
            self._write_delay = 0.0
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._write_delay = min(max(self._write_delay * 2, 0.5), defaults.RECONNECT_MAX_SECONDS)
            self._next_write = time.monotonic() + self._write_delay
            log.warning(
                "job %s: redis unavailable (%s); checkpoint and publications kept",
                self.delivery.job_id,
                exc,
            )

    def _write_once(self) -> None:
        queue, delivery = self.worker.queue, self.delivery
        if self._pending_checkpoint is None and not self._pending_publications:
            return
        if not queue.renew(delivery):  # also takes the lease again after a long Redis outage
            self.stop.set()
            raise LeaseLost(delivery.job_id)
        while self._pending_publications:
            epoch, model, manifest = self._pending_publications[0]
            try:
                version = self.worker.registry.publish_snapshot(
                    model,
                    manifest,
                    publication=publication_id(delivery.job_id, epoch),
                    fence=self.fence,
                )
            except PublishFenced:
                self.stop.set()
                raise LeaseLost(delivery.job_id) from None
            self._pending_publications.pop(0)
            log.info(
                "job %s: published %s v%d (epoch %d)",
                delivery.job_id,
                self.spec.model,
                version,
                epoch,
            )
            assert self.reporter is not None
            self._published_epochs.add(epoch)
            self._versions = sorted({*self._versions, version})
            self.reporter.record(
                "published",
                status={"latest_version": version, "published": json.dumps(self._versions)},
                model=self.spec.model,
                version=version,
                epoch=epoch,
            )
        if self._pending_checkpoint is not None:
            epoch, encoded = self._pending_checkpoint
            if not save_checkpoint(queue.client, delivery.job_id, encoded, token=delivery.token):
                self.stop.set()
                raise LeaseLost(delivery.job_id)
            self._pending_checkpoint = None

    # --- the result ---

    def published_versions(self) -> list[int]:
        """Every version this job published, over all its deliveries (from the registry)."""
        pattern = f"{self.delivery.job_id}:epoch*"
        found = self.worker.client.hscan_iter(
            keys.model_publications(self.spec.model), match=pattern
        )
        return sorted(int(v) for _, v in found)

    def outcome(self) -> tuple[str, str, dict]:
        """(state, error, status fields) of a completed job."""
        versions = self.worker.retry(self.published_versions, "list published versions")
        fields: dict = {"published": json.dumps(versions)}
        if self.final is not None:
            fields.update(
                test_accuracy=f"{self.final.accuracy:.6g}", test_loss=f"{self.final.loss:.6g}"
            )
        fields.update(epoch=self.spec.training.epochs, eta_seconds=0)
        if self.train_summary:
            fields.update(
                loss=f"{self.train_summary['train_loss']:.6g}",
                accuracy=f"{self.train_summary['train_accuracy']:.6g}",
            )
        if versions:
            return "succeeded", "", fields
        return "failed", f"nothing published: {self._publish_skipped}", fields


def default_worker_id() -> str:
    """host-pid: unique among live workers, readable in ``mnistctl jobs show``."""
    return f"{os.uname().nodename}-{os.getpid()}"


def parameters_equal(a: MLP, b: MLP) -> bool:
    """True when two networks' parameters are bitwise equal (what resumption promises)."""
    return all(np.array_equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
