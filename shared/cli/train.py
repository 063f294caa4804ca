"""``mnistctl train``: train a preset on MNIST in this process, without Redis."""

from __future__ import annotations

import argparse
import json
import sys
import time

from shared.jobspec import parse_job
from shared.mnist import load_mnist
from shared.presets import PRESETS
from shared.training import BatchProgress, EpochReport, TrainingCallbacks, fit


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a preset on MNIST locally and report test accuracy",
        description="Train a preset network on MNIST in this process (no Redis needed).",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="fast",
        help="network and training settings (default: fast)",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="folder holding the four MNIST files (default: $MNIST_DIR, then cache)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download missing MNIST files into the cache (needs internet)",
    )
    parser.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument("--limit", type=int, help="train on the first N training images only")
    parser.add_argument("--save", metavar="DIR", help="export the trained model as a snapshot")
    parser.add_argument(
        "--json", action="store_true", help="end standard output with one JSON line of results"
    )
    parser.set_defaults(run=run)


class ConsoleProgress(TrainingCallbacks):
    """Progress on standard error: a line that redraws during an epoch and one line per epoch."""

    def __init__(self, stream=None, interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr  # looked up now: callers may have replaced it
        self.interactive = self.stream.isatty()
        self.interval = interval
        self.last_draw = 0.0

    def on_batch(self, progress: BatchProgress) -> None:
        now = time.monotonic()
        if not self.interactive or now - self.last_draw < self.interval:
            return
        self.last_draw = now
        done = progress.batch / progress.batches
        bar = "#" * int(done * 30)
        self.stream.write(
            f"\r  epoch {progress.epoch + 1} [{bar:<30}] {done:4.0%} loss {progress.loss:.4f} "
            f"acc {progress.accuracy:.4f} {progress.samples_per_second:,.0f} samples/s"
        )
        self.stream.flush()

    def on_epoch(self, report: EpochReport) -> None:
        if self.interactive:
            self.stream.write("\r" + " " * 100 + "\r")
        test = (
            f" test loss {report.test.loss:.4f} test acc {report.test.accuracy:.4f}"
            if report.test
            else ""
        )
        self.stream.write(
            f"epoch {report.epoch}/{report.epochs} {report.seconds:6.2f}s "
            f"train loss {report.train_loss:.4f} acc {report.train_accuracy:.4f}{test}\n"
        )
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    # A local run is described as a job, so it is validated and built as a queued one would be.
    job = {"model": args.preset, "preset": args.preset}
    job.update({k: v for k in ("epochs", "seed", "limit") if (v := getattr(args, k)) is not None})
    try:
        spec = parse_job(job)
        train, test = load_mnist(args.data, download=args.download)
    except ValueError as exc:
        print(f"mnistctl train: {exc}", file=sys.stderr)
        return 2
    if spec.limit:
        train = train.take(spec.limit)
    config = spec.training
    model = spec.initial_model()
    print(
        f"preset {args.preset}: {preset.description}; {model.parameter_count:,} parameters, "
        f"{len(train):,} training images",
        file=sys.stderr,
    )
    result = fit(model, train, config, test=test, callbacks=ConsoleProgress())
    assert result.test is not None
    summary = {
        "preset": args.preset,
        "test_accuracy": result.test.accuracy,
        "test_loss": result.test.loss,
        "train_seconds": round(result.train_seconds, 3),
        "epochs": result.epochs_completed,
        "parameters": model.parameter_count,
    }
    if args.save:
        from shared.snapshot import Snapshot, encode_snapshot, export_snapshot, snapshot_manifest

        manifest = snapshot_manifest(
            model,
            model_name=args.preset,
            metrics={"test_accuracy": result.test.accuracy, "test_loss": result.test.loss},
            training=config.as_dict(),
        )
        _, manifest = encode_snapshot(model, manifest)
        export_snapshot(Snapshot(model, manifest), args.save)
        summary["saved"] = args.save
    print(
        f"test accuracy {result.test.accuracy:.4f} after {result.epochs_completed} epochs, "
        f"{result.train_seconds:.1f} s of training"
    )
    if args.json:
        print(json.dumps(summary))
    return 0
