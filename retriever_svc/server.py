"""RetrieverService (encode questions, search one shard of a resident index version) and IndexAdminService
(load, activate and unload versions on this replica)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from rag import metrics
from rag.auth import load_admin_token, require_admin
from rag.errors import FailedPrecondition, Unavailable, require
from rag.index_refs import parse_ref
from rag.serving import Served, new_server, start_loading
from rag.types import Limits, Passage, validate_question
from rag.v1 import index_admin_pb2, index_admin_pb2_grpc, retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import RetrieverConfig
from retriever_svc.encoders import load_encoder
from retriever_svc.index import IndexShard, Manifest, resolve
from retriever_svc.resident import ResidentIndexes

log = logging.getLogger(__name__)
SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name
ADMIN_SERVICE_NAME = index_admin_pb2.DESCRIPTOR.services_by_name["IndexAdminService"].full_name


@dataclass(frozen=True)
class SearchResults:
    passages: list[list[Passage]]  # per question, best first
    query_embeddings: np.ndarray
    index: IndexShard


class Retriever:
    """The question encoder and the index versions resident on this replica."""

    def __init__(self, indexes: ResidentIndexes) -> None:
        self.indexes = indexes
        self.encoder = indexes.encoder

    def search(self, questions: list[str], k: int, with_embeddings: bool, pinned: str = "") -> SearchResults:
        with self.indexes.acquire(pinned) as index:  # one version for the whole request
            with metrics.timed("encode"):
                queries = self.encoder.encode_questions(questions)
            with metrics.timed("search"):
                hits = index.search(queries, k)
                passages = [index.passages(h, with_embeddings) for h in hits]
        metrics.PASSAGES_SERVED.inc(sum(len(p) for p in passages))
        return SearchResults(passages, queries, index)


def shard_of(config: RetrieverConfig) -> int:
    """The configured shard, or for -1 the pod ordinal: StatefulSet pod `retriever-2` serves shard 2."""
    if config.shard >= 0:
        return config.shard
    ordinal = socket.gethostname().rpartition("-")[2]
    if not ordinal.isdigit():
        raise FailedPrecondition(
            f"--shard -1 takes the shard from a host name ending in -<n>; this host is {socket.gethostname()!r}"
        )
    return int(ordinal)


def load_retriever(config: RetrieverConfig) -> Retriever:
    """The encoder named by the config (or recorded by the first index), then that index, loaded and active."""
    root = Path(config.index_root)
    first = Manifest.from_file(resolve(root, config.index) / "manifest.json")
    encoder = load_encoder(config.encoder or first.encoder.spec)
    indexes = ResidentIndexes(encoder, root, shard_of(config), config.verify_checksums, config.mmap_ann)
    indexes.load(first.ref)
    indexes.activate(first.ref)
    log.info("serving %s shard %d/%d with %s", first.ref, indexes.shard, first.num_shards, encoder.info.spec)
    return Retriever(indexes)


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, config: RetrieverConfig) -> None:
        self.config = config
        self.limits = Limits()
        self.retriever: Retriever | None = None

    def ready(self) -> Retriever:
        if self.retriever is None:
            raise Unavailable("the retriever is still loading its index; retry shortly")
        return self.retriever

    async def Search(
        self, request: retriever_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.SearchResponse:
        retriever = self.ready()
        require(len(request.questions) > 0, "no questions given")
        require(
            len(request.questions) <= self.config.max_questions,
            f"{len(request.questions)} questions in one request; the limit is {self.config.max_questions}",
        )
        questions = [validate_question(q, self.limits) for q in request.questions]
        require(1 <= request.k <= self.config.max_k, f"k must be in [1, {self.config.max_k}], got {request.k}")
        if request.index_version:
            parse_ref(request.index_version)
        found = await asyncio.to_thread(
            retriever.search, questions, request.k, request.include_embeddings, request.index_version
        )
        return retriever_pb2.SearchResponse(
            results=[
                retriever_pb2.SearchResult(
                    passages=[p.to_pb() for p in passages],
                    query_embedding=query.tolist() if request.include_query_embeddings else [],
                )
                for passages, query in zip(found.passages, found.query_embeddings, strict=True)
            ],
            index_version=found.index.ref,
            score_temperature=found.index.manifest.encoder.score_temperature,
            shard=found.index.shard,
            num_shards=found.index.manifest.num_shards,
        )


class IndexAdminServicer(index_admin_pb2_grpc.IndexAdminServiceServicer):
    def __init__(self, serving: RetrieverServicer, admin_token: str) -> None:
        self.serving = serving
        self.admin_token = admin_token

    def _indexes(self, context: grpc.aio.ServicerContext) -> ResidentIndexes:
        require_admin(context, self.admin_token)
        return self.serving.ready().indexes

    async def LoadIndex(
        self, request: index_admin_pb2.LoadIndexRequest, context: grpc.aio.ServicerContext
    ) -> index_admin_pb2.LoadIndexResponse:
        indexes = self._indexes(context)
        parse_ref(request.index_version)
        started = time.perf_counter()
        index = await asyncio.to_thread(indexes.load, request.index_version)
        return index_admin_pb2.LoadIndexResponse(
            index_version=index.ref, passages=index.count, load_seconds=time.perf_counter() - started
        )

    async def ActivateIndex(
        self, request: index_admin_pb2.ActivateIndexRequest, context: grpc.aio.ServicerContext
    ) -> index_admin_pb2.ActivateIndexResponse:
        indexes = self._indexes(context)
        parse_ref(request.index_version)
        previous = indexes.activate(request.index_version)
        return index_admin_pb2.ActivateIndexResponse(index_version=request.index_version, previous_version=previous)

    async def UnloadIndex(
        self, request: index_admin_pb2.UnloadIndexRequest, context: grpc.aio.ServicerContext
    ) -> index_admin_pb2.UnloadIndexResponse:
        indexes = self._indexes(context)
        parse_ref(request.index_version)
        await asyncio.to_thread(indexes.unload, request.index_version)
        return index_admin_pb2.UnloadIndexResponse()

    async def GetIndexStatus(
        self, request: index_admin_pb2.GetIndexStatusRequest, context: grpc.aio.ServicerContext
    ) -> index_admin_pb2.GetIndexStatusResponse:
        indexes = self._indexes(context)
        return index_admin_pb2.GetIndexStatusResponse(
            status=index_admin_pb2.IndexStatus(shard=indexes.shard, **indexes.status())  # type: ignore[arg-type]
        )


async def create_server(config: RetrieverConfig) -> Served:
    servicer = RetrieverServicer(config)
    admin = IndexAdminServicer(servicer, load_admin_token(config.admin_token, config.admin_token_file))

    def register(server: grpc.aio.Server) -> None:
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(servicer, server)
        index_admin_pb2_grpc.add_IndexAdminServiceServicer_to_server(admin, server)

    served = await new_server(config, (SERVICE_NAME, ADMIN_SERVICE_NAME), register)

    async def load() -> None:
        servicer.retriever = await asyncio.to_thread(load_retriever, config)

    served.servicers = (servicer, admin)
    start_loading(served, load)
    return served
