"""The model versions this server has loaded, and the one reference per model requests read.

A version is fetched and verified (``Registry.load`` -> ``decode_snapshot``), warmed up with one
forward pass, and only then made visible by ``swap_model``: a single reference assignment. A
request reads that reference once and keeps the ``LoadedVersion`` it got, so a swap never changes
the weights under a running request and every answer can name the version that produced it.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis

from inference_service import metrics
from inference_service.batching import Batcher
from inference_service.errors import data_loss, invalid_argument, not_found, unavailable
from inference_service.serving_network import Rows, ServingNetwork
from shared import defaults
from shared.mlp import MLP
from shared.registry import Registry, UnknownModel, UnknownVersion
from shared.snapshot import SnapshotError

log = logging.getLogger(__name__)

LATEST = "latest"
_VERSION_NUMBER = re.compile(r"[0-9]{1,18}")
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def version_number(text: str) -> int | None:
    """``text`` as a version number if it is one (ASCII digits only: "²".isdigit() is True)."""
    return int(text) if _VERSION_NUMBER.fullmatch(text) else None


@dataclass(frozen=True)
class BatchingConfig:
    max_rows: int = defaults.MAX_BATCH  # 1 turns batching off
    rows_alone: int = defaults.BATCH_ROWS_ALONE
    max_delay_seconds: float = defaults.MAX_QUEUE_DELAY_MS / 1000


@dataclass(frozen=True, eq=False)
class LoadedVersion:
    """One verified, warmed-up version; immutable, so requests may keep it while others swap."""

    name: str
    version: int
    model: MLP
    manifest: dict
    infer_pixels: Callable[[np.ndarray], Rows]  # uint8 pixels (n, 784) -> output rows, batched
    infer_scaled: Callable[[np.ndarray], Rows]  # rows scaled as the model expects -> output rows

    def infer(self, rows: np.ndarray) -> Rows:
        """Output rows for uint8 ``rows`` (raw pixels) or float rows (already scaled)."""
        return self.infer_pixels(rows) if rows.dtype == np.uint8 else self.infer_scaled(rows)


@dataclass
class ServedModel:
    """What the server knows of one model: its policy, the serving version and the others."""

    name: str
    policy: str  # "latest", an alias, or a version number
    current: LoadedVersion | None = None  # read without a lock: one reference, swapped whole
    standby: OrderedDict[int, LoadedVersion] = field(default_factory=OrderedDict)  # LRU
    rejected: dict[int, str] = field(default_factory=dict)  # version -> why
    loading: set[int] = field(default_factory=set)
    latest: int | None = None  # the newest published version seen
    aliases: dict[str, int] = field(default_factory=dict)
    load_lock: threading.Lock = field(default_factory=threading.Lock)

    def target(self) -> int | None:
        """The version the policy asks for, from what the registry last told us."""
        if self.policy == LATEST:
            return self.latest
        pinned = version_number(self.policy)
        return pinned if pinned is not None else self.aliases.get(self.policy)

    def loaded(self, version: int) -> LoadedVersion | None:
        current = self.current
        if current is not None and current.version == version:
            return current
        return self.standby.get(version)


class ModelStore:
    """Loaded versions of the served models; ``policies`` None means every model published."""

    def __init__(
        self,
        registry: Registry,
        policies: dict[str, str] | None = None,
        *,
        batching: BatchingConfig | None = None,
        standby_versions: int = defaults.STANDBY_VERSIONS,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        self.follow_all = policies is None
        self.models: dict[str, ServedModel] = {
            name: ServedModel(name, policy) for name, policy in (policies or {}).items()
        }
        self.batching = batching or BatchingConfig()
        self.standby_versions = standby_versions
        self.on_change = on_change or (lambda: None)
        self._lock = threading.Lock()  # guards swaps, standby and the per-model bookkeeping

    # --- what requests use -------------------------------------------------------------------

    def ready(self) -> bool:
        """Every model named by a policy serves a version; following all, at least one does.

        (Following all, a newly published model whose first version is corrupt must not take
        the server out of rotation.)
        """
        models = list(self.models.values())
        if self.follow_all:
            return any(m.current is not None for m in models)
        return bool(models) and all(m.current is not None for m in models)

    def served(self, name: str) -> ServedModel:
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise invalid_argument(
                f"model_name is required: this server serves {sorted(self.models) or 'nothing yet'}"
            )
        served = self.models.get(name)
        if served is None:
            raise not_found(f"model {name!r} is not served here; served: {sorted(self.models)}")
        return served

    def version_for_request(self, name: str, ref: str = "") -> LoadedVersion:
        """The loaded version a request asks for: the serving one, or a named version or alias."""
        served = self.served(name)
        if not ref or ref == served.policy:
            current = served.current
            if current is None:
                raise unavailable(f"model {served.name!r} has no version loaded yet")
            return current
        version = self._resolve(served, ref)
        loaded = served.loaded(version)
        if loaded is not None:
            if loaded is not served.current:
                with self._lock:
                    if version in served.standby:
                        served.standby.move_to_end(version)
            return loaded
        return self._load_on_demand(served, version)

    def _resolve(self, served: ServedModel, ref: str) -> int:
        if len(ref) > 128:
            raise invalid_argument(f"model_version is {len(ref)} characters long; at most 128")
        number = version_number(ref)
        if number is not None:
            return number
        if ref in served.aliases:
            return served.aliases[ref]
        try:
            return self.registry.resolve(served.name, ref)
        except (UnknownModel, UnknownVersion):
            raise not_found(f"model {served.name!r} has no version or alias {ref!r}") from None
        except ValueError as exc:  # not even a possible alias name
            raise invalid_argument(f"model_version {ref!r}: {exc}") from None
        except REDIS_ERRORS:
            raise unavailable(f"cannot resolve {ref!r}: the registry is unreachable") from None

    def _load_on_demand(self, served: ServedModel, version: int) -> LoadedVersion:
        with served.load_lock:  # one fetch per model at a time; the loser finds it loaded
            loaded = served.loaded(version)
            if loaded is not None:
                return loaded
            if version in served.rejected:
                raise data_loss(
                    f"version {version} of {served.name!r} was rejected: {served.rejected[version]}"
                )
            try:
                loaded = self.load_version(served, version)
            except UnknownVersion:
                raise not_found(f"model {served.name!r} has no version {version}") from None
            except UnknownModel:
                raise not_found(f"model {served.name!r} is not in the registry") from None
            except REDIS_ERRORS:
                raise unavailable(
                    f"cannot load version {version} of {served.name!r}: the registry is unreachable"
                ) from None
            except SnapshotError as exc:
                raise data_loss(
                    f"version {version} of {served.name!r} was rejected: {exc}"
                ) from None
            with self._lock:
                self._keep_standby(served, loaded)
            return loaded

    # --- what the watcher uses ---------------------------------------------------------------

    def follow(self, name: str) -> ServedModel | None:
        """The model ``name`` if this server serves it, adding it when following every model."""
        served = self.models.get(name)
        if served is None and self.follow_all:
            with self._lock:
                served = self.models.setdefault(name, ServedModel(name, LATEST))
        return served

    def load_version(self, served: ServedModel, version: int) -> LoadedVersion:
        """Fetch, verify and warm up one version; rejected versions are logged and counted."""
        start = time.perf_counter()
        served.loading.add(version)
        try:
            snapshot = self.registry.load(served.name, version)
            model = snapshot.model
            network = ServingNetwork(model)
            blank = np.zeros((1, model.sizes[0]), dtype=np.uint8)
            for warm in (network.forward_pixels(blank), network.forward_scaled(blank)):
                if len(warm[0]) != model.sizes[-1] or not all(map(math.isfinite, warm[0])):
                    raise SnapshotError(f"warm-up forward pass gave {warm}")
        except SnapshotError as exc:
            served.rejected[version] = str(exc)
            metrics.RELOAD_FAILURES.labels(served.name).inc()
            log.error(
                "rejected version",
                extra={"model": served.name, "version": version, "error": str(exc)},
            )
            raise
        finally:
            served.loading.discard(version)
        batchers = [
            Batcher(
                forward,
                max_rows=self.batching.max_rows,
                rows_alone=self.batching.rows_alone,
                max_delay_seconds=self.batching.max_delay_seconds,
                on_pass=metrics.BATCH_ROWS.observe,
            )
            for forward in (network.forward_pixels, network.forward_scaled)
        ]
        elapsed = time.perf_counter() - start
        metrics.LOAD_SECONDS.labels(served.name).observe(elapsed)
        log.info(
            "loaded version",
            extra={"model": served.name, "version": version, "seconds": round(elapsed, 4)},
        )
        return LoadedVersion(served.name, version, model, dict(snapshot.manifest), *batchers)

    def swap_model(self, served: ServedModel, loaded: LoadedVersion) -> None:
        """Make ``loaded`` the serving version in one assignment; the old one goes to standby."""
        with self._lock:
            previous = served.current
            served.standby.pop(loaded.version, None)
            served.current = loaded
            if previous is not None and previous.version != loaded.version:
                self._keep_standby(served, previous)
        metrics.MODEL_VERSION.labels(served.name).set(loaded.version)
        metrics.RELOADS.labels(served.name).inc()
        log.info(
            "serving version",
            extra={
                "model": served.name,
                "version": loaded.version,
                "previous": previous.version if previous else None,
            },
        )
        self.on_change()

    def _keep_standby(self, served: ServedModel, loaded: LoadedVersion) -> None:
        served.standby[loaded.version] = loaded
        served.standby.move_to_end(loaded.version)
        while len(served.standby) > self.standby_versions:
            served.standby.popitem(last=False)

    def bring_up_to_date(self, served: ServedModel) -> None:
        """Load and swap in the version the policy asks for, unless it is served or rejected.

        If the newest version is rejected while nothing serves yet (a corrupt latest at
        start-up), an older version is served rather than nothing.
        """
        target = served.target()
        current = served.current
        if target is None or (current is not None and current.version == target):
            return
        candidates = [target]
        if current is None and served.policy == LATEST:
            candidates += sorted(
                (v for v in self.registry.versions(served.name) if v < target), reverse=True
            )
        for version in candidates:
            if version in served.rejected:
                continue
            loaded = served.loaded(version)
            try:
                loaded = loaded or self.load_version(served, version)
            except SnapshotError:
                continue
            except UnknownVersion:
                log.warning(
                    "policy names a missing version",
                    extra={"model": served.name, "version": version, "policy": served.policy},
                )
                continue
            self.swap_model(served, loaded)
            return

    # --- what ListModels reports -------------------------------------------------------------

    def snapshot_of_state(self) -> list[ServedModel]:
        with self._lock:
            return [
                ServedModel(
                    m.name,
                    m.policy,
                    m.current,
                    OrderedDict(m.standby),
                    dict(m.rejected),
                    set(m.loading),
                    m.latest,
                    dict(m.aliases),
                )
                for m in sorted(self.models.values(), key=lambda m: m.name)
            ]
