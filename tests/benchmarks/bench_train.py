"""Training speed: our NumPy MLP against PyTorch on this CPU, and against the FLOP bound.

Trains 784-128-64-10 (ReLU, softmax cross-entropy, plain SGD, float32) on MNIST for one epoch at
batch sizes 64, 128 and 256, and in the same run does the same with PyTorch when a Python with
torch is available (this one, or $TORCH_PYTHON, or /opt/torchvenv/bin/python), then prints seconds
per epoch and ratios (against PyTorch with its default threads and with one thread, as our
trainer runs). Also: the FLOP bound (6 x samples x parameters / measured sgemm peak), one
epoch of the per-sample `seed000` preset, and peak memory of a whole `mnistctl train` run.

    python tests/benchmarks/bench_train.py [--data DIR] [--repeats 3] [--json]

With --json the last line of standard output is one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shared.dataset import Dataset  # noqa: E402
from shared.mlp import MLP  # noqa: E402
from shared.mnist import load_mnist  # noqa: E402
from shared.presets import PRESETS  # noqa: E402
from shared.training import TrainConfig, fit, training_rngs  # noqa: E402

SIZES = (784, 128, 64, 10)
BATCH_SIZES = (64, 128, 256)
TRAINER_THREADS = 1  # what the trainer service and mnistctl use
LR = 0.05


def default_data_dir() -> str | None:
    beside = REPO.parent / "shared" / "mnist"
    return os.environ.get("MNIST_DIR") or (str(beside) if beside.exists() else None)


def sgemm_peak_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """Best float32 matrix-multiply rate over about ``seconds``, with this process's threads."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def ours_epoch_seconds(train: Dataset, batch_size: int, repeats: int) -> float:
    """Fastest of ``repeats`` one-epoch runs of our network (each from fresh weights)."""
    best = float("inf")
    config = TrainConfig(epochs=1, batch_size=batch_size, optimiser="sgd", lr=LR)
    for _ in range(repeats):
        model = MLP.create(
            SIZES, ("relu", "relu", "softmax"), "cross_entropy", rng=training_rngs(0)[0]
        )
        best = min(best, fit(model, train, config).train_seconds)
    return best


def ours_with_threads(threads: int, data_dir: str, repeats: int) -> dict[str, float]:
    """Our epoch times in a child whose OpenBLAS uses ``threads`` threads (fixed at its start)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, __file__, "--ours-worker", "--data", data_dir, "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return {f"{name}_t{threads}": value for name, value in times.items()}


def torch_epoch_seconds(data_dir: str, repeats: int) -> dict[str, float]:
    """Run this script's torch worker under a Python that has torch; {} when there is none."""
    candidates = [sys.executable, os.environ.get("TORCH_PYTHON"), "/opt/torchvenv/bin/python"]
    for python in filter(None, candidates):
        if not shutil.which(python) and not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
        if probe.returncode != 0:
            continue
        out = subprocess.run(
            [python, __file__, "--torch-worker", "--data", data_dir, "--repeats", str(repeats)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    return {}


def torch_worker(data_dir: str, repeats: int) -> None:
    """Time the same network, loss, optimiser and batches in PyTorch (this process has torch).

    First with PyTorch's default threads (``torch_b*``), then with one thread like our trainer
    (``torch_t1_b*``), so both comparisons come from the same run.
    """
    import torch

    train, _ = load_mnist(data_dir)
    X = torch.from_numpy(train.features.astype(np.float32) / 255.0)
    y = torch.from_numpy(train.labels.astype(np.int64))
    results = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
    for prefix, threads in (("torch", torch.get_num_threads()), ("torch_t1", 1)):
        torch.set_num_threads(threads)
        results.update(torch_epochs(torch, X, y, repeats, prefix))
    print(json.dumps(results))


def torch_epochs(torch, X, y, repeats: int, prefix: str) -> dict[str, float]:
    results = {}
    for bs in BATCH_SIZES:
        best = float("inf")
        for _ in range(repeats):
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(784, 128),
                torch.nn.ReLU(),
                torch.nn.Linear(128, 64),
                torch.nn.ReLU(),
                torch.nn.Linear(64, 10),
            )
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            loss_fn = torch.nn.CrossEntropyLoss()
            start = time.perf_counter()
            order = torch.randperm(X.shape[0])
            for i in range(0, X.shape[0], bs):
                idx = order[i : i + bs]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(X[idx]), y[idx])
                loss.backward()
                opt.step()
            best = min(best, time.perf_counter() - start)
        results[f"{prefix}_b{bs}"] = best
    return results


