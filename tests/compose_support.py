"""Drive deploy/docker-compose.yml from a test: build, up, find containers by compose labels,
wait for their health through Docker's event stream, read their logs, tear everything down."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
REDIS_PORT_FILE = DEPLOY / "docker-compose.redis-port.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
BUILD_BASES = DEPLOY / "build_bases.sh"
BUILD_LOCK = DEPLOY / ".build" / "e2e-build.lock"  # .build/ is ignored by git and docker
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
LOG_TAIL = 60  # lines per container in a failure message: enough for a traceback


def docker_unavailable_reason() -> str | None:
    """Why the compose tests cannot run here, or None when they can."""
    try:
        import docker
    except ImportError:
        return "the Docker SDK for Python is not installed (pip install -e '.[dev]')"
    if shutil.which("docker-compose") is None:
        return "docker-compose (v1) is not on PATH"
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        client.close()
    except Exception as exc:  # any failure to reach the engine means "no engine here"
        return f"no Docker engine answers ({type(exc).__name__}: {exc})"
    return None


def example_settings() -> dict[str, str]:
    """The settings listed in deploy/.env.example, with their example values."""
    settings = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


def compose_variables(*files: Path) -> set[str]:
    """Every ${NAME...} a compose file reads."""
    pattern = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
    return {name for path in files for name in pattern.findall(path.read_text())}


@dataclass
class Stack:
    """One compose project under a unique name, with its own env file written from .env.example."""

    client: object  # docker.DockerClient
    env_file: Path
    settings: dict[str, str]
    project: str = field(default_factory=lambda: f"mnist-e2e-{uuid.uuid4().hex[:10]}")
    files: tuple[Path, ...] = (COMPOSE_FILE, REDIS_PORT_FILE)

    @classmethod
    def create(cls, client, directory: Path, overrides: dict[str, str]) -> Stack:
        settings = example_settings()
        unknown = set(overrides) - set(settings)
        assert not unknown, f"deploy/.env.example does not list {sorted(unknown)}"
        settings.update(overrides)
        env_file = directory / "compose.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        return cls(client, env_file, settings)

    # --- docker-compose ------------------------------------------------------------------------

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run docker-compose on this project; a failure raises with its output and the logs."""
        command = ["docker-compose", "--project-name", self.project]
        for path in self.files:
            command += ["--file", str(path)]
        command += ["--env-file", str(self.env_file), *args]
        # The env file must decide every setting: the shell's values would win over it.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in self.settings and not k.startswith("COMPOSE_")
        }
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command[3:])} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{self.logs()}"
            )
        return result

    def down(self) -> None:
        """Remove containers, networks and volumes of this project, whatever state it is in."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=120)

    # --- containers --------------------------------------------------------------------------

    def containers(self, service: str | None = None) -> list:
        labels = [f"{PROJECT_LABEL}={self.project}"]
        if service:
            labels.append(f"{SERVICE_LABEL}={service}")
        found = self.client.containers.list(all=True, filters={"label": labels})
        return sorted(found, key=lambda c: c.name)

    def container(self, service: str):
        found = self.containers(service)
        assert len(found) == 1, f"expected one {service} container, found {[c.name for c in found]}"
        return found[0]

    def logs(self, service: str | None = None, tail: int = LOG_TAIL) -> str:
        """The last lines of every container's log, for failure messages."""
        parts = []
        for container in self.containers(service):
            text = container.logs(tail=tail).decode(errors="replace")
            parts.append(f"--- {container.name} ({container.status}) ---\n{text}")
        return "\n".join(parts) or f"(no containers in project {self.project})"

    def wait_healthy(self, container, timeout: float = 90) -> None:
        """Block on Docker's health_status events until ``container`` is healthy."""
        # Events from this instant on, read before the state: no change slips in between, and a
        # restart that returned already (its die event is older) does not count as a death.
        since = f"{time.time():.9f}"
        started = time.monotonic()
        container.reload()
        if health(container) == "healthy":
            return
        events = self.client.events(
            since=since,
            until=time.time() + timeout,
            filters={"container": container.id, "event": ["health_status", "die"]},
            decode=True,
        )
        try:
            for event in events:
                if event.get("status") == "health_status: healthy":
                    return
                if event.get("status") == "die":
                    break
        finally:
            events.close()
        container.reload()
        raise AssertionError(
            f"{container.name} is not healthy after {time.monotonic() - started:.0f} s "
            f"(state {container.status}, health {health(container)}; "
            f"last probes {container.attrs['State'].get('Health', {}).get('Log', [])[-2:]})\n"
            f"{self.logs()}"
        )

    def image_id(self) -> str:
        return self.client.images.get(self.settings["APP_IMAGE"]).id


def health(container) -> str | None:
    """Docker's health status of a container (None when it has no health check)."""
    return (container.attrs["State"].get("Health") or {}).get("Status")


def run_cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    """``mnistctl ARGS`` from the host, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def build_images(stack: Stack) -> dict[str, float]:
    """Base images (skipped when present) and the app image; seconds each step took.

    The build stage is tagged too (``APP_IMAGE-venv``) so that the images a rebuild supersedes
    can be removed: repeated runs would otherwise leave ~0.5 GB of untagged images each.
    """
    BUILD_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with BUILD_LOCK.open("w") as lock:
        # Runs at the same time would rewrite the wheelhouse under each other's docker build.
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_images(stack)


def _build_images(stack: Stack) -> dict[str, float]:
    import docker.errors

    client = stack.client
    app_tag = stack.settings["APP_IMAGE"]
    venv_tag = f"{app_tag}-venv"
    superseded = {tag: image_id_of(client, tag) for tag in (app_tag, venv_tag)}
    timings = {}
    started = time.monotonic()
    result = subprocess.run(
        [str(BUILD_BASES)], cwd=REPO, capture_output=True, text=True, timeout=1200, check=False
    )
    assert result.returncode == 0, f"build_bases.sh failed:\n{result.stdout}{result.stderr}"
    timings["bases and wheelhouse"] = time.monotonic() - started
    started = time.monotonic()
    client.images.build(
        path=str(DEPLOY),
        dockerfile="Dockerfile",
        target="venv",
        tag=venv_tag,
        buildargs={"PYTHON_BASE": stack.settings["PYTHON_BASE"]},
        rm=True,
        forcerm=True,
    )
    stack.compose("build", timeout=900)  # the venv stage now comes from the cache
    timings["compose build"] = time.monotonic() - started
    for tag, old_id in superseded.items():
        if old_id and old_id != image_id_of(client, tag):
            # Only an image left untagged: another tag (say :latest) may name the same build. One
            # that a container of another run still uses stays too.
            with contextlib.suppress(docker.errors.APIError):
                if not client.images.get(old_id).tags:
                    client.images.remove(old_id)
    return timings


def image_id_of(client, tag: str) -> str | None:
    import docker.errors

    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None
