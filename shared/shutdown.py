"""How both services stop: the first SIGTERM or SIGINT asks for a graceful stop, a second one
leaves at once."""

from __future__ import annotations

import itertools
import os
import select
import signal
import weakref
from collections.abc import Callable


class ShutdownRequest:
    """A one-way flag, like ``threading.Event``, that a Python signal handler may raise.

    A handler runs in the main thread between two bytecodes, so it can interrupt that thread
    while it holds the lock of an ``Event.wait`` (``Event.set`` would then wait on it forever), and
    a second signal can run its handler nested inside the first one's. Here the count of requests
    moves in one C call, which no handler can split, and waiters wake through a pipe, not a lock.
    """

    def __init__(self) -> None:
        self._count = itertools.count()
        self._raised = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        weakref.finalize(self, _close, self._wake_read, self._wake_write)

    def request(self) -> int:
        """Raise the flag; returns how many requests came before this one."""
        earlier = next(self._count)
        self._raised = True
        if earlier == 0:
            os.write(self._wake_write, b"!")  # never read: the pipe stays readable for every wait
        return earlier

    set = request  # so it reads like the Event it stands in for

    def is_set(self) -> bool:
        return self._raised

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is raised or ``timeout`` seconds pass; whether it is raised."""
        if not self._raised:
            select.select([self._wake_read], [], [], timeout)
        return self._raised


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def stop_on_signals(shutdown: ShutdownRequest, announce: Callable[[str], None]) -> None:
    """SIGTERM or SIGINT raises ``shutdown`` (``announce`` gets the signal's name); a second
    signal exits at once with 128 + its number, as a shell reports a process killed by it."""

    def on_signal(signum: int, frame: object) -> None:
        if shutdown.request() > 0:
            os._exit(128 + signum)
        announce(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
