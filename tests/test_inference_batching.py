"""Dynamic batching: concurrent callers share passes, each gets its own rows, errors reach all."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from inference_service.batching import Batcher


def test_a_lone_call_runs_at_once_in_the_callers_thread():
    threads, sizes = [], []

    def forward(rows):
        threads.append(threading.get_ident())
        return rows * 2

    batcher = Batcher(forward, max_rows=64, on_pass=sizes.append)
    out = batcher(np.ones((3, 2)))
    assert out.tolist() == [[2, 2]] * 3
    assert threads == [threading.get_ident()] and sizes == [3]


def test_concurrent_calls_are_batched_and_each_gets_its_own_rows():
    gate, started = threading.Event(), threading.Event()
    passes = []

    def forward(rows):
        passes.append(len(rows))
        started.set()
        if len(passes) == 1:
            gate.wait(5)  # hold the first pass so that the others queue up behind it
        return rows + 1

    batcher = Batcher(forward, max_rows=8)
    with ThreadPoolExecutor(12) as pool:
        first = pool.submit(batcher, np.full((1, 1), 0.0))
        assert started.wait(5)
        rest = [pool.submit(batcher, np.full((1, 1), float(i))) for i in range(1, 12)]
        while batcher._queued_rows < 11:  # all eleven queued behind the held pass (no event)
            threading.Event().wait(0.001)
        gate.set()
        results = [f.result(5) for f in [first, *rest]]
    assert [r.tolist() for r in results] == [[[i + 1.0]] for i in range(12)]
    assert passes == [1, 8, 3]  # the queue drains in passes of at most max_rows


def test_a_failed_pass_raises_in_every_caller_and_batching_goes_on():
    calls = []

    def forward(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise FloatingPointError("boom")
        return rows

    batcher = Batcher(forward, max_rows=4)
    with pytest.raises(FloatingPointError):
        batcher(np.zeros((1, 1)))
    assert batcher(np.zeros((2, 1))).shape == (2, 1)


def test_batching_off_and_large_calls_bypass_the_queue():
    sizes = []
    off = Batcher(lambda rows: rows, max_rows=1, on_pass=sizes.append)
    assert not off.enabled
    off(np.zeros((5, 1)))
    on = Batcher(lambda rows: rows, max_rows=64, rows_alone=8, on_pass=sizes.append)
    on(np.zeros((9, 1)))
    assert sizes == [5, 9]
    assert not on._busy  # never queued


def test_large_calls_run_beside_a_running_pass_instead_of_behind_it():
    gate, started = threading.Event(), threading.Event()

    def forward(rows):
        if len(rows) == 1:
            started.set()
            gate.wait(5)
        return rows

    batcher = Batcher(forward, max_rows=64, rows_alone=8)
    with ThreadPoolExecutor(2) as pool:
        small = pool.submit(batcher, np.zeros((1, 1)))
        assert started.wait(5)
        assert batcher(np.zeros((8, 1))).shape == (8, 1)  # not stuck behind the held pass
        gate.set()
        assert small.result(5).shape == (1, 1)


def test_many_threads_hammering_never_lose_or_mix_rows():
    batcher = Batcher(lambda rows: rows * 3, max_rows=16)

    def call(i):
        rows = np.full((1 + i % 3, 2), float(i))
        return np.array_equal(batcher(rows), rows * 3)

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(call, range(2000)))
    assert not batcher._busy and not batcher._queue


def test_a_failing_pass_hook_still_hands_the_queue_over():
    def on_pass(rows):
        raise RuntimeError("metrics down")

    batcher = Batcher(lambda rows: rows, max_rows=4, on_pass=on_pass)
    with pytest.raises(RuntimeError):
        batcher(np.zeros((1, 1)))
    assert not batcher._busy  # the next caller leads instead of waiting forever
