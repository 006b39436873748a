"""GeneratorService: RAG-Token / RAG-Sequence decoding and scoring over given passages.

Each RPC parses its request (generator_svc.requests, against this generator's limits), queues the work for the
model thread (generator_svc.worker), and builds the reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import torch

from generator_svc.config import Device, GeneratorConfig
from generator_svc.families import DecoderOnlyLM
from generator_svc.loading import load_passage_lm, resolve_device
from generator_svc.model import RagModel, TextDeltas
from generator_svc.passage_cache import auto_budget_bytes, half_the_free_space
from generator_svc.precision import Dtype, choose_precision
from generator_svc.requests import Limits, Request
from generator_svc.worker import Call, Decode, Job, ModelWorker
from rag import metrics
from rag.errors import ResourceExhausted, Unavailable
from rag.serving import ComputeThread, Served, new_server, start_loading, use_compute_threads
from rag.types import Answered, Mode
from rag.v1 import generator_pb2, generator_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.limits = Limits(
            max_new_tokens=max(Limits().max_new_tokens, config.max_new_tokens),
            max_question_tokens=config.max_question_tokens,
            max_prompt_tokens=config.max_prompt_tokens,
        )
        self.worker = ModelWorker(config.max_batch)
        self.pending = 0

    async def _submit(self, context: grpc.aio.ServicerContext, work: Decode | Call) -> Any:
        """Queue work for the model thread, refusing when the queue is full; skipped if the caller gave up."""
        self._model()
        if self.pending >= self.config.max_queue:
            raise ResourceExhausted(
                f"{self.pending} requests are queued for the model (limit {self.config.max_queue}); retry later"
            )
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        job = Job(loop.create_future(), None if remaining is None else time.monotonic() + remaining, work)
        self.pending += 1
        metrics.GENERATOR_QUEUE.inc()
        try:
            self.worker.submit(job)
            return await job.future
        except asyncio.CancelledError:  # the caller went away: its decode stops at the next step
            job.cancelled.set()
            raise
        finally:
            self.pending -= 1
            metrics.GENERATOR_QUEUE.dec()

    def _model(self) -> RagModel:
        if self.worker.model is None:
            raise Unavailable("the generator is still loading its model; retry shortly")
        return self.worker.model

    def _parse(
        self,
        pb: generator_pb2.GenerateRequest | generator_pb2.GenerateStreamRequest | generator_pb2.ScoreRequest,
        answer_tokens: int | None = None,
    ) -> Request:
        """The request, checked against the limits (its cost in the model's tokens included) before any work; its
        answers take up to `answer_tokens` (default: as many as it may generate)."""
        default_max_new_tokens = min(self.config.max_new_tokens, self.limits.max_new_tokens)
        request = Request.from_pb(pb, self.limits, default_max_new_tokens, self.config.score_temperature)
        model = self._model()
        self.limits.check_tokens(
            model.lm.question_tokens(request.question),
            lambda: model.prompt_lengths(request),
            request.options.max_new_tokens if answer_tokens is None else answer_tokens,
            model.lm.max_positions,
        )
        return request

    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.GenerateResponse:
        answered = await self._submit(context, Decode(self._parse(request)))
        return answered.to_pb()

    async def GenerateStream(
        self, request: generator_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateStreamResponse]:
        """Generate, with the best answer's text sent as it grows (greedy RAG-Token and the baselines); batched
        with the Generate and GenerateStream requests that decode alike, and stopped at its next step when the
        call is cancelled (once every request of its batch is)."""
        parsed = self._parse(request)
        options = parsed.options
        streams = options.num_beams == 1 and options.mode is not Mode.SEQUENCE
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str] = asyncio.Queue()
        text = TextDeltas(self._model().lm)

        def on_token(token: int) -> None:  # on the model's thread
            if delta := text.push(token):
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

        answer = asyncio.ensure_future(self._submit(context, Decode(parsed, on_token if streams else None)))
        next_delta: asyncio.Future[str] | None = None
        sent = ""
        try:
            while not answer.done() or not deltas.empty():
                next_delta = asyncio.ensure_future(deltas.get())
                await asyncio.wait({answer, next_delta}, return_when=asyncio.FIRST_COMPLETED)
                if not next_delta.done():
                    next_delta.cancel()
                    continue
                sent += next_delta.result()
                yield generator_pb2.GenerateStreamResponse(text_delta=next_delta.result())
            answered: Answered = answer.result()
            best = answered.hypotheses[0].text if answered.hypotheses else ""
            if best.startswith(sent) and len(best) > len(sent):  # what the last steps added, or all of it
                yield generator_pb2.GenerateStreamResponse(text_delta=best[len(sent) :])
            yield generator_pb2.GenerateStreamResponse(final=answered.to_pb())
        finally:
            answer.cancel()  # a no-op once done; otherwise _submit marks the job cancelled
            if next_delta is not None:
                next_delta.cancel()  # the caller left while we waited for text: no task is left pending

    async def Score(
        self, request: generator_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.ScoreResponse:
        model = self._model()
        answers, longest = self.limits.answers(request.answers, model.lm.answer_token_ids)
        parsed = self._parse(request, longest)
        scored = await self._submit(context, Call(lambda model, watch: model.score(parsed, answers, watch)))
        return scored.to_pb()


async def create_server(config: GeneratorConfig) -> Served:
    servicer = GeneratorServicer(config)
    served = await new_server(
        config,
        (SERVICE_NAME,),
        lambda s: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, s),
        metrics.GENERATOR,
    )

    def load() -> RagModel:
        threads = use_compute_threads(config.threads, torch.set_num_threads)
        device = Device.parse(config.device)
        where = resolve_device(device)
        precision = choose_precision(Dtype.parse(config.dtype), where)
        cache_bytes = auto_budget_bytes(where) if config.kv_cache_mb < 0 else config.kv_cache_mb * 2**20
        disk_dir = Path(config.kv_cache_dir) if config.kv_cache_dir and cache_bytes else None
        disk_bytes = 0
        if disk_dir is not None:
            disk_bytes = (
                half_the_free_space(disk_dir) if config.kv_cache_disk_mb < 0 else config.kv_cache_disk_mb * 2**20
            )
        lm = load_passage_lm(
            config.generator, precision.dtype, device, config.chunk_tokens, cache_bytes, disk_dir, disk_bytes
        )
        metrics.GENERATOR_PRECISION.labels(precision.dtype.value, precision.basis).set(1)
        log.info(
            "generator %s loaded (%s, %s on %s: %s; %d threads: %s)",
            lm.name, type(lm).__name__, precision.dtype.value, lm.device, precision.reason, threads.count,
            threads.reason,
        )  # fmt: skip
        if isinstance(lm, DecoderOnlyLM) and lm.passage_cache is not None:
            log.info("passage KV cache: %d MiB (%s)", cache_bytes >> 20,
                     "--kv-cache-mb" if config.kv_cache_mb >= 0 else "auto: a tenth of the memory, at most 4 GiB")  # fmt: skip
            if (disk := lm.passage_cache.disk) is not None:
                log.info("passage KV cache disk tier: %s, %d MiB (%s), %d segments there", disk.directory,
                         disk_bytes >> 20, "--kv-cache-disk-mb" if config.kv_cache_disk_mb >= 0 else
                         "auto: half the free space", len(disk))  # fmt: skip
        elif config.kv_cache_dir:
            log.warning("--kv-cache-dir is ignored: %s", "the memory cache is off (--kv-cache-mb 0)" if not
                        cache_bytes else "an encoder-decoder generator has no passage KV cache")  # fmt: skip
        if lm.max_answer_tokens is not None and lm.max_answer_tokens < servicer.limits.max_new_tokens:
            log.warning("answers are limited to %d tokens: the model has no more positions", lm.max_answer_tokens)
            servicer.limits = replace(servicer.limits, max_new_tokens=lm.max_answer_tokens)
        model = RagModel(lm, max(config.draft_tokens, 0))
        drafting = "--draft-tokens" if config.draft_tokens >= 0 else "none: measured in the warm-up, which is off"
        if config.warm_up:
            started = time.perf_counter()
            model.warm_up()
            if config.draft_tokens < 0:
                model.draft_tokens, drafting = model.measure_drafting()
            log.info("generator warmed up in %.1fs (both RAG modes, 5 passages)", time.perf_counter() - started)
        log.info("greedy search verifies %d drafted tokens per pass (%s)", model.draft_tokens, drafting)
        metrics.DRAFT_TOKENS.set(model.draft_tokens)
        return model

    async def load_in_background() -> None:
        # On a thread that ends: the model thread is then the only one whose OpenMP team outlives loading.
        loading = ComputeThread("generator-load")
        try:
            servicer.worker.model = await loading.run(load)
        finally:
            loading.close()

    served.servicers = (servicer,)
    start_loading(served, load_in_background)
    return served
