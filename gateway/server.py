"""GatewayService: the public API. Ask = retrieve, then generate, within the caller's deadline."""

from __future__ import annotations

import logging
import time

import grpc

from gateway.admin import AdminServicer
from gateway.config import GatewayConfig
from gateway.retrievers import RetrieverTier, downstream_error
from rag import metrics
from rag.auth import load_admin_token
from rag.clients import aio_channel
from rag.errors import RagError, require
from rag.serving import Served, new_server
from rag.types import DecodingOptions, Limits, validate_question
from rag.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc, generator_pb2, generator_pb2_grpc

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
        self.limits = Limits(max_passages=config.max_k)
        self.retrievers = RetrieverTier(config.retrievers)
        self.generator = generator_pb2_grpc.GeneratorServiceStub(aio_channel(config.generator_address))

    async def Ask(self, request: gateway_pb2.AskRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.AskResponse:
        started = time.perf_counter()
        deadline = Deadline(context, self.config.timeout_seconds)
        question = validate_question(request.question, self.limits)
        k = request.k or self.config.default_k
        require(1 <= k <= self.config.max_k, f"k must be in [1, {self.config.max_k}], got {k}")
        options = DecodingOptions.from_pb(request.options, self.limits, default_max_new_tokens=1)
        require(options.n_docs <= k, f"n_docs={options.n_docs} is more than the k={k} passages retrieved")

        with metrics.timed("retrieve"):
            passages, index_version, score_temperature = await self.retrievers.search(question, k, deadline.remaining())
        retrieved = time.perf_counter()
        if not passages:
            raise RagError("the index returned no passages", code=grpc.StatusCode.FAILED_PRECONDITION)
        if request.retrieve_only:
            return gateway_pb2.AskResponse(
                sources=[gateway_pb2.Source(passage=p) for p in passages],
                index_version=index_version,
                timings=gateway_pb2.Timings(
                    retrieve_ms=(retrieved - started) * 1000, total_ms=(retrieved - started) * 1000
                ),
            )

        generate_options = generator_pb2.DecodingOptions()
        generate_options.CopyFrom(request.options)
        if not generate_options.score_temperature:
            generate_options.score_temperature = score_temperature
        with metrics.timed("generate_call"):
            try:
                generated = await self.generator.Generate(
                    generator_pb2.GenerateRequest(question=question, passages=passages, options=generate_options),
                    timeout=deadline.remaining(),
                )
            except grpc.aio.AioRpcError as err:
                raise downstream_error("generator", err) from err
        finished = time.perf_counter()
        metrics.STAGE_SECONDS.labels("end_to_end").observe(finished - started)

        used = passages[: len(generated.passage_priors)]
        best = list(generated.hypotheses[0].passage_posteriors) if generated.hypotheses else []
        best += [0.0] * (len(used) - len(best))  # the baselines report no posterior
        return gateway_pb2.AskResponse(
            answers=[
                gateway_pb2.Answer(text=h.text, log_prob=h.log_prob, passage_posteriors=h.passage_posteriors)
                for h in generated.hypotheses
            ],
            sources=[
                gateway_pb2.Source(passage=p, prior=prior, posterior=posterior)
                for p, prior, posterior in zip(used, generated.passage_priors, best, strict=True)
            ],
            index_version=index_version,
            timings=gateway_pb2.Timings(
                retrieve_ms=(retrieved - started) * 1000,
                generate_ms=(finished - retrieved) * 1000,
                total_ms=(finished - started) * 1000,
            ),
        )


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
