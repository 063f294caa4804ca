"""The presets reach the accuracy the tutorials report, through ``mnistctl train`` on real MNIST."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.cli import main

REQUIRED = {"seed000": 0.970, "seed002": 0.975, "fast": 0.985}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(REQUIRED))
def test_preset_reaches_its_accuracy_on_the_mnist_test_set(preset, mnist_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "train",
            "--preset",
            preset,
            "--data",
            str(mnist_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] >= REQUIRED[preset], result.stderr
    assert summary["epochs"] > 0 and summary["train_seconds"] > 0
    assert "epoch 1/" in result.stderr  # progress was shown


def test_train_without_mnist_says_how_to_point_at_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["train", "--preset", "fast", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "MNIST_DIR" in err and "--download" in err


def test_train_a_few_hundred_images_and_save_a_loadable_snapshot(tmp_path, mnist_dir, capsys):
    from shared.snapshot import import_snapshot

    code = main(
        [
            "train",
            "--preset",
            "seed002",
            "--data",
            str(mnist_dir),
            "--epochs",
            "1",
            "--limit",
            "500",
            "--save",
            str(tmp_path / "snap"),
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    snapshot = import_snapshot(tmp_path / "snap")
    assert snapshot.manifest["metrics"]["test_accuracy"] == summary["test_accuracy"]
    assert snapshot.model.sizes == (784, 128, 64, 10)
