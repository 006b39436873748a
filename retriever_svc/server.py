"""RetrieverService: encode questions, search the active index version, return passages."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from rag import metrics
from rag.errors import FailedPrecondition, Unavailable, require
from rag.serving import Served, new_server, start_loading
from rag.types import Limits, validate_question
from rag.v1 import retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import RetrieverConfig
from retriever_svc.encoders import Encoder, load_encoder
from retriever_svc.index import IndexVersion, resolve

log = logging.getLogger(__name__)
SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name


@dataclass(frozen=True)
class SearchResults:
    passages: list[list]  # per question: rag.types.Passage, best first
    query_embeddings: np.ndarray
    index_ref: str
    score_temperature: float


class Retriever:
    """An encoder and the index version it serves; the version is read once per request."""

    def __init__(self, encoder: Encoder, index: IndexVersion) -> None:
        check_compatible(encoder, index)
        self.encoder = encoder
        self.index = index
        metrics.INDEX_INFO.labels(index.manifest.name, index.manifest.version).set(1)

    def search(self, questions: list[str], k: int, with_embeddings: bool) -> SearchResults:
        index = self.index  # one version for the whole request
        with metrics.timed("encode"):
            queries = self.encoder.encode_questions(questions)
        with metrics.timed("search"):
            hits = index.search(queries, k)
            passages = [index.passages(h, with_embeddings) for h in hits]
        metrics.PASSAGES_SERVED.inc(sum(len(p) for p in passages))
        return SearchResults(passages, queries, index.manifest.ref, index.manifest.encoder.score_temperature)


def check_compatible(encoder: Encoder, index: IndexVersion) -> None:
    built_by = index.manifest.encoder
    if encoder.info.question_identity != built_by.question_identity:
        raise FailedPrecondition(
            f"index {index.manifest.ref} was built with encoder {built_by.spec!r} ({built_by.question_identity[:12]}); "
            f"the retriever runs {encoder.info.spec!r} ({encoder.info.question_identity[:12]})"
        )
    if encoder.info.dim != index.manifest.dim:
        raise FailedPrecondition(f"index {index.manifest.ref} has dim {index.manifest.dim}, the encoder {encoder.info.dim}")


def load_retriever(config: RetrieverConfig) -> Retriever:
    directory = resolve(Path(config.index_root), config.index)
    index = IndexVersion(directory, verify_checksums=config.verify_checksums)
    encoder = load_encoder(config.encoder or index.manifest.encoder.spec)
    log.info("serving index %s (%d passages) with %s", index.manifest.ref, index.manifest.count, encoder.info.spec)
    return Retriever(encoder, index)


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, config: RetrieverConfig) -> None:
        self.config = config
        self.limits = Limits()
        self.retriever: Retriever | None = None

    async def Search(
        self, request: retriever_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.SearchResponse:
        if self.retriever is None:
            raise Unavailable("the retriever is still loading its index; retry shortly")
        require(len(request.questions) > 0, "no questions given")
        require(
            len(request.questions) <= self.config.max_questions,
            f"{len(request.questions)} questions in one request; the limit is {self.config.max_questions}",
        )
        questions = [validate_question(q, self.limits) for q in request.questions]
        require(1 <= request.k <= self.config.max_k, f"k must be in [1, {self.config.max_k}], got {request.k}")
        found = await asyncio.to_thread(self.retriever.search, questions, request.k, request.include_embeddings)
        return retriever_pb2.SearchResponse(
            results=[
                retriever_pb2.SearchResult(
                    passages=[p.to_pb() for p in passages],
                    query_embedding=query.tolist() if request.include_query_embeddings else [],
                )
                for passages, query in zip(found.passages, found.query_embeddings, strict=True)
            ],
            index_version=found.index_ref,
            score_temperature=found.score_temperature,
        )


async def create_server(config: RetrieverConfig) -> Served:
    servicer = RetrieverServicer(config)
    served = await new_server(
        config, (SERVICE_NAME,), lambda s: retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(servicer, s)
    )

    async def load() -> None:
        servicer.retriever = await asyncio.to_thread(load_retriever, config)

    start_loading(served, load)
    return served
