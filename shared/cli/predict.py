"""``mnistctl predict``: classify digit images or MNIST test digits with a running server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import grpc
import numpy as np

from shared import defaults
from shared.digits_client import Classification, DigitsClient
from shared.images import ascii_art, read_digit
from shared.mnist import load_mnist

EXIT_FAILED = 1  # unreachable server, refused request, unreadable image; argparse exits 2 for usage
SERVER_ENV = "INFERENCE_ADDR"
REQUEST_IMAGES = 1000  # images per Classify call: ~0.8 MB, far below the server's message cap
CONNECT_CHECK_SECONDS = 1.0  # after UNAVAILABLE: a reachable server connects well within this

JSON_HELP = (
    "print one JSON document on the last line of standard output instead of the text lines: "
    '{"results": [{"source", "label", "confidence", "probabilities", "model", "version", '
    'and for --index "true_label", "correct"}, ...], "accuracy": null or '
    '{"correct", "total", "value"}}'
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify digit images or MNIST test digits with a running inference server",
        description="Frame each image file as MNIST frames its digits (grayscale, ink bright on "
        "black, longer side 20 px, centre of mass in the middle of 28x28) and ask the inference "
        "server (python -m inference_service) which digit it is.",
    )
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="a picture of one digit: PNG, JPEG, BMP, GIF or WEBP",
    )
    parser.add_argument(
        "--index",
        nargs="+",
        type=int,
        default=[],
        metavar="N",
        help="MNIST test-set digits by index (0..9999); also reports the true labels and accuracy",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="folder holding the MNIST files, for --index (default: $MNIST_DIR, then cache)",
    )
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=os.environ.get(SERVER_ENV, f"localhost:{defaults.GRPC_PORT}"),
        help=f"inference server (default: ${SERVER_ENV}, then localhost:{defaults.GRPC_PORT})",
    )
    parser.add_argument("--model", default="", help="model name (default: the server's only one)")
    parser.add_argument(
        "--version", default="", help="version number or alias (default: the server's policy)"
    )
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.add_argument(
        "--show", action="store_true", help="draw each digit as the model sees it (28x28 text)"
    )
    parser.set_defaults(run=run)


class ServerUnreachableError(ConnectionError):
    """No connection to the inference server could be made."""


@dataclass(frozen=True)
class Digit:
    """One input: where it came from, its MNIST pixels ``(28, 28)`` and its label if known."""

    source: str
    pixels: np.ndarray
    true_label: int | None = None


def run(args: argparse.Namespace) -> int:
    if not args.images and not args.index:
        return fail("nothing to classify: give image files and/or --index N ...", code=2)
    try:
        digits = [Digit(path, read_digit(path)) for path in args.images]
        digits += mnist_digits(args.index, args.data)
    except ValueError as exc:  # DigitImageError, MnistNotFound, IdxError, bad indices
        return fail(str(exc))
    try:
        answers = classify(digits, args)
    except grpc.RpcError as exc:
        details = exc.details() or "no details"
        return fail(f"the inference server at {args.server} answered {exc.code().name}: {details}")
    except ServerUnreachableError as exc:
        return fail(str(exc))
    results = [
        result_record(digit, answer, index)
        for digit, (answer, index) in zip(digits, answers, strict=True)
    ]
    scored = [r for r in results if "correct" in r]
    accuracy = None
    if scored:
        correct = sum(r["correct"] for r in scored)
        accuracy = {"correct": correct, "total": len(scored), "value": correct / len(scored)}
    for digit, result in zip(digits, results, strict=True):
        if args.show:
            print(f"{digit.source}:\n{ascii_art(digit.pixels)}")
        if not args.json:
            print(result_line(result))
    if args.json:
        print(json.dumps({"results": results, "accuracy": accuracy}))
    elif accuracy is not None:
        print(
            f"accuracy {accuracy['correct']}/{accuracy['total']} = {accuracy['value']:.1%} "
            "on the given MNIST test digits"
        )
    return 0


def mnist_digits(indices: list[int], data_dir: str | None) -> list[Digit]:
    """The MNIST test digits at ``indices`` with their labels; ValueError names a bad index."""
    if not indices:
        return []
    _, test = load_mnist(data_dir)
    bad = [i for i in indices if not 0 <= i < len(test)]
    if bad:
        raise ValueError(f"--index {bad[0]} is outside the test set (0..{len(test) - 1})")
    return [
        Digit(f"mnist-test[{i}]", test.features[i].reshape(28, 28), int(test.labels[i]))
        for i in indices
    ]


def classify(digits: list[Digit], args: argparse.Namespace) -> list[tuple[Classification, int]]:
    """Each digit's batch answer and its row in it; later batches pin the first one's model."""
    pixels = np.stack([d.pixels for d in digits])
    answers: list[tuple[Classification, int]] = []
    with DigitsClient(args.server) as client:
        model, version = args.model, args.version
        for start in range(0, len(digits), REQUEST_IMAGES):
            try:
                answer = client.classify_pixels(
                    pixels[start : start + REQUEST_IMAGES], model=model, version=version
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and not connected(client):
                    raise ServerUnreachableError(
                        f"cannot reach the inference server at {args.server}: start it with "
                        "python -m inference_service (or pass --server HOST:PORT)"
                    ) from exc
                raise
            # One model version answers every image, even if another is published meanwhile.
            model, version = answer.model_name, str(answer.model_version)
            answers += [(answer, row) for row in range(len(answer.labels))]
    return answers


def connected(client: DigitsClient) -> bool:
    """Whether the channel reaches the server: UNAVAILABLE from a live server is its refusal."""
    try:
        grpc.channel_ready_future(client.channel).result(timeout=CONNECT_CHECK_SECONDS)
    except grpc.FutureTimeoutError:
        return False
    return True


def result_record(digit: Digit, answer: Classification, row: int) -> dict:
    probabilities = answer.probabilities[row]
    label = int(answer.labels[row])
    record: dict = {
        "source": digit.source,
        "label": label,
        "confidence": round(float(probabilities[label]), 6),
        "probabilities": [round(float(p), 6) for p in probabilities],
        "model": answer.model_name,
        "version": answer.model_version,
    }
    if digit.true_label is not None:
        record["true_label"] = digit.true_label
        record["correct"] = label == digit.true_label
    return record


def result_line(result: dict) -> str:
    line = (
        f"{result['source']}: {result['label']} ({result['confidence']:.1%}) "
        f"by {result['model']} v{result['version']}"
    )
    if "true_label" in result:
        line += f"; true {result['true_label']}, {'right' if result['correct'] else 'WRONG'}"
    return line


def fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"mnistctl predict: {message}", file=sys.stderr)
    return code
