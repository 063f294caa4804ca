"""Clients that are not our generated code call ModelInfer and get the network's probabilities.

Each client runs in its own process: its descriptors for package ``inference`` would clash with
ours in one protobuf pool, and a separate process is what a real client is anyway.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from inference_support import MODEL, digit_pixels, publish, serving, tiny_model, wait_for

from inference_service.inputs import scale_pixels
from shared.registry import Registry

REPO = Path(__file__).resolve().parents[1]
KSERVE_PROTO = REPO / "protos" / "inference" / "grpc_predict_v2.proto"

TRITON_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as triton

    target, model, rows_file = sys.argv[1:]
    rows = np.load(rows_file, allow_pickle=False)
    client = triton.InferenceServerClient(target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    metadata = client.get_model_metadata(model)
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    result = client.infer(model, [tensor], outputs=[
        triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("label")])
    print(json.dumps({"version": result.get_response().model_version,
                      "platform": metadata.platform,
                      "probabilities": result.as_numpy("probabilities").tolist(),
                      "labels": result.as_numpy("label").tolist()}))
""")

PLAIN_STUB_CLIENT = textwrap.dedent("""
    import json, sys
    import grpc
    import numpy as np
    import grpc_predict_v2_pb2 as pb
    import grpc_predict_v2_pb2_grpc as pb_grpc

    target, model, rows_file = sys.argv[1:]
    rows = np.load(rows_file, allow_pickle=False).astype("<f4")
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(pb.ModelInferRequest(
            model_name=model,
            inputs=[pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(rows.shape))],
            raw_input_contents=[rows.tobytes()]), timeout=10)
    names = [output.name for output in response.outputs]
    raw = dict(zip(names, response.raw_output_contents))
    print(json.dumps({"version": response.model_version,
                      "probabilities": np.frombuffer(raw["probabilities"], "<f4")
                                         .reshape(len(rows), -1).tolist(),
                      "labels": np.frombuffer(raw["label"], "<i8").tolist()}))
""")


def run_client(script: str, target: str, rows_file: Path, path: Path | None = None) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(path) if path else ""}
    done = subprocess.run(
        [sys.executable, "-c", script, target, MODEL, str(rows_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=rows_file.parent,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def published(redis_client, tmp_path):
    model = tiny_model(7)
    version = publish(Registry(redis_client), model)
    rows = scale_pixels(digit_pixels(4), model).astype(np.float32)
    rows_file = tmp_path / "rows.npy"
    np.save(rows_file, rows, allow_pickle=False)
    return model, version, rows, rows_file


def check_answer(answer: dict, model, version: int, rows: np.ndarray) -> None:
    want = model.forward(rows)
    assert answer["version"] == str(version)
    np.testing.assert_allclose(np.array(answer["probabilities"]), want, rtol=1e-5, atol=1e-7)
    assert answer["labels"] == want.argmax(axis=1).tolist()


def test_tritonclient_calls_model_infer(redis_client, published):
    if importlib.util.find_spec("tritonclient") is None:  # never imported here: see above
        pytest.skip("tritonclient is not installed (pip install 'tritonclient[grpc]')")
    model, version, rows, rows_file = published
    with serving(redis_client) as s:
        wait_for(s.store.ready, what="model loaded")
        answer = run_client(TRITON_CLIENT, s.target, rows_file)
    check_answer(answer, model, version, rows)
    assert answer["platform"] == "numpy_mlp"


def test_stubs_compiled_apart_from_ours_call_model_infer(redis_client, published, tmp_path):
    model, version, rows, rows_file = published
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    shutil.copy(KSERVE_PROTO, stubs / KSERVE_PROTO.name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{stubs}",
            f"--python_out={stubs}",
            f"--grpc_python_out={stubs}",
            KSERVE_PROTO.name,
        ],
        check=True,
        cwd=stubs,
        timeout=60,
    )
    with serving(redis_client) as s:
        wait_for(s.store.ready, what="model loaded")
        answer = run_client(PLAIN_STUB_CLIENT, s.target, rows_file, path=stubs)
    check_answer(answer, model, version, rows)