def seed000_epoch_seconds(train: Dataset) -> float:
    preset = PRESETS["seed000"]
    model = MLP.create(
        preset.sizes,
        preset.activations,
        preset.loss,
        rng=training_rngs(0)[0],
        init=preset.init,
        input_scaling=preset.input_scaling,
    )
    config = TrainConfig(**{**preset.config.as_dict(), "epochs": 1})
    return fit(model, train, config).train_seconds


def peak_memory_mb(data_dir: str) -> float:
    """Peak resident memory of a child running one epoch of `mnistctl train --preset fast`."""
    code = (
        "import resource, sys; from shared.cli import main; "
        f"main(['train', '--preset', 'fast', '--epochs', '1', '--data', {data_dir!r}]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    return float(out.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=default_data_dir())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker(args.data, args.repeats)
        return
    if args.ours_worker:
        train, _ = load_mnist(args.data)
        times = {f"ours_b{bs}": ours_epoch_seconds(train, bs, args.repeats) for bs in BATCH_SIZES}
        times["sgemm_peak_gflops"] = sgemm_peak_gflops()
        print(json.dumps(times))
        return

    train, _ = load_mnist(args.data)
    results: dict[str, float | int | str | None] = {}
    parameters = sum(a * b + b for a, b in itertools.pairwise(SIZES))
    # The trainer runs OpenBLAS single-threaded (see trainer_service/__main__.py); both settings
    # are measured so the choice stays visible.
    for threads in (1, 2):
        results.update(ours_with_threads(threads, args.data, args.repeats))
    for bs in BATCH_SIZES:
        results[f"ours_b{bs}"] = results[f"ours_b{bs}_t{TRAINER_THREADS}"]
    peak = float(results[f"sgemm_peak_gflops_t{TRAINER_THREADS}"])  # type: ignore[arg-type]
    results.update(torch_epoch_seconds(args.data, args.repeats))
    flop_bound = 6 * len(train) * parameters / (peak * 1e9)
    results["flop_bound_seconds"] = flop_bound
    results["ratio_flop_bound_b256"] = results["ours_b256"] / flop_bound  # type: ignore[operator]
    if "torch_b128" in results:
        for bs in BATCH_SIZES:
            for torch_run in ("torch", "torch_t1"):
                results[f"ratio_{torch_run}_b{bs}"] = (
                    results[f"ours_b{bs}"] / results[f"{torch_run}_b{bs}"]  # type: ignore[operator]
                )
    else:
        results["ratio_torch_b128"] = None
    results["seed000_epoch_seconds"] = seed000_epoch_seconds(train)
    results["peak_rss_mb"] = peak_memory_mb(args.data)
    dataset_mb = len(train) * 784 * 4 / 2**20
    results["memory_budget_mb"] = 2 * dataset_mb + 200

    print(
        f"sgemm peak {peak:.1f} GFLOP/s with {TRAINER_THREADS} thread(s); "
        f"784-128-64-10 epoch FLOP bound {flop_bound:.3f} s"
    )
    print(
        f"{'batch':>6} {'ours 1 thread':>14} {'ours 2 threads':>15} {'torch':>8} {'ours/torch':>11}"
        f" {'torch 1 thread':>15} {'ours/that':>10}"
    )

    def shown(value, digits: int) -> str:
        return "-" if value is None else format(value, f".{digits}f")

    for bs in BATCH_SIZES:
        print(
            f"{bs:>6} {results[f'ours_b{bs}_t1']:>14.3f} {results[f'ours_b{bs}_t2']:>15.3f} "
            f"{shown(results.get(f'torch_b{bs}'), 3):>8} "
            f"{shown(results.get(f'ratio_torch_b{bs}'), 2):>11} "
            f"{shown(results.get(f'torch_t1_b{bs}'), 3):>15} "
            f"{shown(results.get(f'ratio_torch_t1_b{bs}'), 2):>10}"
        )
    print(f"ours at batch 256 / FLOP bound: {results['ratio_flop_bound_b256']:.2f}")
    print(f"seed000 per-sample epoch: {results['seed000_epoch_seconds']:.2f} s")
    print(
        f"peak memory of one training run: {results['peak_rss_mb']:.0f} MB "
        f"(budget {results['memory_budget_mb']:.0f} MB)"
    )
    if args.json:
        print(
            json.dumps(
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}
            )
        )


if __name__ == "__main__":
    main()
