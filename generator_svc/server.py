"""GeneratorService: RAG-Token / RAG-Sequence decoding and scoring over given passages.

The model runs on one worker thread (torch already uses every core for one batch). Generate requests that
wait together and decode alike (same mode, beams, lengths and passage count) run as one batch: the RAG math
is batched over questions, so concurrent clients share each forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from generator_svc import rag_math
from generator_svc.config import GeneratorConfig
from generator_svc.models import Context, PassageLM, load_generator, one_each
from rag import metrics
from rag.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable, require
from rag.serving import Served, new_server, start_loading
from rag.types import DecodingOptions, Hypothesis, Limits, Mode, Passage, parse_passages, validate_question
from rag.v1 import generator_pb2, generator_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


@dataclass(frozen=True)
class AnswerScore:
    answer: str
    log_prob: float
    num_tokens: int
    passage_posteriors: tuple[float, ...]


@dataclass(frozen=True)
class Request:
    """One question with its passages, validated."""

    question: str
    passages: list[Passage]
    options: DecodingOptions
    query_embedding: Sequence[float] = ()

    @property
    def n_docs(self) -> int:
        """How many of the passages (the first ones) the answer marginalises over."""
        return self.options.n_docs or len(self.passages)


def check_embedding_dims(passages: Sequence[Passage], query_embedding: Sequence[float]) -> None:
    if query_embedding:
        for i, p in enumerate(passages):
            require(
                len(p.embedding) == len(query_embedding),
                f"passage {i} has a {len(p.embedding)}-d embedding; query_embedding is {len(query_embedding)}-d",
            )


def doc_scores(passages: Sequence[Passage], query_embedding: Sequence[float]) -> torch.Tensor:
    """Retrieval scores [K]: the passages' own, or q . d recomputed from embeddings when q is given."""
    if not query_embedding:
        return torch.tensor([p.score for p in passages], dtype=torch.float32)
    check_embedding_dims(passages, query_embedding)
    q = torch.tensor(query_embedding, dtype=torch.float32)
    return torch.tensor([p.embedding for p in passages], dtype=torch.float32) @ q


class Generator:
    """The model and what to do with it; called on the worker thread only."""

    def __init__(self, lm: PassageLM, default_temperature: float) -> None:
        self.lm = lm
        self.default_temperature = default_temperature

    def _contexts(self, request: Request) -> tuple[list[Context], torch.Tensor, torch.Tensor]:
        """What each row reads, the prior the math uses over the rows, and p(z|x) over the passages."""
        options = request.options
        passages = request.passages[: request.n_docs]
        temperature = options.score_temperature or self.default_temperature
        prior = rag_math.log_prior(doc_scores(passages, request.query_embedding), temperature)
        if options.mode.is_rag:
            return one_each(passages), prior, prior
        context: Context = () if options.mode is Mode.CLOSED_BOOK else tuple(passages)
        return [context], torch.zeros(1), prior

    def generate(self, batch: Sequence[Request]) -> list[tuple[list[Hypothesis], list[float]]]:
        """Decode a batch of requests that share their decoding options and passage count."""
        options = batch[0].options
        prepared = [self._contexts(r) for r in batch]
        with metrics.timed("generate"):
            ctx = self.lm.encode([r.question for r in batch], [contexts for contexts, _, _ in prepared])
            found = rag_math.generate(self.lm, ctx, torch.stack([prior for _, prior, _ in prepared]), options)
        results = []
        for per_question, (_, _, passage_prior) in zip(found, prepared, strict=True):
            metrics.GENERATED_TOKENS.inc(sum(len(g.tokens) for g in per_question))
            hypotheses = [
                Hypothesis(self.lm.decode(g.tokens), g.tokens, g.log_prob, g.posterior if options.mode.is_rag else ())
                for g in per_question
            ]
            results.append((hypotheses, passage_prior.exp().tolist()))
        return results

    def score(self, request: Request, answers: list[str]) -> tuple[list[AnswerScore], list[float]]:
        contexts, prior, passage_prior = self._contexts(request)
        with metrics.timed("score"):
            ctx = self.lm.encode([request.question], [contexts])
            tokens = [self.lm.answer_token_ids(a) for a in answers]
            scores = rag_math.score_answers(self.lm, ctx, prior[None, :], [0] * len(answers), tokens)
            log_probs = scores.log_prob(request.options.mode).tolist()
            posteriors = scores.posterior().tolist() if request.options.mode.is_rag else [[]] * len(answers)
        results = [
            AnswerScore(a, lp, len(t), tuple(post))
            for a, lp, t, post in zip(answers, log_probs, tokens, posteriors, strict=True)
        ]
        return results, passage_prior.exp().tolist()


def batch_key(request: Request) -> tuple[Any, ...]:
    """Requests with equal keys decode alike and can share a batch."""
    o = request.options
    return (
        o.mode,
        o.thorough,
        o.num_beams,
        o.num_return_sequences,
        o.max_new_tokens,
        request.n_docs,
    )


