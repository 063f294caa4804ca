#!/opt/venv/bin/python
"""Container health probe: ask the local inference server's grpc.health.v1 Health/Check.

Exit 0 when the health service answers at all (the process is up and serving gRPC, even with no
model loaded yet: NOT_SERVING); with --serving, exit 0 only on SERVING. Exit 1 otherwise. The
status is printed, so `docker inspect` shows it in the health log.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(prog="mnist-healthcheck", description=__doc__)
    parser.add_argument(
        "--target", default=f"127.0.0.1:{os.environ.get('GRPC_PORT', '50051')}", metavar="HOST:PORT"
    )
    parser.add_argument("--service", default="", help="service name; empty means the whole server")
    parser.add_argument("--serving", action="store_true", help="healthy only when SERVING")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args()
    with grpc.insecure_channel(args.target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.target}: no answer from the health service: {exc.code().name}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {status}")
    if args.serving and response.status != health_pb2.HealthCheckResponse.SERVING:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
