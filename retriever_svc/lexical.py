"""The lexical index of a version: BM25 over stemmed words, beside the dense index, one per shard.

Tokenisation, recorded in the manifest (`ANALYZER`): lower case; words of two or more word characters (bm25s's
pattern); stop words dropped: bm25s's English list (Lucene's) and the question words (who, what, ...: they name
no topic, and "who" in a question matched every lead saying "... who became ..."; on the public train split
recall@1 rose 0.703 -> 0.713 lexical, 0.753 -> 0.755 hybrid); the Snowball English stemmer (PyStemmer). One
`Analyzer` does it for the passages at build time and for the questions at search time, with the stop words the
version recorded.

Scores are BM25 as Lucene computes it (bm25s' "lucene" method): idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)) and
tf / (tf + k1 (1 - b + b |d| / avgdl)). N, df and avgdl are the version's, counted over every shard before any
shard is written (Elasticsearch's DFS query-then-fetch, done once at build time), so a passage scores the same
whichever shard holds it and shards merge by score. Each shard is stored as a bm25s index (the CSC matrix of
precomputed term weights, the vocabulary) and searched with bm25s; beside it the version's idf per term, which
normalises a question's scores: BM25 / (sum of the idf of the question's known terms) is in [0, 1) whatever the
question's length, so one fusion weight fits every question.
"""

from __future__ import annotations

import json
import re
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

from rag.errors import FailedPrecondition

LEXICAL = "lexical"  # the folder of a shard's lexical index
IDF = "idf.npy"
FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "vocab.index.json", "params.index.json")
K1, B = 1.5, 0.75  # Lucene's and bm25s' defaults
WORD_PATTERN = r"(?u)\b\w\w+\b"
QUESTION_WORDS = ("who", "whom", "whose", "what", "which", "when", "where", "why", "how")
STOPWORDS = sorted({*STOPWORDS_EN, *QUESTION_WORDS})
ANALYZER: dict[str, object] = {
    "lower": True,
    "pattern": WORD_PATTERN,
    "stopwords": STOPWORDS,
    "stemmer": f"Snowball english (PyStemmer {metadata.version('PyStemmer')})",
}


class Analyzer:
    """Text to the terms the lexical index holds. Safe to share between threads (the stemmer is not)."""

    def __init__(self, stopwords: Iterable[str] = STOPWORDS) -> None:
        self._words = re.compile(WORD_PATTERN).findall
        self._stopwords = frozenset(stopwords)
        self._stemmer = Stemmer.Stemmer("english")
        self._lock = threading.Lock()

    def terms(self, text: str) -> list[str]:
        words = [w for w in self._words(text.lower()) if w not in self._stopwords]
        with self._lock:
            return list(self._stemmer.stemWords(words))


@dataclass
class _TokenizedShard:
    terms: np.ndarray  # int32 term ids of every passage, concatenated
    lengths: np.ndarray  # terms per passage


def build_lexical(shard_texts: Sequence[Iterable[str]], shard_dirs: Sequence[Path]) -> dict[str, Any]:
    """Write the lexical index of every shard (texts in row order) into `<shard dir>/lexical/`; returns what the
    manifest records. Two passes: tokenise every shard and count the version's statistics, then weigh each
    shard's terms with them."""
    started = time.perf_counter()
    analyzer, vocabulary = Analyzer(), dict[str, int]()
    shards = [_tokenize(texts, analyzer, vocabulary) for texts in shard_texts]
    documents = sum(len(s.lengths) for s in shards)
    avg_length = max(sum(int(s.lengths.sum()) for s in shards) / max(documents, 1), 1e-9)
    df = np.zeros(len(vocabulary), dtype=np.int64)
    for shard in shards:  # each shard's pairs are counted again when it is written: keeping them for every shard
        # would hold ~7 bytes a token of the version instead of its 4-byte term ids (21M passages: +4 GiB)
        df += np.bincount(_unique_pairs(shard)[0], minlength=len(vocabulary))
    idf = np.log1p((documents - df + 0.5) / (df + 0.5)).astype(np.float32)
    for shard, directory in zip(shards, shard_dirs, strict=True):
        _save_shard(directory / LEXICAL, shard, vocabulary, idf, avg_length)
    return {
        "analyzer": ANALYZER,
        "bm25": {"method": "lucene", "k1": K1, "b": B, "library": f"bm25s {metadata.version('bm25s')}"},
        "documents": documents,
        "avg_length": round(avg_length, 4),
        "vocabulary": len(vocabulary),
        "build_seconds": round(time.perf_counter() - started, 3),
        "bytes": sum(f.stat().st_size for d in shard_dirs for f in (d / LEXICAL).iterdir()),
    }


