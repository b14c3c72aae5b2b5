"""Helpers for tests that talk gRPC: rich error details out of an AioRpcError."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


def status_details(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status a server attached to a failed call."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    raise AssertionError(f"no rich status in {exc!r}")


def field_violations(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    """field -> description from the BadRequest detail of a failed call."""
    for detail in status_details(exc).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    raise AssertionError("no BadRequest detail")


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call."""
    for detail in status_details(exc).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")
