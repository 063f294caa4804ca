"""``mnistctl models`` in-process against a real redis-server: output, effects and error exits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.cli import main
from shared.mlp import MLP
from shared.redis_server import free_port
from shared.registry import Registry
from shared.snapshot import MANIFEST_FILE, WEIGHTS_FILE, snapshot_manifest

NAME = "digits"


def tiny_model(seed: int) -> MLP:
    rng = np.random.default_rng(seed)
    return MLP.create((4, 3, 2), ("relu", "softmax"), "cross_entropy", rng=rng)


@pytest.fixture
def registry(redis_client) -> Registry:
    return Registry(redis_client)


@pytest.fixture
def published(registry) -> Registry:
    """Two versions of ``digits`` (production -> v1) and one of ``other``."""
    for name, seed in ((NAME, 1), (NAME, 2), ("other", 3)):
        model = tiny_model(seed)
        manifest = snapshot_manifest(
            model, model_name=name, metrics={"test_accuracy": 0.25 * seed}, job_id=f"job-{seed}"
        )
        registry.publish_snapshot(model, manifest)
    registry.promote(NAME, "production", 1)
    return registry


@pytest.fixture
def mnistctl(redis_server, capsys):
    """Run ``mnistctl models ...`` against the test server; returns (exit code, stdout, stderr)."""

    def run(*argv: str, url: str | None = redis_server.url) -> tuple[int, str, str]:
        args = ["models", *argv] + (["--redis-url", url] if url else [])
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_one_line_error(err: str, text: str) -> None:
    assert err.count("\n") == 1, err
    assert err.startswith("mnistctl models: ")
    assert text in err
    assert "Traceback" not in err


# --- list and show --------------------------------------------------------------------------


def test_list_without_models(mnistctl, redis_client):
    assert mnistctl("list", "--json") == (0, "[]\n", "")
    code, out, _ = mnistctl("list")
    assert (code, out.split()) == (0, ["MODEL", "LATEST", "ALIASES"])


def test_list_shows_models_with_latest_version_and_aliases(mnistctl, published):
    code, out, err = mnistctl("list")
    assert (code, err) == (0, "")
    lines = [line.split(None, 2) for line in out.splitlines()]
    assert lines == [
        ["MODEL", "LATEST", "ALIASES"],
        [NAME, "v2", "production=v1"],
        ["other", "v1", "-"],
    ]
    code, out, _ = mnistctl("list", "--json")
    assert json.loads(out) == [
        {"model": NAME, "latest": 2, "aliases": {"production": 1}},
        {"model": "other", "latest": 1, "aliases": {}},
    ]


def test_list_model_json_holds_every_version_with_its_manifest(mnistctl, published):
    code, out, err = mnistctl("list", NAME, "--json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert document["model"] == NAME
    assert document["latest"] == 2
    assert document["aliases"] == {"production": 1}
    assert [v["version"] for v in document["versions"]] == [1, 2]
    assert [v["aliases"] for v in document["versions"]] == [["production"], []]
    for entry in document["versions"]:
        assert entry["manifest"] == published.manifest(NAME, entry["version"])


def test_list_model_table(mnistctl, published):
    code, out, _ = mnistctl("list", NAME)
    rows = [line.split() for line in out.splitlines()]
    assert code == 0
    assert rows[0] == ["VERSION", "CREATED", "TEST_ACCURACY", "JOB", "ALIASES"]
    assert [(r[0], r[2], r[3], r[4]) for r in rows[1:]] == [
        ("v1", "0.2500", "job-1", "production"),
        ("v2", "0.5000", "job-2", "-"),
    ]


def test_show_prints_the_manifest_of_a_version_alias_or_latest(mnistctl, published):
    for ref, version in (("1", 1), ("production", 1), ("latest", 2)):
        code, out, _ = mnistctl("show", NAME, ref)
        assert code == 0
        assert json.loads(out) == published.manifest(NAME, version)
    code, out, _ = mnistctl("show", NAME)
    assert json.loads(out)["version"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("list", "nope"), "no model named 'nope'"),
        (("show", "nope"), "no model named 'nope'"),
        (("show", NAME, "9"), "no version 9"),
        (("show", NAME, "staging"), "no alias 'staging'"),
        (("show", "bad:name"), "invalid model name 'bad:name'"),
    ],
)
def test_lookups_of_missing_things_exit_1_with_one_line(mnistctl, published, argv, message):
    code, out, err = mnistctl(*argv)
    assert (code, out) == (1, "")
    assert_one_line_error(err, message)


# --- promote and rollback -------------------------------------------------------------------


def test_promote_then_rollback(mnistctl, published):
    assert mnistctl("promote", NAME, "2", "--alias", "production", "--reason", "better") == (
        0,
        f"{NAME}: production -> v2\n",
        "",
    )
    assert published.aliases(NAME) == {"production": 2}
    assert published.alias_history(NAME)[-1]["reason"] == "better"
    assert mnistctl("promote", NAME, "latest", "--alias", "staging")[0] == 0
    assert published.aliases(NAME) == {"production": 2, "staging": 2}
    code, out, _ = mnistctl("rollback", NAME, "--alias", "production")
    assert (code, out) == (0, f"{NAME}: production rolled back to v1\n")
    assert published.aliases(NAME)["production"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("promote", NAME, "7"), "no version 7"),
        (("promote", "nope", "1"), "no model named 'nope'"),
        (("promote", NAME, "1", "--alias", "12"), "would be read as a version"),
        (("promote", NAME, "1", "--alias", "a:b"), "invalid alias 'a:b'"),
        (("rollback", NAME), "no earlier target"),
        (("rollback", NAME, "--alias", "staging"), "no alias 'staging'"),
    ],
)
def test_alias_mistakes_exit_1_and_change_nothing(mnistctl, published, argv, message):
    code, _, err = mnistctl(*argv)
    assert code == 1
    assert_one_line_error(err, message)
    assert published.aliases(NAME) == {"production": 1}


# --- export and import ----------------------------------------------------------------------


def test_export_then_import_under_another_name(mnistctl, published, tmp_path):
    code, out, _ = mnistctl("export", NAME, "production", str(tmp_path / "snap"))
    assert (code, out) == (0, f"exported {NAME} v1 to {tmp_path / 'snap'}\n")
    exported = json.loads((tmp_path / "snap" / MANIFEST_FILE).read_text())
    assert exported == published.manifest(NAME, 1)

    code, out, _ = mnistctl("import", str(tmp_path / "snap"), "--model", "copy")
    assert (code, out) == (0, f"imported {tmp_path / 'snap'} as copy v1\n")
    copied = published.manifest("copy", 1)
    assert copied["weights_sha256"] == exported["weights_sha256"]
    assert copied["job_id"] == "job-1"
    raw = np.arange(40).reshape(10, 4)
    original, copy = published.load(NAME, 1).model, published.load("copy", 1).model
    assert original.predict_proba(raw).tobytes() == copy.predict_proba(raw).tobytes()

    assert (
        mnistctl("import", str(tmp_path / "snap"))[1]
        == f"imported {tmp_path / 'snap'} as {NAME} v3\n"
    )


def test_import_refuses_a_tampered_snapshot_and_publishes_nothing(mnistctl, published, tmp_path):
    mnistctl("export", NAME, "1", str(tmp_path))
    weights = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    weights[-40] ^= 0x04
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(weights))
    code, out, err = mnistctl("import", str(tmp_path))
    assert (code, out) == (1, "")
    assert_one_line_error(err, "sha256 mismatch")
    assert published.versions(NAME) == [1, 2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("import", "/nonexistent/snapshot"), "cannot read /nonexistent/snapshot/weights.npz"),
        (("export", NAME, "9", "/tmp/unused"), "no version 9"),
    ],
)
def test_export_and_import_mistakes_exit_1(mnistctl, published, argv, message):
    code, _, err = mnistctl(*argv)
    assert code == 1
    assert_one_line_error(err, message)


def test_import_with_an_invalid_name_exits_1(mnistctl, published, tmp_path):
    mnistctl("export", NAME, "1", str(tmp_path))
    code, _, err = mnistctl("import", str(tmp_path), "--model", "no/slashes")
    assert code == 1
    assert_one_line_error(err, "invalid model name 'no/slashes'")


def test_export_into_a_file_path_exits_1(mnistctl, published, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = mnistctl("export", NAME, "1", str(blocker))
    assert code == 1
    assert_one_line_error(err, str(blocker))


# --- where Redis is, and usage errors -------------------------------------------------------


def test_redis_url_comes_from_the_environment(mnistctl, published, redis_server, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    code, out, _ = mnistctl("list", "--json", url=None)
    assert code == 0
    assert [row["model"] for row in json.loads(out)] == [NAME, "other"]


def test_unreachable_redis_exits_1_with_the_redacted_url(mnistctl):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    code, _, err = mnistctl("list", url=url)
    assert code == 1
    assert_one_line_error(err, "cannot reach Redis at redis://:***@127.0.0.1:")
    assert "hunter2" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ("models",),
        ("models", "promote", NAME),
        ("models", "frobnicate"),
        ("models", "list", "--bogus"),
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err
