"""Request failures that carry the gRPC status a client should see."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request that cannot be answered, for a reason the status code names to the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


def data_loss(message: str) -> RequestError:
    """A stored version failed verification: the server's data is at fault, not the request."""
    return RequestError(grpc.StatusCode.DATA_LOSS, message)
