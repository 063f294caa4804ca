"""Helpers for the trainer tests: tiny MNIST-format files, jobs, and waiting on Redis events."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

from shared import keys

TOY_JOB = {
    "model": "toy",
    "dataset": {"features": [[-2, -1], [25, 6], [17, 4], [-15, -6]], "labels": [1, 0, 0, 1]},
    "sizes": [2, 2, 1],
    "activations": ["sigmoid", "sigmoid"],
    "loss": "mse",
    "optimiser": "sgd",
    "lr": 0.1,
    "batch_size": 1,
    "epochs": 20,
}


def tiny_job(model: str = "tiny", **changes) -> dict:
    """A job on the tiny generated MNIST: a few milliseconds per epoch."""
    job = {
        "model": model,
        "sizes": [784, 16, 10],
        "activations": ["relu", "softmax"],
        "loss": "cross_entropy",
        "optimiser": "momentum",
        "lr": 0.05,
        "batch_size": 20,
        "epochs": 3,
        "seed": 7,
    }
    job.update(changes)
    return job


def write_tiny_mnist(directory: Path, train: int = 300, test: int = 100, seed: int = 0) -> Path:
    """Four gzipped IDX files of learnable 28x28 'digits': class k lights up row band k."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, 0x08)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08)
    return directory


def _write_idx(path: Path, array: np.ndarray, type_code: int) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(gzip.compress(header + array.tobytes()))


def dumps(job: dict) -> str:
    return json.dumps(job)


def wait_for_event(
    client: redis.Redis,
    job_id: str,
    predicate: Callable[[dict[str, str]], bool],
    *,
    timeout: float = 30.0,
    last_id: str = "0",
) -> tuple[str, dict[str, str]]:
    """Block on the job's event stream (XREAD) until an event satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    stream = keys.job_events(job_id)
    while time.monotonic() < deadline:
        block = min(max(int((deadline - time.monotonic()) * 1000), 1), 1000)  # < socket timeout
        reply = client.xread({stream: last_id}, block=block, count=100)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                event = {_s(k): _s(v) for k, v in fields.items()}
                if predicate(event):
                    return last_id, event
    raise TimeoutError(f"job {job_id}: no matching event within {timeout} s")


def wait_for_state(client: redis.Redis, job_id: str, *states: str, timeout: float = 30.0) -> str:
    """Block until the job's event stream announces one of ``states``; return it."""
    _, event = wait_for_event(
        client,
        job_id,
        lambda e: e.get("event") == "state" and e.get("state") in states,
        timeout=timeout,
    )
    return event["state"]


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` where Redis offers no event to await (a key's expiry, idle time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WorkerProcess:
    """``python -m trainer_service`` in a subprocess, its log lines collected by a thread."""

    def __init__(
        self, redis_url: str | None, name: str, data_dir: Path | None, *args: str,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        """``redis_url`` None: the worker finds it in ``env`` ($REDIS_URL)."""
        import os
        import subprocess
        import sys
        import threading

        command = [sys.executable, "-m", "trainer_service", "--worker-id", name,
                   "--progress-interval", "0.05", *args]  # fmt: skip
        if redis_url is not None:
            command += ["--redis-url", redis_url]
        if data_dir is not None:
            command += ["--data", str(data_dir)]
        self.name = name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            command,
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for_line(f"worker {name} ready")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<exit>")
            self._changed.notify_all()

    def wait_for_line(self, text: str, timeout: float = 30.0, start: int = 0) -> int:
        """Block until a log line containing ``text`` appears; return its index."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i in range(start, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                    if self.lines[i] == "<exit>":
                        raise AssertionError(f"{self.name} exited before {text!r}:\n{self.log}")
                start = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name}: no line with {text!r}:\n{self.log}")
                self._changed.wait(remaining)

    @property
    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        """Make sure the process is gone (SIGKILL) and reaped."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)
