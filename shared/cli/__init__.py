"""``mnistctl``: one command-line entry point; each subcommand group lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``register(subparsers)``, adding commands with ``set_defaults(run=...)``;
# ``run(args)`` returns the process exit code.
COMMAND_MODULES = ["train", "models", "predict", "jobs", "up"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnistctl", description="Train MLPs on MNIST, run the job queue, serve predictions."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"shared.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
