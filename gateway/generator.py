"""The gateway's client of the generator tier: domain types in, domain types out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import grpc

from rag.clients import Backend, downstream_error
from rag.tls import ClientTLS
from rag.types import Answered, DecodingOptions, Passage
from rag.v1 import generator_pb2, generator_pb2_grpc


class GeneratorClient:
    def __init__(self, address: str, tls: ClientTLS | None = None) -> None:
        self.backend: Backend[generator_pb2_grpc.GeneratorServiceAsyncStub] = Backend(
            address, tls, generator_pb2_grpc.GeneratorServiceStub
        )

    async def generate(
        self, question: str, passages: Sequence[Passage], options: DecodingOptions, timeout: float
    ) -> Answered:
        request = _request(generator_pb2.GenerateRequest, question, passages, options)
        try:
            return Answered.from_pb(await self.backend().Generate(request, timeout=timeout))
        except grpc.aio.AioRpcError as err:
            raise downstream_error("generator", err) from err

    async def generate_stream(
        self, question: str, passages: Sequence[Passage], options: DecodingOptions, timeout: float
    ) -> AsyncIterator[str | Answered]:
        """The answer's text deltas as the generator sends them, then the whole answer. Leaving the loop early
        cancels the call, which stops the generator's decode."""
        request = _request(generator_pb2.GenerateStreamRequest, question, passages, options)
        call = self.backend().GenerateStream(request, timeout=timeout)
        try:
            async for reply in call:
                if reply.HasField("final"):
                    yield Answered.from_pb(reply.final)
                else:
                    yield reply.text_delta
        except grpc.aio.AioRpcError as err:
            raise downstream_error("generator", err) from err
        finally:
            call.cancel()  # a no-op once the stream has ended


GenerateMessage = TypeVar("GenerateMessage", generator_pb2.GenerateRequest, generator_pb2.GenerateStreamRequest)


def _request(
    message: type[GenerateMessage], question: str, passages: Sequence[Passage], options: DecodingOptions
) -> GenerateMessage:
    """Generate's request or GenerateStream's (the same fields)."""
    return message(question=question, passages=[p.to_pb() for p in passages], options=options.to_pb())
