"""``mnistctl predict`` in-process against a real inference server over loopback and real Redis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from inference_support import MODEL, publish, serving, tiny_model, wait_for
from PIL import Image
from test_images import digit_photo, ink_mask, mnist_photo, photograph

from shared.cli import main, predict
from shared.images import read_digit
from shared.mlp import MLP
from shared.mnist import load_mnist
from shared.presets import PRESETS
from shared.redis_server import free_port
from shared.registry import Registry
from shared.training import fit, training_rngs


@pytest.fixture
def mnistctl(capsys):
    """Run ``mnistctl predict ...``; returns (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["predict", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def served(redis_client):
    """A random tiny model published as ``digits`` v1 and a server answering with it."""
    model = tiny_model(5)
    version = publish(Registry(redis_client), model)
    with serving(redis_client) as s:
        wait_for(s.store.ready, what="model loaded")
        yield s.target, model, version


def probabilities(model: MLP, pixels: np.ndarray) -> np.ndarray:
    """The network's own forward pass: the oracle for what the server must answer."""
    return model.forward(model.input_scaling.apply(pixels.reshape(-1, 784)))


def assert_one_line_error(err: str, text: str) -> None:
    assert err.count("\n") == 1, err
    assert err.startswith("mnistctl predict: ") and text in err, err
    assert "Traceback" not in err


def test_json_answers_for_an_image_file_are_the_models_on_the_framed_digit(
    served, mnistctl, tmp_path
):
    target, model, version = served
    photo = digit_photo(tmp_path, 7)
    code, out, err = mnistctl(str(photo), "--server", target, "--json")
    assert code == 0, err
    [line] = out.splitlines()
    document = json.loads(line)
    assert document["accuracy"] is None
    [result] = document["results"]
    want = probabilities(model, read_digit(photo))[0]
    assert result["source"] == str(photo)
    assert (result["model"], result["version"]) == (MODEL, version)
    assert result["label"] == int(want.argmax())
    assert result["confidence"] == pytest.approx(float(want.max()), abs=1e-5)
    np.testing.assert_allclose(result["probabilities"], want, atol=1e-5)
    assert "true_label" not in result


def test_text_lines_and_the_digit_as_the_model_sees_it(served, mnistctl, tmp_path):
    target, _, version = served
    photo = digit_photo(tmp_path, 1)
    code, out, _ = mnistctl(str(photo), "--server", target, "--show")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{photo}:" and len(lines) == 30
    assert all(len(line) == 56 for line in lines[1:29]) and "@@" in out
    assert lines[29].startswith(f"{photo}: ") and lines[29].endswith(f"by {MODEL} v{version}")


def test_mnist_indices_report_truth_and_accuracy(served, mnistctl, mnist_dir, monkeypatch):
    target, model, version = served
    _, test = load_mnist(mnist_dir)
    want = probabilities(model, test.features[:5]).argmax(axis=1)
    right = int((want == test.labels[:5]).sum())
    # Two images per request: the later requests must name the version the first one got.
    monkeypatch.setattr(predict, "REQUEST_IMAGES", 2)
    code, out, err = mnistctl(
        "--index", "0", "1", "2", "3", "4", "--data", str(mnist_dir), "--server", target
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 6
    assert lines[0].startswith("mnist-test[0]: ") and "; true 7, " in lines[0]
    assert lines[5] == f"accuracy {right}/5 = {right / 5:.1%} on the given MNIST test digits"
    code, out, _ = mnistctl(
        "--index", "0", "1", "2", "3", "4", "--data", str(mnist_dir), "--server", target, "--json"
    )
    document = json.loads(out.splitlines()[-1])
    assert [r["label"] for r in document["results"]] == want.tolist()
    assert [r["true_label"] for r in document["results"]] == test.labels[:5].tolist()
    assert {r["version"] for r in document["results"]} == {version}
    assert document["accuracy"] == {"correct": right, "total": 5, "value": right / 5}


def test_an_unreachable_server_is_one_line_naming_it(mnistctl, tmp_path, monkeypatch):
    photo = digit_photo(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("INFERENCE_ADDR", address)  # the default when --server is not given
    code, out, err = mnistctl(str(photo))
    assert code == 1 and out == ""
    assert_one_line_error(
        err, f"cannot reach the inference server at {address}: start it with python -m "
    )


def test_the_servers_refusal_is_reported_with_its_message(served, mnistctl, tmp_path):
    target, _, _ = served
    code, _, err = mnistctl(str(digit_photo(tmp_path)), "--server", target, "--model", "nope")
    assert code == 1
    assert_one_line_error(err, "nope")
    assert "NOT_FOUND" in err


def test_a_bad_image_is_named_before_any_server_is_asked(mnistctl, tmp_path):
    good = digit_photo(tmp_path)
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 200).save(blank)
    nobody = f"127.0.0.1:{free_port()}"
    for path, problem in ((bad, "not a PNG, JPEG"), (blank, "no digit found")):
        code, out, err = mnistctl(str(good), str(path), "--server", nobody)
        assert code == 1 and out == ""
        assert_one_line_error(err, f"{path}: {problem}")


def test_usage_mistakes_are_one_line(mnistctl, mnist_dir):
    code, _, err = mnistctl()
    assert code == 2
    assert_one_line_error(err, "nothing to classify")
    code, _, err = mnistctl("--index", "10000", "--data", str(mnist_dir))
    assert code == 1
    assert_one_line_error(err, "--index 10000 is outside the test set (0..9999)")


@pytest.fixture(scope="module")
def trained(mnist_dir) -> MLP:
    """The seed002 network after 2 epochs on all of MNIST's training set (~97% test accuracy)."""
    preset = PRESETS["seed002"]
    config = dataclasses.replace(preset.config, epochs=2)
    train, _ = load_mnist(mnist_dir)
    model = MLP.create(
        preset.sizes,
        preset.activations,
        preset.loss,
        rng=training_rngs(config.seed)[0],
        init=preset.init,
        input_scaling=preset.input_scaling,
    )
    fit(model, train, config)
    return model


def drawn_photo(digit: int, path: Path, rng: np.random.Generator, width: int) -> Path:
    """A digit drawn with a pen of ``width`` px, 400 px tall, somewhere on 800x640 paper."""
    left, top = int(rng.integers(20, 480)), int(rng.integers(20, 220))
    ink = ink_mask(digit, (800, 640), (left, top, left + 300, top + 400), width)
    Image.fromarray(photograph(ink, rng)).save(path, quality=70)
    return path


@pytest.mark.slow
def test_photos_of_handwritten_digits_are_classified_correctly(
    redis_client, mnistctl, mnist_dir, trained, tmp_path
):
    _, test = load_mnist(mnist_dir)
    rng = np.random.default_rng(7)
    photos, truth = [], []
    for i in range(20):
        path = tmp_path / f"mnist-test-{i}.jpg"
        path.write_bytes(mnist_photo(test.features[i], rng))
        photos.append(path)
        truth.append(int(test.labels[i]))
    # Drawn here from scratch, with a marker and with a thin pen: no MNIST pixel involved.
    drawn = [
        drawn_photo(digit, tmp_path / f"drawn-{digit}-{width}px.jpg", rng, width)
        for digit in (0, 1, 7)
        for width in (40, 6)
    ]
    version = publish(Registry(redis_client), trained)
    with serving(redis_client) as s:
        wait_for(s.store.ready, what="model loaded")
        code, out, err = mnistctl(*map(str, photos + drawn), "--server", s.target, "--json")
    assert code == 0, err
    results = json.loads(out.splitlines()[-1])["results"]
    assert {(r["model"], r["version"]) for r in results} == {(MODEL, version)}
    labels = [r["label"] for r in results]
    right = sum(label == want for label, want in zip(labels[:20], truth, strict=True))
    assert right >= 18, list(zip(labels[:20], truth, strict=True))
    assert labels[20:] == [0, 0, 1, 1, 7, 7], [r["source"] for r in results[20:]]
