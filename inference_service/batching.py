"""Dynamic batching: the rows of concurrent requests go through one forward pass together.

No thread of its own and no timer. The first request to arrive while nothing runs becomes the
leader and runs at once with whatever is already queued (so a lone request never waits); requests
arriving while a pass runs queue up; when the pass ends the leader hands the queue to the oldest
waiter, which runs the next pass with everything that gathered meanwhile. Batches therefore grow
exactly as much as load makes them. Calls of ``rows_alone`` rows or more skip the queue: they
gain nothing from company. With ``max_delay_seconds > 0`` a leader may also wait that long for a
fuller batch (which only pays when the forward pass is expensive compared with gRPC).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

# Rows in, one result per row out: an array or a list, anything that slices by row.
Forward = Callable[[np.ndarray], Any]


class _Pending:
    __slots__ = ("error", "lead", "ready", "result", "rows")

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        self.result: Any = None
        self.error: BaseException | None = None
        self.lead = False  # set instead of a result when this waiter must run the next pass
        self.ready = threading.Event()


class Batcher:
    """Calls ``forward`` on the concatenated rows of concurrent callers; each gets its own rows."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_rows: int,
        rows_alone: int | None = None,
        max_delay_seconds: float = 0.0,
        on_pass: Callable[[int], None] | None = None,
    ) -> None:
        self.forward = forward
        self.max_rows = max_rows
        # Calls this large already amortise the per-pass overhead: queueing them would only
        # serialise passes that could run side by side (BLAS releases the GIL).
        self.rows_alone = min(max_rows, rows_alone or max_rows)
        self.max_delay_seconds = max_delay_seconds
        self.on_pass = on_pass or (lambda rows: None)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._busy = False

    @property
    def enabled(self) -> bool:
        return self.max_rows > 1

    def __call__(self, rows: np.ndarray) -> Any:
        """``forward(rows)``, possibly computed together with other callers' rows."""
        if not self.enabled or len(rows) >= self.rows_alone:
            self.on_pass(len(rows))
            return self.forward(rows)
        item = _Pending(rows)
        with self._lock:
            self._queue.append(item)
            self._queued_rows += len(rows)
            leader = not self._busy
            self._busy = True
            if self.max_delay_seconds > 0:
                self._arrived.notify()
        if not leader:
            item.ready.wait()
            if not item.lead:
                if item.error is not None:
                    raise item.error
                assert item.result is not None
                return item.result
        self._run_pass()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _run_pass(self) -> None:
        """Run one pass over the head of the queue (which holds the caller), then hand over."""
        with self._lock:
            if self.max_delay_seconds > 0 and self._queued_rows < self.max_rows:
                deadline = time.monotonic() + self.max_delay_seconds
                while self._queued_rows < self.max_rows:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._arrived.wait(left):
                        break
            batch = [self._queue.popleft()]
            rows = len(batch[0].rows)
            while self._queue and rows + len(self._queue[0].rows) <= self.max_rows:
                batch.append(self._queue.popleft())
                rows += len(batch[-1].rows)
            self._queued_rows -= rows
        try:
            if len(batch) == 1:
                batch[0].result = self.forward(batch[0].rows)
            else:
                out = self.forward(np.concatenate([item.rows for item in batch]))
                start = 0
                for item in batch:
                    item.result = out[start : start + len(item.rows)]
                    start += len(item.rows)
            self.on_pass(rows)
        except BaseException as exc:  # every caller of the pass sees the failure
            for item in batch:
                item.error = exc
        finally:  # hand over even on failure, or every later caller would wait forever
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._busy = False
                else:
                    successor.lead = True
            for item in batch[1:]:
                item.ready.set()
            if successor is not None:
                successor.ready.set()
