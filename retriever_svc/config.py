"""Retriever settings: each field is a `rag serve retriever` flag with an env mirror."""

from __future__ import annotations

from dataclasses import dataclass

from rag import paths
from rag.config import option
from rag.fusion import Fusion, FusionMethod
from rag.serving import ServerConfig
from rag.types import RetrievalMode


@dataclass
class RetrieverConfig(ServerConfig):
    port: int = option(50052, "gRPC port (0 picks a free one)")
    index_root: str = option(str(paths.index_root()), "directory holding the versioned indexes")
    index: str = option("", "NAME[@VERSION] to serve first; default: the newest version of the only index there")
    shard: int = option(
        0, "which shard of the index this retriever serves; -1: the ordinal ending the host name (a StatefulSet pod)"
    )
    encoder: str = option("", "question encoder spec; default: the encoder recorded in the index manifest")
    max_k: int = option(100, "largest k a request may ask for")
    max_questions: int = option(64, "most questions in one Search request")
    retrieval: str = option(
        RetrievalMode.HYBRID.value,
        "dense, lexical or hybrid: the mode of requests that name none (served dense where the version has no "
        "lexical index)",
    )
    fusion: str = option(Fusion.method.value, "how hybrid retrieval fuses its lists: linear (DPR's) or rrf")
    fusion_weight: float = option(Fusion.weight, "linear fusion: weight of the normalised BM25 score (logit units)")
    fusion_candidates: int = option(Fusion.candidates, "hybrid: each list's top max(k, N) passages are fused")
    verify_checksums: bool = option(True, "check every index file against its manifest checksum when loading")
    mmap: bool = option(
        False,
        "memory-map the embeddings and faiss indexes instead of reading them into RAM (for indexes larger than RAM; "
        "a served file then truncated on disk kills the process with SIGBUS)",
    )
    threads: int = option(
        0,
        "torch and FAISS threads for the question encoder and search; 0 = the container's CPU limit, else one per core",
    )
    admin_token: str = option("", "token for the IndexAdminService RPCs; prefer the env mirror or a token file")
    admin_token_file: str = option("", "file holding the admin token (a mounted Kubernetes Secret)")

    def default_retrieval(self) -> RetrievalMode:
        return RetrievalMode.parse(self.retrieval)

    def fusion_settings(self) -> Fusion:
        return Fusion(FusionMethod.parse(self.fusion), self.fusion_weight, self.fusion_candidates)
