"""RetrieverService (encode questions, search one shard of a resident index version densely, lexically or both)
and IndexAdminService (load, activate and unload versions on this replica)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import grpc
import numpy as np
import torch

from rag import metrics
from rag.auth import AdminAuth, load_admin_token
from rag.errors import FailedPrecondition, Unavailable, require
from rag.fusion import Fusion
from rag.index_ref import IndexRef
from rag.serving import ComputeThread, Served, new_server, start_loading, use_compute_threads
from rag.types import Passage, RetrievalMode, parse_question
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
    query_embeddings: np.ndarray | None  # None when the questions were not encoded (lexical retrieval)
    index: IndexShard
    mode: RetrievalMode
    fusion: Fusion

    def to_pb(self, include_query_embeddings: bool) -> retriever_pb2.SearchResponse:
        queries = self.query_embeddings if include_query_embeddings and self.query_embeddings is not None else None
        return retriever_pb2.SearchResponse(
            results=[
                retriever_pb2.SearchResult(
                    passages=[p.to_pb() for p in passages],
                    query_embedding=queries[i].tolist() if queries is not None else [],
                )
                for i, passages in enumerate(self.passages)
            ],
            index_version=str(self.index.ref),
            score_temperature=self.fusion.prior_temperature(self.mode),
            shard=self.index.shard,
            num_shards=self.index.manifest.num_shards,
            retrieval=self.mode.to_pb(),
            fusion=self.fusion.to_pb(),
        )


class Retriever:
    """The question encoder and the index versions resident on this replica."""

    def __init__(self, indexes: ResidentIndexes, default_mode: RetrievalMode, fusion: Fusion) -> None:
        self.indexes = indexes
        self.encoder = indexes.encoder
        self.default_mode = default_mode
        self.fusion = fusion

    def search(
        self,
        questions: list[str],
        k: int,
        with_embeddings: bool,
        pinned: IndexRef | None = None,
        mode: RetrievalMode | None = None,
        keep_all: bool = False,
    ) -> SearchResults:
        with self.indexes.acquire(pinned) as index:  # one version for the whole request
            if mode is None:  # the server's default, where this version can serve it
                mode = self.default_mode if index.lexical is not None else RetrievalMode.DENSE
            elif mode.uses_lexical:
                index.require_lexical()
            started = time.perf_counter()
            queries = None
            if mode.uses_dense:
                with metrics.timed("encode"):
                    queries = self.encoder.encode_questions(questions)
            fusion = replace(self.fusion, dense_temperature=index.manifest.encoder.score_temperature)
            with metrics.timed("search"):
                passages = index.find(questions, queries, k, mode, fusion, with_embeddings, keep_all)
            metrics.SEARCH_SECONDS.labels(mode.value).observe(time.perf_counter() - started)
        metrics.PASSAGES_SERVED.inc(sum(len(p) for p in passages))
        return SearchResults(passages, queries, index, mode, fusion)


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
    threads = use_compute_threads(config.threads, torch.set_num_threads, faiss.omp_set_num_threads)
    wanted = IndexRef.parse(config.index, version_required=False) if config.index else None
    first = Manifest.from_file(resolve(root, wanted) / MANIFEST)
    encoder = load_encoder(config.encoder or first.encoder.spec)
    indexes = ResidentIndexes(encoder, root, shard_of(config), config.verify_checksums, config.mmap)
    indexes.load(first.ref)
    indexes.activate(first.ref)
    log.info("serving %s shard %d/%d with %s on %d threads (%s)", first.ref, indexes.shard, first.num_shards,
             encoder.info.spec, threads.count, threads.reason)  # fmt: skip
    mode = config.default_retrieval()
    if mode.uses_lexical and not first.lexical:
        log.warning(
            "%s has no lexical index: requests that name no retrieval mode are served dense, not %s, until a version "
            "with one is swapped in (`rag index build` makes one by default)",
            first.ref,
            mode.value,
        )
    return Retriever(indexes, mode, config.fusion_settings())


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, config: RetrieverConfig) -> None:
        self.config = config
        self.retriever: Retriever | None = None
        self.compute = ComputeThread("retriever")  # encodes questions and searches, one request at a time

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
        mode = RetrievalMode.from_pb(request.retrieval)
        found = await self.compute.run(
            lambda: retriever.search(
                questions, request.k, request.include_embeddings, pinned, mode, request.fusion_candidates
            )
        )
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
        previous = indexes.activate(ref, request.swap_generation)
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
    config.default_retrieval(), config.fusion_settings()  # bad settings fail at start, not when loading
    servicer = RetrieverServicer(config)
    admin = IndexAdminServicer(servicer, load_admin_token(config.admin_token, config.admin_token_file))

    def register(server: grpc.aio.Server) -> None:
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(servicer, server)
        index_admin_pb2_grpc.add_IndexAdminServiceServicer_to_server(admin, server)

    served = await new_server(config, (SERVICE_NAME, ADMIN_SERVICE_NAME), register, metrics.RETRIEVER)

    async def load() -> None:
        servicer.retriever = await servicer.compute.run(lambda: load_retriever(config))

    served.servicers = (servicer, admin)
    start_loading(served, load)
    return served
