"""GatewayService: the public API. Ask = retrieve, then generate, within the caller's deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from gateway.admin import AdminServicer
from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.generator import GeneratorClient
from gateway.retrievers import RetrieverTier
from rag import metrics
from rag.auth import load_admin_token
from rag.errors import FailedPrecondition, NotFound, Unavailable, require
from rag.serving import Served, new_server
from rag.types import Answer, Answered, AskRequest, DecodingOptions, RetrievalMode, Retrieved, Timings
from rag.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


class Deadline:
    """The caller's deadline, handed down to every downstream call as what is left of it."""

    def __init__(self, context: grpc.aio.ServicerContext, default: float) -> None:
        remaining = context.time_remaining()
        self.at = time.monotonic() + (default if remaining is None else remaining)

    def remaining(self) -> float:
        return max(0.001, self.at - time.monotonic())


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        backend_tls = config.backend_tls()
        self.retrievers = RetrieverTier(config.retrievers, backend_tls)
        self.generator = GeneratorClient(config.generator_address, backend_tls)
        self.admission = Admission(config.max_in_flight, config.max_waiting)
        self.default_retrieval = RetrievalMode.parse(config.retrieval) if config.retrieval else None

    async def Ask(self, request: gateway_pb2.AskRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.AskResponse:
        deadline = Deadline(context, self.config.timeout_seconds)
        ask = AskRequest.from_pb(request)
        async with self.admission.slot():
            retrieved, started, retrieved_at = await self._retrieve(ask, deadline)
            if ask.retrieve_only:
                return Answer.of(retrieved, None, _timings(started, retrieved_at, None)).to_pb()
            with metrics.timed("generate_call"):
                answered = await self.generator.generate(
                    ask.question, retrieved.passages, self._options(ask, retrieved), deadline.remaining()
                )
            return self._answer(retrieved, answered, started, retrieved_at).to_pb()

    async def AskStream(
        self, request: gateway_pb2.AskStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.AskStreamResponse]:
        """Ask, with the answer's text sent as the generator decodes it; cancelling stops the generator."""
        deadline = Deadline(context, self.config.timeout_seconds)
        ask = AskRequest.from_pb(request)
        async with self.admission.slot():
            retrieved, started, retrieved_at = await self._retrieve(ask, deadline)
            if ask.retrieve_only:
                yield gateway_pb2.AskStreamResponse(
                    final=Answer.of(retrieved, None, _timings(started, retrieved_at, None)).to_pb()
                )
                return
            answered: Answered | None = None
            with metrics.timed("generate_call"):
                stream = self.generator.generate_stream(
                    ask.question, retrieved.passages, self._options(ask, retrieved), deadline.remaining()
                )
                async for event in stream:
                    if isinstance(event, str):
                        yield gateway_pb2.AskStreamResponse(text_delta=event)
                    else:
                        answered = event
            if answered is None:
                raise Unavailable("the generator's stream ended without an answer; retry")
            final = self._answer(retrieved, answered, started, retrieved_at)
        yield gateway_pb2.AskStreamResponse(final=final.to_pb())

    async def _retrieve(self, ask: AskRequest, deadline: Deadline) -> tuple[Retrieved, float, float]:
        """k passages for the question (the generator owns the decoding limits: it checks the options itself),
        with when retrieval started and ended."""
        started = time.perf_counter()
        k = ask.k or self.config.default_k
        require(1 <= k <= self.config.max_k, f"k must be in [1, {self.config.max_k}], got {k}")
        require(ask.options.n_docs <= k, f"n_docs={ask.options.n_docs} is more than the k={k} passages retrieved")
        mode = ask.retrieval or self.default_retrieval
        with metrics.timed("retrieve"):
            retrieved = await self.retrievers.search(ask.question, k, deadline.remaining(), mode)
        if not retrieved.passages and retrieved.retrieval is RetrievalMode.LEXICAL and not ask.retrieve_only:
            raise NotFound(
                "no passage shares a word with the question (lexical retrieval; stop words do not count): ask with "
                "retrieval hybrid or dense",
                reason="no_lexical_match",
            )
        if not retrieved.passages and not ask.retrieve_only:
            raise FailedPrecondition("the index returned no passages")
        return retrieved, started, time.perf_counter()

    @staticmethod
    def _options(ask: AskRequest, retrieved: Retrieved) -> DecodingOptions:
        return ask.options.with_defaults(score_temperature=retrieved.score_temperature)

    @staticmethod
    def _answer(retrieved: Retrieved, answered: Answered, started: float, retrieved_at: float) -> Answer:
        finished = time.perf_counter()
        metrics.STAGE_SECONDS.labels("end_to_end").observe(finished - started)
        return Answer.of(retrieved, answered, _timings(started, retrieved_at, finished))


def _timings(started: float, retrieved_at: float, finished: float | None) -> Timings:
    """Milliseconds: retrieval, generation (0 when there was none) and in all."""
    end = retrieved_at if finished is None else finished
    return Timings((retrieved_at - started) * 1000, (end - retrieved_at) * 1000, (end - started) * 1000)


async def create_server(config: GatewayConfig) -> Served:
    servicer = GatewayServicer(config)
    admin = AdminServicer(
        servicer.retrievers, load_admin_token(config.admin_token, config.admin_token_file), config.swap_timeout_seconds
    )

    def register(server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)

    served = await new_server(config, (SERVICE_NAME, ADMIN_SERVICE_NAME), register, metrics.GATEWAY)
    served.servicers = (servicer, admin)
    if config.reconcile_seconds > 0 and admin.admin_token:
        served.background = asyncio.ensure_future(admin.reconcile_forever(config.reconcile_seconds))
    await served.mark_serving()  # stateless: ready once listening; downstream readiness shows per request
    return served
