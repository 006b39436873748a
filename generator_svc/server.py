"""GeneratorService: RAG-Token / RAG-Sequence decoding and scoring over given passages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from generator_svc import rag_math
from generator_svc.config import GeneratorConfig
from generator_svc.models import Context, Contexts, PassageLM, load_generator, one_each
from rag import metrics
from rag.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable, require
from rag.serving import Served, new_server, start_loading
from rag.types import DecodingOptions, Hypothesis, Limits, Mode, Passage, parse_passages, validate_question
from rag.v1 import generator_pb2, generator_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name
T = TypeVar("T")


@dataclass(frozen=True)
class AnswerScore:
    answer: str
    log_prob: float
    num_tokens: int
    passage_posteriors: tuple[float, ...]


def doc_scores(passages: Sequence[Passage], query_embedding: Sequence[float]) -> torch.Tensor:
    """Retrieval scores [1, K]: the passages' own, or q . d recomputed from embeddings when q is given."""
    if not query_embedding:
        return torch.tensor([[p.score for p in passages]], dtype=torch.float32)
    for i, p in enumerate(passages):
        require(
            len(p.embedding) == len(query_embedding),
            f"passage {i} has a {len(p.embedding)}-d embedding; query_embedding is {len(query_embedding)}-d",
        )
    q = torch.tensor(query_embedding, dtype=torch.float32)
    return (torch.tensor([p.embedding for p in passages], dtype=torch.float32) @ q)[None, :]


class Generator:
    """One model; requests run one at a time on a dedicated thread (torch uses every core for each)."""

    def __init__(self, lm: PassageLM, default_temperature: float) -> None:
        self.lm = lm
        self.default_temperature = default_temperature

    def _prepare(
        self, question: str, passages: list[Passage], options: DecodingOptions, query_embedding: Sequence[float]
    ) -> tuple[Contexts, torch.Tensor, torch.Tensor]:
        """The encoded contexts, the prior the math uses over them, and p(z|x) over the passages to report."""
        n_docs = options.n_docs or len(passages)
        require(n_docs <= len(passages), f"n_docs={n_docs} but only {len(passages)} passages were given")
        passages = passages[:n_docs]
        prior = rag_math.log_prior(doc_scores(passages, query_embedding), options.score_temperature or self.default_temperature)
        if options.mode.is_rag:
            return self.lm.encode([question], [one_each(passages)]), prior, prior
        context: Context = () if options.mode is Mode.CLOSED_BOOK else tuple(passages)
        return self.lm.encode([question], [[context]]), torch.zeros(1, 1), prior

    def generate(
        self, question: str, passages: list[Passage], options: DecodingOptions, query_embedding: Sequence[float]
    ) -> tuple[list[Hypothesis], list[float]]:
        with metrics.timed("generate"):
            ctx, prior, passage_prior = self._prepare(question, passages, options, query_embedding)
            found = rag_math.generate(self.lm, ctx, prior, options)[0]
        metrics.GENERATED_TOKENS.inc(sum(len(g.tokens) for g in found))
        hypotheses = [
            Hypothesis(self.lm.decode(g.tokens), g.tokens, g.log_prob, g.posterior if options.mode.is_rag else ())
            for g in found
        ]
        return hypotheses, passage_prior[0].exp().tolist()

    def score(
        self,
        question: str,
        passages: list[Passage],
        answers: list[str],
        options: DecodingOptions,
        query_embedding: Sequence[float],
    ) -> tuple[list[AnswerScore], list[float]]:
        with metrics.timed("score"):
            ctx, prior, passage_prior = self._prepare(question, passages, options, query_embedding)
            tokens = [self.lm.answer_token_ids(a) for a in answers]
            scores = rag_math.score_answers(self.lm, ctx, prior, [0] * len(answers), tokens)
            log_probs = scores.log_prob(options.mode).tolist()
            posteriors = scores.posterior().tolist() if options.mode.is_rag else [[]] * len(answers)
        results = [
            AnswerScore(a, lp, len(t), tuple(post)) for a, lp, t, post in zip(answers, log_probs, tokens, posteriors, strict=True)
        ]
        return results, passage_prior[0].exp().tolist()


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.limits = Limits(max_new_tokens=max(Limits().max_new_tokens, config.max_new_tokens))
        self.generator: Generator | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator")
        self.pending = 0

    async def _run(self, context: grpc.aio.ServicerContext, work: Callable[[Generator], T]) -> T:
        """Queue `work` for the model thread, refusing when the queue is full; skip it if the caller gave up."""
        generator = self.generator
        if generator is None:
            raise Unavailable("the generator is still loading its model; retry shortly")
        if self.pending >= self.config.max_queue:
            raise ResourceExhausted(f"{self.pending} requests are queued for the model (limit {self.config.max_queue}); retry later")
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining

        def guarded() -> T:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the deadline passed while the request waited for the model")
            return work(generator)

        self.pending += 1
        metrics.GENERATOR_QUEUE.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, guarded)
        finally:
            self.pending -= 1
            metrics.GENERATOR_QUEUE.dec()

    def _parse(self, question: str, passages, options) -> tuple[str, list[Passage], DecodingOptions]:
        return (
            validate_question(question, self.limits),
            parse_passages(passages, self.limits),
            DecodingOptions.from_pb(options, self.limits, self.config.max_new_tokens),
        )

    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.GenerateResponse:
        question, passages, options = self._parse(request.question, request.passages, request.options)
        hypotheses, priors = await self._run(
            context, lambda g: g.generate(question, passages, options, request.query_embedding)
        )
        return generator_pb2.GenerateResponse(hypotheses=[h.to_pb() for h in hypotheses], passage_priors=priors)

    async def Score(
        self, request: generator_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.ScoreResponse:
        question, passages, options = self._parse(request.question, request.passages, request.options)
        answers = list(request.answers)
        require(0 < len(answers) <= self.limits.max_answers, f"give 1 to {self.limits.max_answers} answers, got {len(answers)}")
        for i, answer in enumerate(answers):
            if not answer.strip():
                raise InvalidArgument(f"answer {i} is empty")
        scores, priors = await self._run(
            context, lambda g: g.score(question, passages, answers, options, request.query_embedding)
        )
        return generator_pb2.ScoreResponse(
            scores=[
                generator_pb2.AnswerScore(
                    answer=s.answer, log_prob=s.log_prob, num_tokens=s.num_tokens, passage_posteriors=list(s.passage_posteriors)
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
        servicer.generator = await asyncio.get_running_loop().run_in_executor(servicer.executor, load)

    start_loading(served, load_in_background)
    return served
