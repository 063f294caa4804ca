"""``mnistctl up``: the local stack trains, serves and classifies; Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from shared.redis_server import free_port


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def up_command(mnist_dir, *extra: str) -> tuple[list[str], int, int]:
    grpc_port, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "shared.cli", "up", "--data", str(mnist_dir), "--epochs", "1",
        "--limit", "3000", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        *extra,
    ]  # fmt: skip
    return command, grpc_port, metrics_port


def ports_in(output: str) -> list[int]:
    redis_port = re.search(r"redis\s+redis://127\.0\.0\.1:(\d+)", output)
    assert redis_port, output
    return [int(redis_port.group(1))]


@pytest.mark.slow
def test_up_once_trains_serves_and_classifies_then_stops_everything(mnist_dir):
    command, grpc_port, metrics_port = up_command(mnist_dir, "--once")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "first snapshot served" in result.stdout
    assert re.search(r"digits v\d+: \d+% of 10 right", result.stdout), result.stdout
    assert "succeeded" in result.stdout
    for port in [grpc_port, metrics_port, *ports_in(result.stdout)]:
        assert not listening(port), f"port {port} still open after mnistctl up exited"


@pytest.mark.slow
def test_ctrl_c_stops_every_process_it_started(mnist_dir):
    command, grpc_port, metrics_port = up_command(mnist_dir)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)  # fmt: skip
    seen = []
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the event: up says it is serving
            seen.append(line)
            if line.startswith("serving on"):
                break
        else:
            pytest.fail("mnistctl up ended before serving:\n" + "".join(seen))
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    assert "stopping" in output
    for port in [grpc_port, metrics_port, *ports_in(output)]:
        assert not listening(port), f"port {port} still open after Ctrl-C"


def test_up_without_mnist_says_how_to_point_at_it(tmp_path, monkeypatch, capsys):
    from shared.cli import main

    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["up", "--data", str(tmp_path / "nowhere"), "--once"]) == 2
    err = capsys.readouterr().err
    assert "MNIST_DIR" in err and "--download" in err