@dataclass
class Job:
    """Work for the model thread; `request` jobs can be batched together, `call` jobs run alone."""

    future: asyncio.Future[Any]
    deadline: float | None
    request: Request | None = None
    call: Callable[[Generator], Any] | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return () if self.request is None else batch_key(self.request)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def done() -> None:
            if self.future.done():
                return
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

        self.future.get_loop().call_soon_threadsafe(done)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class ModelWorker:
    """The model's thread: takes the oldest job, and with it every waiting job of the same batch key."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.generator: Generator | None = None
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []  # taken from the queue but left for a later batch
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _next_batch(self) -> list[Job]:
        if not self._waiting:
            self._waiting.append(self._jobs.get())
        while True:  # everything queued now is a candidate
            try:
                self._waiting.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        first = self._waiting.pop(0)
        if first.call is not None:
            return [first]
        batch = [first]
        for job in list(self._waiting):
            if len(batch) == self.max_batch:
                break
            if job.call is None and job.key == first.key:
                batch.append(job)
                self._waiting.remove(job)
        return batch

    def _run(self) -> None:
        while True:
            self._execute(self._next_batch())

    def _execute(self, batch: list[Job]) -> None:
        live = []
        for job in batch:
            if job.expired():
                job.settle(error=DeadlineExceeded("the deadline passed while the request waited for the model"))
            else:
                live.append(job)
        if not live:
            return
        try:
            if live[0].call is not None:
                live[0].settle(live[0].call(self.generator))  # type: ignore[arg-type]
                return
            assert self.generator is not None
            metrics.GENERATOR_BATCH_SIZE.observe(len(live))
            results = self.generator.generate([job.request for job in live])  # type: ignore[misc]
            for job, result in zip(live, results, strict=True):
                job.settle(result)
        except Exception as err:  # handed to the waiting RPCs, which report it
            if len(live) == 1:
                live[0].settle(error=err)
            else:  # one failing request must not fail the others: run each alone
                for job in live:
                    self._execute([job])


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.limits = Limits(max_new_tokens=max(Limits().max_new_tokens, config.max_new_tokens))
        self.worker = ModelWorker(config.max_batch)
        self.pending = 0

    async def _submit(
        self,
        context: grpc.aio.ServicerContext,
        request: Request | None = None,
        call: Callable[[Generator], Any] | None = None,
    ) -> Any:
        """Queue work for the model thread, refusing when the queue is full; skipped if the caller gave up."""
        if self.worker.generator is None:
            raise Unavailable("the generator is still loading its model; retry shortly")
        if self.pending >= self.config.max_queue:
            raise ResourceExhausted(
                f"{self.pending} requests are queued for the model (limit {self.config.max_queue}); retry later"
            )
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        job = Job(loop.create_future(), None if remaining is None else time.monotonic() + remaining, request, call)
        self.pending += 1
        metrics.GENERATOR_QUEUE.inc()
        try:
            self.worker.submit(job)
            return await job.future
        finally:
            self.pending -= 1
            metrics.GENERATOR_QUEUE.dec()

    def _parse(
        self,
        question: str,
        passages: Sequence[Any],
        options: generator_pb2.DecodingOptions,
        query_embedding: Sequence[float],
    ) -> Request:
        """Everything validated here, before batching, so that a bad request fails alone."""
        request = Request(
            validate_question(question, self.limits),
            parse_passages(passages, self.limits),
            DecodingOptions.from_pb(options, self.limits, self.config.max_new_tokens),
            list(query_embedding),
        )
        require(
            request.n_docs <= len(request.passages),
            f"n_docs={request.n_docs} but only {len(request.passages)} passages were given",
        )
        check_embedding_dims(request.passages, request.query_embedding)
        return request

    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.GenerateResponse:
        parsed = self._parse(request.question, request.passages, request.options, request.query_embedding)
        hypotheses, priors = await self._submit(context, request=parsed)
        return generator_pb2.GenerateResponse(hypotheses=[h.to_pb() for h in hypotheses], passage_priors=priors)

    async def Score(
        self, request: generator_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.ScoreResponse:
        parsed = self._parse(request.question, request.passages, request.options, request.query_embedding)
        answers = list(request.answers)
        require(
            0 < len(answers) <= self.limits.max_answers,
            f"give 1 to {self.limits.max_answers} answers, got {len(answers)}",
        )
        for i, answer in enumerate(answers):
            if not answer.strip():
                raise InvalidArgument(f"answer {i} is empty")
        scores, priors = await self._submit(context, call=lambda g: g.score(parsed, answers))
        return generator_pb2.ScoreResponse(
            scores=[
                generator_pb2.AnswerScore(
                    answer=s.answer,
                    log_prob=s.log_prob,
                    num_tokens=s.num_tokens,
                    passage_posteriors=list(s.passage_posteriors),
                )
                for s in scores
            ],
            passage_priors=priors,
        )


async def create_server(config: GeneratorConfig) -> Served:
    servicer = GeneratorServicer(config)
    served = await new_server(
        config, (SERVICE_NAME,), lambda s: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, s)
    )

    def load() -> Generator:
        if config.threads:
            torch.set_num_threads(config.threads)
        lm = load_generator(config.generator)
        log.info("generator %s loaded (%s)", lm.name, type(lm).__name__)
        return Generator(lm, config.score_temperature)

    async def load_in_background() -> None:
        servicer.worker.generator = await asyncio.to_thread(load)

    served.servicers = (servicer,)
    start_loading(served, load_in_background)
    return served
