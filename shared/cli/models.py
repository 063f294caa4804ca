"""``mnistctl models``: list, inspect, promote, roll back, export and import published models."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from shared import defaults
from shared.registry import Registry, UnknownVersion, check_alias
from shared.snapshot import check_name, export_snapshot, import_snapshot

EXIT_FAILED = 1  # not found, invalid input or Redis unreachable; argparse exits 2 for usage


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list, inspect, promote, roll back, export and import published models",
        description="Work with the model registry in Redis.",
    )
    commands = parser.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url",
        metavar="URL",
        help=f"Redis holding the registry (default: $REDIS_URL, then {defaults.REDIS_URL})",
    )

    listing = commands.add_parser(
        "list",
        parents=[common],
        help="models with their latest version and aliases, or one model's versions",
    )
    listing.add_argument("model", nargs="?", help="list this model's versions")
    listing.add_argument("--json", action="store_true", help="print JSON, with full manifests")
    listing.set_defaults(run=list_models)

    show = commands.add_parser("show", parents=[common], help="print a version's manifest")
    show.add_argument("model")
    show.add_argument("ref", nargs="?", default="latest", help="version, alias or latest")
    show.set_defaults(run=show_manifest)

    promote = commands.add_parser("promote", parents=[common], help="point an alias at a version")
    promote.add_argument("model")
    promote.add_argument("version", help="version number, another alias, or latest")
    promote.add_argument("--alias", default="production", help="default: production")
    promote.add_argument("--reason", default="", help="recorded in the alias history")
    promote.set_defaults(run=promote_version)

    rollback = commands.add_parser(
        "rollback", parents=[common], help="move an alias back to its previous target"
    )
    rollback.add_argument("model")
    rollback.add_argument("--alias", default="production", help="default: production")
    rollback.add_argument("--reason", default="", help="recorded in the alias history")
    rollback.set_defaults(run=roll_back_alias)

    export = commands.add_parser(
        "export", parents=[common], help="write a version's weights.npz and manifest.json"
    )
    export.add_argument("model")
    export.add_argument("ref", help="version, alias or latest")
    export.add_argument("directory")
    export.set_defaults(run=export_version)

    importing = commands.add_parser(
        "import", parents=[common], help="verify an exported snapshot and publish it"
    )
    importing.add_argument("directory")
    importing.add_argument("--model", help="publish under this name instead of the manifest's")
    importing.set_defaults(run=import_version)


def registry_command(
    command: Callable[[Registry, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Give ``command`` a registry and turn user mistakes into one line on stderr and exit 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        url = args.redis_url or os.environ.get("REDIS_URL") or defaults.REDIS_URL
        client = None
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=5)
            return command(Registry(client), args)
        except redis.ConnectionError as exc:
            return fail(f"cannot reach Redis at {redacted(url)}: {exc}")
        except (LookupError, ValueError, OSError, redis.RedisError) as exc:
            # UnknownModel/UnknownVersion, SnapshotError and bad names, unwritable directories.
            return fail(str(exc))
        finally:
            if client is not None:
                client.close()

    return run


@registry_command
def list_models(registry: Registry, args: argparse.Namespace) -> int:
    if args.model:
        return list_versions(registry, args)
    rows: list[dict[str, Any]] = [
        {"model": name, "latest": registry.latest_version(name), "aliases": registry.aliases(name)}
        for name in registry.models()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [["MODEL", "LATEST", "ALIASES"]]
    for row in rows:
        table.append([row["model"], f"v{row['latest']}", aliases_text(row["aliases"])])
    print_table(table)
    return 0


def list_versions(registry: Registry, args: argparse.Namespace) -> int:
    name = args.model
    latest = registry.resolve(name, "latest")
    aliases = registry.aliases(name)
    versions: list[dict[str, Any]] = []
    for version in registry.versions(name):
        try:
            manifest = registry.manifest(name, version)
        except UnknownVersion:
            continue  # pruned while we were listing
        pointing = [alias for alias, target in aliases.items() if target == version]
        versions.append({"version": version, "aliases": pointing, "manifest": manifest})
    if args.json:
        document = {"model": name, "latest": latest, "aliases": aliases, "versions": versions}
        print(json.dumps(document, indent=2))
        return 0
    table = [["VERSION", "CREATED", "TEST_ACCURACY", "JOB", "ALIASES"]]
    for entry in versions:
        manifest = entry["manifest"]
        accuracy = manifest.get("metrics", {}).get("test_accuracy")
        table.append(
            [
                f"v{entry['version']}",
                str(manifest.get("created_at", "")),
                f"{accuracy:.4f}" if isinstance(accuracy, int | float) else "-",
                str(manifest.get("job_id") or "-"),
                ", ".join(entry["aliases"]) or "-",
            ]
        )
    print_table(table)
    return 0


@registry_command
def show_manifest(registry: Registry, args: argparse.Namespace) -> int:
    print(json.dumps(registry.manifest(args.model, args.ref), indent=2, sort_keys=True))
    return 0


@registry_command
def promote_version(registry: Registry, args: argparse.Namespace) -> int:
    version = registry.resolve(args.model, args.version)
    registry.promote(args.model, check_alias(args.alias), version, reason=args.reason)
    print(f"{args.model}: {args.alias} -> v{version}")
    return 0


@registry_command
def roll_back_alias(registry: Registry, args: argparse.Namespace) -> int:
    version = registry.rollback(args.model, check_alias(args.alias), reason=args.reason)
    print(f"{args.model}: {args.alias} rolled back to v{version}")
    return 0


@registry_command
def export_version(registry: Registry, args: argparse.Namespace) -> int:
    snapshot = registry.load(args.model, args.ref)
    export_snapshot(snapshot, args.directory)
    print(f"exported {snapshot.name} v{snapshot.version} to {args.directory}")
    return 0


@registry_command
def import_version(registry: Registry, args: argparse.Namespace) -> int:
    snapshot = import_snapshot(args.directory)
    name = check_name(args.model) if args.model else snapshot.name
    manifest = {**snapshot.manifest, "model_name": name, "version": None}
    version = registry.publish_snapshot(snapshot.model, manifest)
    print(f"imported {args.directory} as {name} v{version}")
    return 0


def fail(message: str) -> int:
    print(f"mnistctl models: {message}", file=sys.stderr)
    return EXIT_FAILED


def aliases_text(aliases: dict[str, int]) -> str:
    return ", ".join(f"{alias}=v{version}" for alias, version in aliases.items()) or "-"


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def redacted(url: str) -> str:
    """``url`` with any password replaced, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
