"""The gateway's client of the generator tier: domain types in, domain types out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

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
        request = generator_pb2.GenerateRequest(
            question=question, passages=[p.to_pb() for p in passages], options=options.to_pb()
        )
        try:
            return Answered.from_pb(await self.backend().Generate(request, timeout=timeout))
        except grpc.aio.AioRpcError as err:
            raise downstream_error("generator", err) from err

    async def generate_stream(
        self, question: str, passages: Sequence[Passage], options: DecodingOptions, timeout: float
    ) -> AsyncIterator[str | Answered]:
        """The answer's text deltas as the generator sends them, then the whole answer. Leaving the loop early
        cancels the call, which stops the generator's decode."""
        request = generator_pb2.GenerateRequest(
            question=question, passages=[p.to_pb() for p in passages], options=options.to_pb()
        )
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
