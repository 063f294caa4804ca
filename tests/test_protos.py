"""The committed generated code in shared/wire is exactly what protos/generate.py makes now."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIRE = REPO / "shared" / "wire"


def files_under(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def test_generated_code_is_not_stale(tmp_path):
    out = tmp_path / "wire"
    subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(out)],
        check=True,
        cwd=tmp_path,
    )
    fresh, committed = files_under(out), files_under(WIRE)
    assert fresh == committed, "run `python protos/generate.py`: file lists differ"
    stale = [
        name for name in sorted(fresh) if not filecmp.cmp(out / name, WIRE / name, shallow=False)
    ]
    assert not stale, (
        f"stale generated files {stale}: run `python protos/generate.py` (the output also "
        f"depends on the generator: grpcio-tools {tools_version()} is installed; the committed "
        "code must come from the version the dev extras pin)"
    )


def test_generated_code_imports_as_a_package():
    from shared.wire.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
    from shared.wire.mnist.v1 import digits_pb2, digits_pb2_grpc

    assert digits_pb2.DESCRIPTOR.package == "mnist.v1"
    assert grpc_predict_v2_pb2.DESCRIPTOR.package == "inference"
    assert hasattr(digits_pb2_grpc, "DigitsServicer")
    assert hasattr(grpc_predict_v2_pb2_grpc, "GRPCInferenceServiceServicer")
