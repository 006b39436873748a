"""Versioned passage indexes: build, publish atomically, load with validation, search.

An index root holds named indexes; each build is a new immutable version directory:

    <root>/<name>/v<N>/
        manifest.json     encoder identity, dim, metric, index type, count, corpus source, file checksums
        passages.sqlite   row -> (id, title, text)
        embeddings.npy    float32 [count, dim], row-aligned; memory-mapped when loaded
        ann.faiss         only for approximate index types (HNSW, IVF-PQ)

A build writes into `<root>/<name>/.tmp-*` and renames it into place when complete, so a loader never sees
a half-written version; a failed build removes its temp directory.

Exact search is a blocked matrix product over the memory-mapped embeddings (faster than faiss' IndexFlatIP
for batches, and equal to it); approximate indexes search with faiss, then rescore their candidates exactly,
so every score is the true inner product q . d that the generator's prior uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from rag.errors import FailedPrecondition, InvalidArgument, NotFound
from rag.types import Passage
from retriever_svc.corpus import Document, read_documents, split_passages
from retriever_svc.encoders import Encoder, EncoderInfo

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PASSAGES = "passages.sqlite"
EMBEDDINGS = "embeddings.npy"
ANN = "ann.faiss"
FORMAT_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_PATTERN = re.compile(r"^v(\d+)$")
ENCODE_CHUNK = 8192  # passages read from the store and encoded per chunk (bounded memory for any corpus)
ANN_CANDIDATES = 8  # approximate indexes propose this many times k candidates; exact rescoring keeps the best k


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    format_version: int
    index_type: str
    faiss_factory: str
    metric: str
    dim: int
    count: int
    encoder: EncoderInfo
    corpus: dict[str, str]
    checksums: dict[str, str]
    created_at: str

    def to_json(self) -> str:
        data = dict(self.__dict__, encoder=self.encoder.to_json())
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            data["encoder"] = EncoderInfo.from_json(data["encoder"])
            return cls(**data)
        except FileNotFoundError as err:
            raise FailedPrecondition(f"{path.parent} has no {MANIFEST}: not a published index version") from err
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise FailedPrecondition(f"{path} is not a valid index manifest: {err}") from err

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------
# Naming and listing
# --------------------------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidArgument(f"index name {name!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with a symbol")
    return name


def versions(root: Path, name: str) -> list[str]:
    """Published versions of `name`, oldest first."""
    directory = root / name
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in directory.iterdir() if (m := VERSION_PATTERN.match(p.name))]
    return [version for _, version in sorted(found)]


def resolve(root: Path, ref: str) -> Path:
    """`NAME[@VERSION]` (default: the newest version) -> its directory under `root`, refusing anything outside."""
    name, _, version = ref.partition("@")
    if not name:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and versions(root, p.name)) if root.is_dir() else []
        if len(names) != 1:
            raise InvalidArgument(f"name the index to serve (NAME[@VERSION]); {root} holds {names or 'none'}")
        name = names[0]
    check_name(name)
    available = versions(root, name)
    if not available:
        raise NotFound(f"no index named {name!r} under {root}; build one with `rag index build --name {name}`")
    if not version:
        version = available[-1]
    if version not in available:
        raise NotFound(f"index {name!r} has no version {version!r}; it has {', '.join(available)}")
    return root / name / version


# --------------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------------


def _faiss_factory(index_type: str, dim: int, count: int) -> str:
    """The faiss factory string for an index type: "" (exact), hnsw, ivfpq, or a factory string as given."""
    if index_type == "flat":
        return ""
    if index_type == "hnsw":
        return "HNSW32,Flat"
    if index_type == "ivfpq":
        # faiss wants >= 39 training points per list and per PQ centroid (256 of them).
        nlist = max(1, min(4096, int(4 * np.sqrt(count)), count // 39))
        if count < 39 * 256:
            raise InvalidArgument(
                f"ivfpq needs at least 9,984 passages (39 per PQ centroid) to train; this corpus has {count}: use flat or hnsw"
            )
        # As many PQ sub-quantisers as divide dim with at least 4 dimensions each.
        m = next((m for m in (64, 48, 32, 16, 8, 4) if dim % m == 0 and dim // m >= 4), 1)
        return f"IVF{nlist},PQ{m}"
    try:  # any other faiss factory string, e.g. "HNSW64,Flat" or "IVF1024,PQ48x8"
        faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise InvalidArgument(
            f"index type {index_type!r} is neither flat, hnsw, ivfpq nor a faiss factory string faiss accepts: "
            f"{str(err).strip().splitlines()[-1]}"
        ) from err
    return index_type


def _write_store(path: Path, documents: Iterator[Document], passage_words: int) -> int:
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("CREATE TABLE passages (row INTEGER PRIMARY KEY, id TEXT NOT NULL, title TEXT NOT NULL, text TEXT NOT NULL)")
        count = 0
        batch: list[tuple[int, str, str, str]] = []
        seen: set[str] = set()
        for document in documents:
            for passage in split_passages(document, passage_words):
                if passage.id in seen:
                    raise InvalidArgument(f"passage id {passage.id!r} occurs twice in the corpus; ids must be unique")
                seen.add(passage.id)
                batch.append((count, passage.id, passage.title, passage.text))
                count += 1
                if len(batch) == 10_000:
                    connection.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)", batch)
                    batch.clear()
        connection.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)", batch)
        connection.commit()
        if count == 0:
            raise InvalidArgument("the corpus holds no passages")
        return count
    finally:
        connection.close()


def build_index(
    corpus: Path,
    fmt: str,
    root: Path,
    name: str,
    encoder: Encoder,
    index_type: str = "flat",
    passage_words: int = 100,
    show_progress: bool = True,
) -> Manifest:
    """Build and publish a new version of `name`; returns its manifest."""
    check_name(name)
    (root / name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root / name))
    try:
        count = _write_store(tmp / PASSAGES, read_documents(corpus, fmt), passage_words)
        dim = encoder.info.dim
        factory = _faiss_factory(index_type, dim, count)
        embeddings = np.lib.format.open_memmap(tmp / EMBEDDINGS, mode="w+", dtype=np.float32, shape=(count, dim))
        store = sqlite3.connect(tmp / PASSAGES)
        with tqdm(total=count, desc=f"encoding {name}", unit="passage", disable=not show_progress) as progress:
            for start in range(0, count, ENCODE_CHUNK):
                rows = store.execute(
                    "SELECT title, text FROM passages WHERE row >= ? AND row < ? ORDER BY row", (start, start + ENCODE_CHUNK)
                ).fetchall()
                titles, texts = [r[0] for r in rows], [r[1] for r in rows]
                embeddings[start : start + len(rows)] = encoder.encode_passages_sorted(titles, texts, progress)
        store.close()
        embeddings.flush()
        if factory:
            ann = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            vectors = np.ascontiguousarray(embeddings)
            if not ann.is_trained:
                sample = vectors[np.random.default_rng(0).permutation(count)[: 256 * 1024]]
                ann.train(sample)
            ann.add(vectors)
            faiss.write_index(ann, str(tmp / ANN))
        del embeddings
        files = [PASSAGES, EMBEDDINGS] + ([ANN] if factory else [])
        manifest = Manifest(
            name=name,
            version="",
            format_version=FORMAT_VERSION,
            index_type=index_type,
            faiss_factory=factory,
            metric="inner_product",
            dim=dim,
            count=count,
            encoder=encoder.info,
            corpus={"path": str(corpus.resolve()), "format": fmt, "sha256": sha256_file(corpus)},
            checksums={f: sha256_file(tmp / f) for f in files},
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        return _publish(tmp, root, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, root: Path, manifest: Manifest) -> Manifest:
    """Give the build the next version number and rename it into place (atomic on one filesystem)."""
    while True:
        existing = versions(root, manifest.name)
        number = int(existing[-1][1:]) + 1 if existing else 1
        published = dataclasses.replace(manifest, version=f"v{number}")
        (tmp / MANIFEST).write_text(published.to_json())
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(root / manifest.name / published.version)
            return published
        except OSError:
            if not (root / manifest.name / published.version).exists():
                raise  # not a race with a concurrent build: a real error


# --------------------------------------------------------------------------------------------------------
# Load and search
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    row: int
    score: float


class IndexVersion:
    """One loaded, validated, read-only index version. Thread-safe for searches."""

    def __init__(self, directory: Path, verify_checksums: bool = True) -> None:
        self.directory = directory
        self.manifest = Manifest.from_file(directory / MANIFEST)
        m = self.manifest
        if m.format_version != FORMAT_VERSION:
            raise FailedPrecondition(f"{directory}: index format {m.format_version}, this server reads {FORMAT_VERSION}")
        expected = {PASSAGES, EMBEDDINGS} | ({ANN} if m.faiss_factory else set())
        missing = sorted(f for f in expected if not (directory / f).is_file())
        if missing:
            raise FailedPrecondition(f"{directory}: missing {', '.join(missing)}")
        if verify_checksums:
            for file in sorted(expected):
                if m.checksums.get(file) != sha256_file(directory / file):
                    raise FailedPrecondition(f"{directory}: checksum mismatch for {file}; the file is corrupt or was changed")
        try:
            self.embeddings = np.load(directory / EMBEDDINGS, mmap_mode="r")
        except ValueError as err:
            raise FailedPrecondition(f"{directory}: {EMBEDDINGS} is unreadable ({err})") from err
        if self.embeddings.shape != (m.count, m.dim) or self.embeddings.dtype != np.float32:
            raise FailedPrecondition(
                f"{directory}: embeddings are {self.embeddings.shape} {self.embeddings.dtype}, manifest says ({m.count}, {m.dim}) float32"
            )
        self.ann = faiss.read_index(str(directory / ANN)) if m.faiss_factory else None
        if self.ann is not None and (self.ann.ntotal != m.count or self.ann.d != m.dim):
            raise FailedPrecondition(f"{directory}: {ANN} holds {self.ann.ntotal}x{self.ann.d}, manifest says {m.count}x{m.dim}")
        self._store = sqlite3.connect(f"file:{directory / PASSAGES}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self._store_lock = threading.Lock()
        stored = self._store.execute("SELECT COUNT(*) FROM passages").fetchone()[0]
        if stored != m.count:
            raise FailedPrecondition(f"{directory}: {PASSAGES} holds {stored} passages, manifest says {m.count}")

    def close(self) -> None:
        self._store.close()

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k by inner product for each query row, best first."""
        k = min(k, self.manifest.count)
        if self.ann is None:
            return _exact_top_k(self.embeddings, queries, k)
        candidates = min(self.manifest.count, ANN_CANDIDATES * k)
        if "HNSW" in self.manifest.faiss_factory:
            faiss.ParameterSpace().set_index_parameter(self.ann, "efSearch", max(64, 2 * candidates))
        else:
            faiss.ParameterSpace().set_index_parameter(self.ann, "nprobe", 32)
        _, rows = self.ann.search(np.ascontiguousarray(queries, dtype=np.float32), candidates)
        results = []
        for query, candidate_rows in zip(queries, rows, strict=True):
            candidates = np.sort(candidate_rows[candidate_rows >= 0])
            exact = self.embeddings[candidates] @ query  # rescore: the prior needs true inner products
            order = np.argsort(-exact, kind="stable")[:k]
            results.append([Hit(int(r), float(s)) for r, s in zip(candidates[order], exact[order], strict=True)])
        return results

    def passages(self, hits: Sequence[Hit], with_embeddings: bool) -> list[Passage]:
        rows = [h.row for h in hits]
        with self._store_lock:
            found = self._store.execute(
                f"SELECT row, id, title, text FROM passages WHERE row IN ({','.join('?' * len(rows))})", rows
            ).fetchall()
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


def _exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int, block: int = 65536) -> list[list[Hit]]:
    """Exact maximum inner product search in row blocks (bounded memory, BLAS speed)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), block):
        scores = queries @ np.asarray(embeddings[start : start + block]).T  # [Q, block]
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_rows = np.concatenate([best_rows, top + start], axis=1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_scores, best_rows = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_rows, keep, 1)
    order = np.lexsort((best_rows, -best_scores), axis=1)  # best score first, ties by row
    return [
        [Hit(int(best_rows[q, i]), float(best_scores[q, i])) for i in order[q]] for q in range(len(queries))
    ]
