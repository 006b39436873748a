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
import torch

from rag import metrics
from rag.auth import AdminAuth, load_admin_token
from rag.errors import FailedPrecondition, Unavailable, require
from rag.index_ref import IndexRef
from rag.serving import Served, new_server, start_loading
from rag.types import Passage, parse_question
from rag.v1 import index_admin_pb2, index_admin_pb2_grpc, retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import RetrieverConfig
from retriever_svc.encoders import load_encoder
from retriever_svc.layout import MANIFEST, Manifest, resolve
from retriever_svc.resident import ResidentIndexes
from retriever_svc.search import IndexShard

log = logging.getLogger(__name__)
SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name
ADMIN_SERVICE_NAME = index_admin_pb2.DESCRIPTOR.services_by_name["IndexAdminService"].full_name


@dataclass(frozen=True)
class SearchResults:
    passages: list[list[Passage]]  # per question, best first
    query_embeddings: np.ndarray
    index: IndexShard

    def to_pb(self, include_query_embeddings: bool) -> retriever_pb2.SearchResponse:
        return retriever_pb2.SearchResponse(
            results=[
                retriever_pb2.SearchResult(
                    passages=[p.to_pb() for p in passages],
                    query_embedding=query.tolist() if include_query_embeddings else [],
                )
                for passages, query in zip(self.passages, self.query_embeddings, strict=True)
            ],
            index_version=str(self.index.ref),
            score_temperature=self.index.manifest.encoder.score_temperature,
            shard=self.index.shard,
            num_shards=self.index.manifest.num_shards,
        )


class Retriever:
    """The question encoder and the index versions resident on this replica."""

    def __init__(self, indexes: ResidentIndexes) -> None:
        self.indexes = indexes
        self.encoder = indexes.encoder

    def search(
        self, questions: list[str], k: int, with_embeddings: bool, pinned: IndexRef | None = None
    ) -> SearchResults:
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
    if config.threads:
        torch.set_num_threads(config.threads)
    wanted = IndexRef.parse(config.index, version_required=False) if config.index else None
    first = Manifest.from_file(resolve(root, wanted) / MANIFEST)
    encoder = load_encoder(config.encoder or first.encoder.spec)
    indexes = ResidentIndexes(encoder, root, shard_of(config), config.verify_checksums, config.mmap)
    indexes.load(first.ref)
    indexes.activate(first.ref)
    log.info("serving %s shard %d/%d with %s", first.ref, indexes.shard, first.num_shards, encoder.info.spec)
    return Retriever(indexes)


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, config: RetrieverConfig) -> None:
        self.config = config
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
        questions = [parse_question(q) for q in request.questions]
        require(1 <= request.k <= self.config.max_k, f"k must be in [1, {self.config.max_k}], got {request.k}")
        pinned = IndexRef.parse(request.index_version) if request.index_version else None
        found = await asyncio.to_thread(retriever.search, questions, request.k, request.include_embeddings, pinned)
        return found.to_pb(request.include_query_embeddings)


class IndexAdminServicer(index_admin_pb2_grpc.IndexAdminServiceServicer):
    def __init__(self, serving: RetrieverServicer, admin_token: str) -> None:
        self.serving = serving
        self.auth = AdminAuth(admin_token)

    def _indexes(self, context: grpc.aio.ServicerContext) -> ResidentIndexes:
        self.auth.check(context)
        return self.serving.ready().indexes

    async def LoadIndex(
        self, request: index_admin_pb2.LoadIndexRequest, context: grpc.aio.ServicerContext
    ) -> index_admin_pb2.LoadIndexResponse:
        indexes = self._indexes(context)
        ref = IndexRef.parse(request.index_version)
        started = time.perf_counter()
        index = await asyncio.to_thread(indexes.load, ref)
        return index_admin_pb2.LoadIndexResponse(
            index_version=str(index.ref), passages=index.count, load_seconds=time.perf_counter() - started
        )

    async def ActivateIndex(
        self, request: index_admin_pb2.ActivateIndexRequest, context: grpc.aio.ServicerContext
    ) -> index_admin_pb2.ActivateIndexResponse:
        indexes = self._indexes(context)
        ref = IndexRef.parse(request.index_version)
        previous = indexes.activate(ref)
        return index_admin_pb2.ActivateIndexResponse(index_version=str(ref), previous_version=str(previous or ""))

    async def UnloadIndex(
        self, request: index_admin_pb2.UnloadIndexRequest, context: grpc.aio.ServicerContext
    ) -> index_admin_pb2.UnloadIndexResponse:
        indexes = self._indexes(context)
        await asyncio.to_thread(indexes.unload, IndexRef.parse(request.index_version))
        return index_admin_pb2.UnloadIndexResponse()

    async def GetIndexStatus(
        self, request: index_admin_pb2.GetIndexStatusRequest, context: grpc.aio.ServicerContext
    ) -> index_admin_pb2.GetIndexStatusResponse:
        indexes = self._indexes(context)
        return index_admin_pb2.GetIndexStatusResponse(status=indexes.status().to_pb())


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
