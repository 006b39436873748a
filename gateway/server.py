"""GatewayService: the public API. Ask = retrieve, then generate, within the caller's deadline."""

from __future__ import annotations

import logging
import time

import grpc

from gateway.admin import AdminServicer
from gateway.config import GatewayConfig
from gateway.generator import GeneratorClient
from gateway.retrievers import RetrieverTier
from rag import metrics
from rag.auth import load_admin_token
from rag.errors import FailedPrecondition, require
from rag.serving import Served, new_server
from rag.types import Answer, AskRequest, Timings
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
        self.retrievers = RetrieverTier(config.retrievers)
        self.generator = GeneratorClient(config.generator_address)

    async def Ask(self, request: gateway_pb2.AskRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.AskResponse:
        deadline = Deadline(context, self.config.timeout_seconds)
        answer = await self.ask(AskRequest.from_pb(request), deadline)
        return answer.to_pb()

    async def ask(self, ask: AskRequest, deadline: Deadline) -> Answer:
        """Retrieve k passages, then (unless only retrieving) generate over them. The generator owns the limits of
        decoding: it checks the options it is passed."""
        started = time.perf_counter()
        k = ask.k or self.config.default_k
        require(1 <= k <= self.config.max_k, f"k must be in [1, {self.config.max_k}], got {k}")
        require(ask.options.n_docs <= k, f"n_docs={ask.options.n_docs} is more than the k={k} passages retrieved")

        with metrics.timed("retrieve"):
            retrieved = await self.retrievers.search(ask.question, k, deadline.remaining())
        if not retrieved.passages:
            raise FailedPrecondition("the index returned no passages")
        retrieved_at = time.perf_counter()
        if ask.retrieve_only:
            elapsed_ms = (retrieved_at - started) * 1000
            return Answer.of(retrieved, None, Timings(elapsed_ms, 0.0, elapsed_ms))

        options = ask.options.with_defaults(score_temperature=retrieved.score_temperature)
        with metrics.timed("generate_call"):
            answered = await self.generator.generate(ask.question, retrieved.passages, options, deadline.remaining())
        finished = time.perf_counter()
        metrics.STAGE_SECONDS.labels("end_to_end").observe(finished - started)
        timings = Timings(
            retrieve_ms=(retrieved_at - started) * 1000,
            generate_ms=(finished - retrieved_at) * 1000,
            total_ms=(finished - started) * 1000,
        )
        return Answer.of(retrieved, answered, timings)


async def create_server(config: GatewayConfig) -> Served:
    servicer = GatewayServicer(config)
    admin = AdminServicer(
        servicer.retrievers, load_admin_token(config.admin_token, config.admin_token_file), config.swap_timeout_seconds
    )

    def register(server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)

    served = await new_server(config, (SERVICE_NAME, ADMIN_SERVICE_NAME), register)
    served.servicers = (servicer, admin)
    await served.mark_serving()  # stateless: ready once listening; downstream readiness shows per request
    return served
