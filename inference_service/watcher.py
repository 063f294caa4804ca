"""Following the registry: a blocking read of the model-events stream, plus a slow reconcile.

Events wake the watcher within a network round trip of publication, so a new version is loaded
while the publisher is still returning. The periodic reconcile rereads versions and aliases from
the registry in case an event was missed (stream trimmed, Redis restarted); it also runs at
start-up and after every reconnection, which is how the server catches up.
"""

from __future__ import annotations

import logging
import threading
import time

from inference_service import metrics
from inference_service.models import REDIS_ERRORS, ModelStore, ServedModel
from shared import defaults
from shared.registry import Registry, UnknownModel

log = logging.getLogger(__name__)

FIRST_BACKOFF_SECONDS = 0.05


class ModelWatcher:
    """A background thread keeping ``store`` on the versions its policies name."""

    def __init__(
        self,
        store: ModelStore,
        registry: Registry,
        *,
        reconcile_seconds: float = defaults.RECONCILE_SECONDS,
        block_seconds: float = defaults.EVENTS_BLOCK_SECONDS,
        backoff_max_seconds: float = defaults.RECONNECT_MAX_SECONDS,
    ) -> None:
        self.store = store
        self.registry = registry
        self.reconcile_seconds = reconcile_seconds
        self.block_seconds = block_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="model-watcher", daemon=True)

    def start(self) -> ModelWatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._thread.join(timeout if timeout is not None else self.block_seconds + 5)

    def run(self) -> None:
        last_id: str | None = None  # None: (re)connecting, so reconcile before reading events
        next_reconcile = 0.0
        backoff = FIRST_BACKOFF_SECONDS
        while not self._stop.is_set():
            try:
                if last_id is None or time.monotonic() >= next_reconcile:
                    # Take the stream position first: an event published during the
                    # reconcile is then read again below, never lost.
                    position = self.registry.last_event_id()
                    self.reconcile()
                    last_id = last_id or position
                    next_reconcile = time.monotonic() + self.reconcile_seconds
                    backoff = FIRST_BACKOFF_SECONDS
                wait = min(self.block_seconds, max(0.0, next_reconcile - time.monotonic()))
                events = self.registry.read_events(last_id, block_ms=max(1, int(wait * 1000)))
                if events:
                    last_id = events[-1][0]
                    self.apply(events)
            except REDIS_ERRORS as exc:
                metrics.REDIS_ERRORS.inc()
                log.warning(
                    "registry unreachable; serving what is loaded",
                    extra={"error": str(exc), "retry_in_seconds": round(backoff, 3)},
                )
                last_id = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_seconds)
            except Exception:  # a bug must not stop hot loading for good
                log.exception("model watcher failed; retrying")
                last_id = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_seconds)

    def reconcile(self) -> None:
        """Reread every served model's versions and aliases, then load what the policy names."""
        names = self.registry.models() if self.store.follow_all else list(self.store.models)
        for name in names:
            served = self.store.follow(name)
            if served is None:
                continue
            try:
                served.latest = self.registry.latest_version(name)
                served.aliases = self.registry.aliases(name)
            except UnknownModel:
                log.warning("served model is not in the registry", extra={"model": name})
                continue
            self.store.bring_up_to_date(served)

    def apply(self, events: list[tuple[str, dict]]) -> None:
        """Note what the events say, then load once per touched model (the newest wins)."""
        touched: dict[str, ServedModel] = {}
        for _, event in events:
            name = str(event.get("model", ""))
            served = self.store.follow(name) if name else None
            if served is None:
                continue
            version = int(event["version"])
            if event.get("event") == "published":
                served.latest = max(served.latest or 0, version)
            elif event.get("event") == "alias":
                served.aliases = {**served.aliases, str(event["alias"]): version}
            touched[served.name] = served
        for served in touched.values():
            self.store.bring_up_to_date(served)
