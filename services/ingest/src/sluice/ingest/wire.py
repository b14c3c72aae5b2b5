"""Registration of IngestService with deserializers that cannot fail.

gRPC's generated registration parses requests before any handler or interceptor runs, so
bytes that are not a valid message (bad UTF-8 in a string field, a corrupt wire format)
come back as UNKNOWN "Unexpected DecodeError". Here a request that does not parse becomes
a :class:`Malformed` value instead, and the handler answers INVALID_ARGUMENT (reason
``MALFORMED_REQUEST``) through the usual error mapping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from sluice.common.errors import InvalidArgument
from sluice.v1 import ingest_pb2

SERVICE = "sluice.v1.IngestService"
MALFORMED_REQUEST = "MALFORMED_REQUEST"


class Malformed:
    """A request whose bytes did not parse as its message type."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidArgument:
        """The INVALID_ARGUMENT to answer it with."""
        exc = InvalidArgument(
            f"the request is not a valid {self.type_name} message",
            [("", "not a valid protobuf message (e.g. a string field that is not UTF-8)")],
        )
        exc.reason = MALFORMED_REQUEST
        return exc


def tolerant(message: Any) -> Callable[[bytes], Any]:
    """A deserializer for ``message`` that returns Malformed instead of raising."""
    name = message.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError):
            return Malformed(name)

    return deserialize


def _unary(
    method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    request: Any,
    response: Any,
) -> grpc.RpcMethodHandler:
    async def behaviour(req: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(req, Malformed):
            raise req.error()
        return await method(req, context)

    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=tolerant(request),
        response_serializer=response.SerializeToString,
    )


def add_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Registers ``servicer``'s IngestService methods on ``server``."""
    handlers = {
        "SubmitIntent": _unary(
            servicer.SubmitIntent, ingest_pb2.SubmitIntentRequest, ingest_pb2.SubmitIntentResponse
        ),
        "SubmitIntents": _unary(
            servicer.SubmitIntents,
            ingest_pb2.SubmitIntentsRequest,
            ingest_pb2.SubmitIntentsResponse,
        ),
        "SubmitIntentStream": grpc.stream_stream_rpc_method_handler(
            servicer.SubmitIntentStream,
            request_deserializer=tolerant(ingest_pb2.SubmitIntentStreamRequest),
            response_serializer=ingest_pb2.SubmitIntentStreamResponse.SerializeToString,
        ),
        "GetIntent": _unary(
            servicer.GetIntent, ingest_pb2.GetIntentRequest, ingest_pb2.GetIntentResponse
        ),
        "ListIntents": _unary(
            servicer.ListIntents, ingest_pb2.ListIntentsRequest, ingest_pb2.ListIntentsResponse
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
