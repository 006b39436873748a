"""Loading one shard of an index version, validated, and searching it: densely, lexically or both.

Exact search is a blocked matrix product over the memory-mapped embeddings (faster than faiss' IndexFlatIP
for batches, and equal to it); approximate indexes search with faiss, then rescore their candidates exactly,
so every score is the true inner product q . d that the generator's prior uses. Lexical search is BM25 over
the shard's lexical index (retriever_svc.lexical); hybrid search scores the union of both lists' candidates
both ways and fuses them (rag.fusion).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from rag.errors import FailedPrecondition
from rag.fusion import Fusion
from rag.index_ref import IndexRef
from rag.types import Passage, RetrievalMode
from retriever_svc import lexical
from retriever_svc.layout import (
    ANN,
    EMBEDDINGS,
    FORMAT_VERSION,
    MANIFEST,
    PASSAGES,
    Manifest,
    file_damage,
    shard_dir,
)

ANN_CANDIDATES = 8  # approximate indexes propose this many times k candidates; exact rescoring keeps the best k


@dataclass(frozen=True)
class Hit:
    row: int
    score: float


class IndexShard:
    """One shard of one version, loaded and validated; read-only and safe to search from many threads."""

    def __init__(self, version_dir: Path, shard: int, verify_checksums: bool = True, mmap: bool = False) -> None:
        self.manifest = m = Manifest.from_file(version_dir / MANIFEST)
        self.shard = shard
        where = f"{m.ref} shard {shard}"
        if m.format_version != FORMAT_VERSION:
            raise FailedPrecondition(f"{where}: index format {m.format_version}, this server reads {FORMAT_VERSION}")
        if (m.name, m.version) != (version_dir.parent.name, version_dir.name):
            raise FailedPrecondition(
                f"{version_dir} holds a manifest for {m.ref}: versions are not to be copied or renamed"
            )
        if not 0 <= shard < m.num_shards:
            raise FailedPrecondition(
                f"{m.ref} has {m.num_shards} shard(s); this retriever is configured as shard {shard}"
            )
        directory = version_dir / shard_dir(shard)
        expected = {f: digest for f, digest in m.checksums.items() if f.startswith(shard_dir(shard) + "/")}
        lexical_files = tuple(f"{lexical.LEXICAL}/{f}" for f in (*lexical.FILES, lexical.IDF)) if m.lexical else ()
        own = (PASSAGES, EMBEDDINGS) + ((ANN,) if m.faiss_factory else ()) + lexical_files
        required = {f"{shard_dir(shard)}/{f}" for f in own}
        missing = sorted(f for f in required if not (version_dir / f).is_file())
        if missing or not required <= set(expected):
            raise FailedPrecondition(
                f"{where}: missing {', '.join(missing or sorted(required - set(expected)))}", reason="missing_file"
            )
        self.version_dir, self.checksums = version_dir, expected
        if verify_checksums:
            self.verify_files()
        count = m.shard_counts[shard]
        try:
            # Read into RAM unless asked: a mapped file truncated on disk kills the process (SIGBUS) when read.
            self.embeddings = np.load(directory / EMBEDDINGS, mmap_mode="r" if mmap else None)
        except (ValueError, OSError) as err:
            raise FailedPrecondition(f"{where}: {EMBEDDINGS} is unreadable ({err})") from err
        if self.embeddings.shape != (count, m.dim) or self.embeddings.dtype != np.float32:
            raise FailedPrecondition(
                f"{where}: embeddings are {self.embeddings.shape} {self.embeddings.dtype}, the manifest says ({count}, {m.dim}) float32",
                reason="shape",
            )
        self.ann = None
        if m.faiss_factory:
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
            self.ann = faiss.read_index(str(directory / ANN), flags)
            if self.ann.ntotal != count or self.ann.d != m.dim:
                raise FailedPrecondition(
                    f"{where}: {ANN} holds {self.ann.ntotal}x{self.ann.d}, the manifest says {count}x{m.dim}",
                    reason="shape",
                )
        self.lexical = (
            lexical.LexicalShard(directory / lexical.LEXICAL, count, m.lexical["analyzer"], where, mmap)
            if m.lexical
            else None
        )
        self._store = sqlite3.connect(
            f"file:{directory / PASSAGES}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        self._store_lock = threading.Lock()
        stored = self._store.execute("SELECT COUNT(*) FROM passages").fetchone()[0]
        if stored != count:
            raise FailedPrecondition(
                f"{where}: {PASSAGES} holds {stored} passages, the manifest says {count}", reason="shape"
            )
        self.count = count

    def verify_files(self) -> None:
        """FAILED_PRECONDITION unless this shard's files on disk still match the manifest's checksums."""
        for file, digest in sorted(self.checksums.items()):
            damage = file_damage(self.version_dir, file, digest)
            if damage is not None:
                reason, problem = damage
                raise FailedPrecondition(
                    f"{self.ref} shard {self.shard}: {problem}; the file is corrupt, changed or gone: restore the "
                    "version or swap to another",
                    reason=reason,
                )

    @property
    def ref(self) -> IndexRef:
        return self.manifest.ref

    def close(self) -> None:
        self._store.close()

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k by inner product for each query row, best first."""
        k = min(k, self.count)
        if self.ann is None:
            return exact_top_k(self.embeddings, queries, k)
        candidates = min(self.count, ANN_CANDIDATES * k)
        if "HNSW" in self.manifest.faiss_factory:
            faiss.ParameterSpace().set_index_parameter(self.ann, "efSearch", max(64, 2 * candidates))
        elif "IVF" in self.manifest.faiss_factory:
            faiss.ParameterSpace().set_index_parameter(self.ann, "nprobe", 32)
        _, rows = self.ann.search(np.ascontiguousarray(queries, dtype=np.float32), candidates)
        results = []
        for query, candidate_rows in zip(queries, rows, strict=True):
            found = np.sort(candidate_rows[candidate_rows >= 0])
            exact = self.embeddings[found] @ query  # rescore: the prior needs true inner products
            order = np.argsort(-exact, kind="stable")[:k]
            results.append([Hit(int(r), float(s)) for r, s in zip(found[order], exact[order], strict=True)])
        return results

    def require_lexical(self) -> lexical.LexicalShard:
        if self.lexical is None:
            raise FailedPrecondition(
                f"{self.ref} has no lexical index (built with --no-lexical, or before lexical indexes): rebuild it "
                f"with `rag index build --corpus {self.manifest.corpus.get('path', 'CORPUS')} --name "
                f"{self.manifest.name}` (lexical is on by default) and swap to the new version, or ask with "
                "retrieval dense",
                reason="no_lexical",
            )
        return self.lexical

    def find(
        self,
        questions: Sequence[str],
        queries: np.ndarray | None,
        k: int,
        mode: RetrievalMode,
        fusion: Fusion,
        with_embeddings: bool = False,
        keep_all: bool = False,
    ) -> list[list[Passage]]:
        """Each question's passages, best first: dense (needs the encoded `queries`), lexical, or hybrid (the
        fused top k, or with `keep_all` every fusion candidate of this shard, for a caller merging shards)."""
        if mode is RetrievalMode.DENSE:
            assert queries is not None
            return [
                [replace(p, dense_score=p.score) for p in self.passages(hits, with_embeddings)]
                for hits in self.search(queries, k)
            ]
        index = self.require_lexical()
        n = max(k, fusion.candidates)
        dense_hits = self.search(queries, n) if queries is not None and mode is RetrievalMode.HYBRID else []
        found = []
        for i, question in enumerate(questions):
            scores = index.score(question)
            if mode is RetrievalMode.LEXICAL:
                rows = scores.top(k)
                hits = [Hit(int(r), float(s)) for r, s in zip(rows, scores.normalised(rows), strict=True)]
                found.append([replace(p, lexical_score=p.score) for p in self.passages(hits, with_embeddings)])
                continue
            assert queries is not None
            candidates = sorted({h.row for h in dense_hits[i]} | {int(r) for r in scores.top(n)})
            pool = [
                replace(p, dense_score=float(d), lexical_score=float(s))
                for p, d, s in zip(
                    self.passages([Hit(r, 0.0) for r in candidates], with_embeddings),
                    self.embeddings[candidates] @ queries[i],
                    scores.normalised(candidates),
                    strict=True,
                )
            ]
            found.append(fusion.fuse(pool, k, keep_all))
        return found

    def passages(self, hits: Sequence[Hit], with_embeddings: bool) -> list[Passage]:
        rows = [h.row for h in hits]
        try:
            with self._store_lock:
                found = self._store.execute(
                    f"SELECT row, id, title, text FROM passages WHERE row IN ({','.join('?' * len(rows))})", rows
                ).fetchall()
        except sqlite3.DatabaseError as err:  # the file changed on disk after it was verified
            raise FailedPrecondition(
                f"{self.ref} shard {self.shard}: {PASSAGES} changed on disk while served ({err}); restore it, or "
                "swap to another version"
            ) from err
        by_row = {row: (pid, title, text) for row, pid, title, text in found}
        return [
            Passage(
                id=by_row[h.row][0],
                title=by_row[h.row][1],
                text=by_row[h.row][2],
                score=h.score,
                embedding=tuple(self.embeddings[h.row].tolist()) if with_embeddings else (),
            )
            for h in hits
        ]


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int, block: int = 65536) -> list[list[Hit]]:
    """Exact maximum inner product search in row blocks (bounded memory, BLAS speed), best score first and
    equal scores by row (duplicate passages are common). A block offers each query only the scores that can
    enter its top k: above its current k-th best, or from the first block, at least the block's k-th best. One
    comparison per score; after the first blocks a handful of candidates are left to sort."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), block):
        scores = queries @ np.asarray(embeddings[start : start + block]).T  # [Q, block]
        if best_scores.shape[1] == k:  # later rows lose ties with the k held
            scores, rows = _candidates(scores, scores > best_scores[:, -1:])
        elif scores.shape[1] > k:
            kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
            scores, rows = _candidates(scores, scores >= kth)
        else:
            rows = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_rows = np.concatenate([best_rows, rows + start], axis=1)
        order = np.lexsort((best_rows, -best_scores), axis=1)[:, :k]
        best_scores, best_rows = np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)
    return [
        [Hit(int(row), float(score)) for row, score in zip(rows, scores, strict=True) if score > -np.inf]
        for rows, scores in zip(best_rows, best_scores, strict=True)
    ]


def _candidates(scores: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chosen scores of each query and their columns, left-aligned in [Q, most chosen] arrays padded with
    -inf (padding sorts after every real score and is dropped at the end)."""
    queries, columns = np.nonzero(chosen)
    counts = np.bincount(queries, minlength=len(scores))
    slots = np.arange(len(queries)) - (np.cumsum(counts) - counts)[queries]
    kept = np.full((len(scores), int(counts.max(initial=0))), -np.inf, dtype=scores.dtype)
    rows = np.zeros(kept.shape, dtype=np.int64)
    kept[queries, slots] = scores[queries, columns]
    rows[queries, slots] = columns
    return kept, rows
