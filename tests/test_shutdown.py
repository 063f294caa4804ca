"""ShutdownRequest and stop_on_signals, with real signals in child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from shared.shutdown import ShutdownRequest

REPO = Path(__file__).resolve().parents[1]


def test_requests_are_counted_and_raise_the_flag_once_for_all():
    shutdown = ShutdownRequest()
    assert not shutdown.is_set() and shutdown.wait(0) is False
    assert shutdown.request() == 0
    assert shutdown.request() == 1
    assert shutdown.is_set() and shutdown.wait(0) is True and shutdown.wait() is True


def test_a_request_wakes_every_waiting_thread():
    shutdown = ShutdownRequest()
    woke: list[bool] = []
    waiting = threading.Barrier(4)

    def waiter() -> None:
        waiting.wait()
        woke.append(shutdown.wait(timeout=30))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for thread in threads:
        thread.start()
    waiting.wait()  # each is in, or about to enter, its wait: the pipe wakes it either way
    shutdown.set()
    for thread in threads:
        thread.join(30)
    assert woke == [True, True, True]


def run_child(body: str) -> subprocess.Popen:
    """A Python child whose main thread installs stop_on_signals and then runs ``body``."""
    script = (
        "import os, signal, sys\nfrom shared.shutdown import ShutdownRequest, stop_on_signals\n"
    )
    script += textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )


def test_the_first_signal_wakes_the_main_thread_and_a_second_exits_at_once():
    child = run_child(
        """
        shutdown = ShutdownRequest()
        stop_on_signals(shutdown, lambda name: print("announced", name, flush=True))
        print("waiting", flush=True)
        print("woke", shutdown.wait(), flush=True)
        signal.pause()  # only the second signal ends this
        """
    )
    assert child.stdout.readline() == "waiting\n"
    child.send_signal(signal.SIGTERM)
    assert child.stdout.readline() == "announced SIGTERM\n"
    assert child.stdout.readline() == "woke True\n"
    child.send_signal(signal.SIGINT)
    assert child.wait(30) == 128 + signal.SIGINT


def test_a_second_signal_inside_the_first_ones_handler_still_counts_as_second():
    # The second signal's handler runs nested in the first's (as when two signals arrive a few
    # microseconds apart): it must see the first request, though the first has not returned.
    child = run_child(
        """
        shutdown = ShutdownRequest()
        def announce(name):
            if name == "SIGINT":
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100_000):  # bytecodes, at which the nested handler runs
                    pass
        stop_on_signals(shutdown, announce)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):
            pass
        print("both signals handled as first ones", flush=True)
        """
    )
    assert child.wait(30) == 128 + signal.SIGTERM
    assert child.stdout.read() == ""