def _tokenize(texts: Iterable[str], analyzer: Analyzer, vocabulary: dict[str, int]) -> _TokenizedShard:
    ids, lengths = array("i"), array("q")  # 4 and 8 bytes an entry: a Python list of ints costs 36 a term
    for text in texts:
        terms = analyzer.terms(text)
        ids.extend(vocabulary.setdefault(t, len(vocabulary)) for t in terms)
        lengths.append(len(terms))
    return _TokenizedShard(np.frombuffer(ids, dtype=np.int32), np.frombuffer(lengths, dtype=np.int64))


def _unique_pairs(shard: _TokenizedShard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(term, row, count) of every term that occurs in a passage, sorted by term then row: the CSC order. One
    int64 key per token, sorted in place (the build's peak memory is here)."""
    rows = max(len(shard.lengths), 1)
    keys = shard.terms.astype(np.int64)
    keys *= rows
    keys += np.repeat(np.arange(len(shard.lengths), dtype=np.int64), shard.lengths)
    keys.sort()
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    counts = np.diff(np.append(starts, len(keys)))
    unique = keys[starts]
    del keys
    return unique // rows, unique % rows, counts


def _save_shard(
    directory: Path, shard: _TokenizedShard, vocabulary: dict[str, int], idf: np.ndarray, avg_length: float
) -> None:
    term, row, tf = _unique_pairs(shard)
    saturation = K1 * (1 - B + B * shard.lengths[row] / avg_length)
    weights = idf[term] * tf / (tf + saturation)
    indptr = np.zeros(len(vocabulary) + 1, dtype=np.int64)
    np.cumsum(np.bincount(term, minlength=len(vocabulary)), out=indptr[1:])
    index = bm25s.BM25(k1=K1, b=B, method="lucene")
    index.scores = {
        "data": weights.astype(np.float32),
        "indices": row.astype(np.int32),
        "indptr": indptr,
        "num_docs": len(shard.lengths),
    }
    index.vocab_dict = vocabulary
    index.nonoccurrence_array = None  # Lucene's BM25 has none (BM25L and BM25+ do)
    index.save(str(directory), show_progress=False)
    np.save(directory / IDF, idf)


class LexicalShard:
    """One shard's lexical index, loaded; read-only and safe to search from many threads."""

    def __init__(self, directory: Path, count: int, analyzer: dict[str, Any], where: str, mmap: bool = False) -> None:
        try:
            self.bm25 = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False, verbosity=0)
            self.idf = np.load(directory / IDF, mmap_mode="r" if mmap else None)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
            raise FailedPrecondition(f"{where}: the lexical index is unreadable ({err})", reason="lexical") from err
        if self.bm25.scores["num_docs"] != count or len(self.idf) != len(self.bm25.vocab_dict):
            raise FailedPrecondition(
                f"{where}: the lexical index holds {self.bm25.scores['num_docs']} passages and "
                f"{len(self.idf)} idf values for {len(self.bm25.vocab_dict)} terms; the shard has {count} passages",
                reason="shape",
            )
        if analyzer.get("pattern") != WORD_PATTERN or not isinstance(analyzer.get("stopwords"), list):
            raise FailedPrecondition(
                f"{where}: the lexical index was built with another analyzer ({analyzer}); rebuild the version with "
                "`rag index build`",
                reason="lexical",
            )
        self.analyzer = Analyzer(analyzer["stopwords"])  # the version's own: questions split as its passages were

    def score(self, question: str) -> LexicalScores:
        """BM25 of every passage of the shard for the question's distinct terms that the version knows."""
        vocabulary = self.bm25.vocab_dict
        term_ids = sorted({vocabulary[t] for t in self.analyzer.terms(question) if t in vocabulary})
        if not term_ids:  # only stop words, or words no passage of the version holds: no lexical match
            return LexicalScores(np.zeros(self.bm25.scores["num_docs"], dtype=np.float32), 0.0)
        return LexicalScores(self.bm25.get_scores_from_ids(term_ids), 1 / float(self.idf[term_ids].sum()))


@dataclass(frozen=True)
class LexicalScores:
    raw: np.ndarray  # BM25 of every passage of the shard
    scale: float  # 1 / the summed idf of the question's known terms: what normalises BM25 into [0, 1)

    def normalised(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.raw[np.asarray(rows, dtype=np.int64)] * np.float32(self.scale)

    def top(self, n: int) -> np.ndarray:
        """Rows of the n best positive scores, best first, equal scores by row (so shards merge as one)."""
        raw = self.raw
        if n < len(raw):
            kth = raw[np.argpartition(-raw, n - 1)[:n]].min()
            rows = np.flatnonzero(raw >= kth) if kth > 0 else np.flatnonzero(raw > 0)  # ties at the cut kept
        else:
            rows = np.flatnonzero(raw > 0)
        return rows[np.lexsort((rows, -raw[rows]))[:n]]
