"""Hybrid retrieval: how the dense and the lexical list become one ranking, which is also the RAG prior.

The candidates are the union of each list's top N = max(k, candidates) passages; each candidate carries both
scores (q . d, and BM25 normalised into [0, 1)), and its fused score ranks it and is the logit of
p(z|x) = softmax(score / T):
- linear (DPR, Karpukhin et al. 2020, section 5.1): dense / T_dense + weight * lexical, T = 1. The dense term is
  the one p(z|x) had before, so the query encoder still gets its gradient through it (`rag train`);
- rrf (Cormack et al. 2009): sum over the lists holding the passage of 1 / (rrf_k + rank), T = RRF_TEMPERATURE.

Fusing is exact over shards: a shard returns its own candidates with both scores, and fusing the union of every
shard's candidates again gives the global lists' top N (each global top-N passage is in its shard's top N), the
global ranks, and the same scores as one shard holding everything (`fuse` is what both the retriever and the
gateway run).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from rag.errors import require
from rag.types import Passage, RetrievalMode, _from_pb_value, from_word
from rag.v1 import retriever_pb2

# p(z|x) = softmax(rrf / T): RRF scores are at most 2 / (rrf_k + 1) = 0.033; at T = 0.001 the passage first in
# both lists leads the one second in both by 0.5 nats, and the fifth by 2 nats.
RRF_TEMPERATURE = 1e-3


class FusionMethod(enum.Enum):
    LINEAR = "linear"
    RRF = "rrf"

    @classmethod
    def parse(cls, text: str) -> FusionMethod:
        return from_word(cls, text, "fusion")

    @classmethod
    def from_pb(cls, pb: retriever_pb2.FusionMethod.ValueType) -> FusionMethod:
        return _from_pb_value(_FROM_PB, pb, "fusion method", retriever_pb2.FusionMethod.Name)

    def to_pb(self) -> retriever_pb2.FusionMethod.ValueType:
        return _TO_PB[self]


_TO_PB = {FusionMethod.LINEAR: retriever_pb2.FUSION_METHOD_LINEAR, FusionMethod.RRF: retriever_pb2.FUSION_METHOD_RRF}
_FROM_PB = {retriever_pb2.FUSION_METHOD_UNSPECIFIED: FusionMethod.LINEAR, **{pb: m for m, pb in _TO_PB.items()}}


@dataclass(frozen=True)
class Fusion:
    method: FusionMethod = FusionMethod.LINEAR
    # Linear: the weight of the normalised BM25 score in logit units (chosen on the public train split,
    # docs/results.md "Hybrid retrieval"); lexical mode's prior is softmax(weight * lexical).
    weight: float = 24.0
    candidates: int = 20  # each list's top max(k, candidates) enter the fusion
    rrf_k: int = 60
    dense_temperature: float = 1.0  # the encoder's: p(z|x) = softmax(q . d / T_dense) in dense mode

    def __post_init__(self) -> None:
        require(math.isfinite(self.weight) and self.weight > 0, f"fusion weight must be > 0, got {self.weight}")
        require(self.candidates >= 1, f"fusion candidates must be at least 1, got {self.candidates}")
        require(self.rrf_k >= 0, f"rrf_k must be >= 0, got {self.rrf_k}")
        require(self.dense_temperature > 0, f"the dense temperature must be > 0, got {self.dense_temperature}")

    @classmethod
    def from_pb(cls, pb: retriever_pb2.RetrievalFusion) -> Fusion:
        return cls(FusionMethod.from_pb(pb.method), pb.weight, pb.candidates, pb.rrf_k, pb.dense_temperature)

    def to_pb(self) -> retriever_pb2.RetrievalFusion:
        return retriever_pb2.RetrievalFusion(
            method=self.method.to_pb(),
            weight=self.weight,
            candidates=self.candidates,
            rrf_k=self.rrf_k,
            dense_temperature=self.dense_temperature,
        )

    def logit(self, dense: Any, lexical: Any) -> Any:
        """The linear fusion, which is also the prior's logit: of floats, numpy arrays or torch tensors (`rag
        train` takes its gradient through `dense`)."""
        return dense / self.dense_temperature + self.weight * lexical

    def prior_temperature(self, mode: RetrievalMode) -> float:
        """T in p(z|x) = softmax(score / T) for the scores that `mode` gives."""
        if mode is RetrievalMode.DENSE:
            return self.dense_temperature
        if mode is RetrievalMode.LEXICAL:
            return 1 / self.weight
        return 1.0 if self.method is FusionMethod.LINEAR else RRF_TEMPERATURE

    def merge(self, per_shard: Sequence[Sequence[Passage]], k: int, mode: RetrievalMode) -> list[Passage]:
        """One top k from every shard's passages: hybrid candidates (all of each shard's, `keep_all`) are fused
        again; dense and lexical scores compare across shards as they are."""
        found = [p for passages in per_shard for p in passages]
        if mode is RetrievalMode.HYBRID and len(per_shard) > 1:
            return self.fuse(found, k)
        return sorted(found, key=lambda p: -p.score)[:k]

    def fuse(self, pool: Sequence[Passage], k: int, keep_all: bool = False) -> list[Passage]:
        """The fused top k of a pool of candidates that carry both scores (`keep_all`: every candidate of the
        two lists, for a caller that merges shards), best first, equal scores by id."""
        n = max(k, self.candidates)
        by_dense = sorted(pool, key=lambda p: (-_given(p.dense_score), p.id))[:n]
        matched = [p for p in pool if _given(p.lexical_score) > 0]  # no shared term: not in the lexical list
        by_lexical = sorted(matched, key=lambda p: (-_given(p.lexical_score), p.id))[:n]
        candidates = {p.id: p for p in (*by_dense, *by_lexical)}
        if self.method is FusionMethod.LINEAR:
            fused = {i: self.logit(_given(p.dense_score), _given(p.lexical_score)) for i, p in candidates.items()}
        else:
            fused = dict.fromkeys(candidates, 0.0)
            for ranked in (by_dense, by_lexical):
                for rank, p in enumerate(ranked, start=1):
                    fused[p.id] += 1 / (self.rrf_k + rank)
        best = sorted(candidates, key=lambda i: (-fused[i], i))
        return [replace(candidates[i], score=fused[i]) for i in (best if keep_all else best[:k])]


def _given(score: float | None) -> float:
    assert score is not None, "a fusion candidate carries both scores"
    return score
