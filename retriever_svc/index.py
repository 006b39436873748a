"""Versioned, sharded passage indexes: build, publish atomically, load with validation, search.

An index root holds named indexes; each build is a new immutable version directory:

    <root>/<name>/v<N>/
        manifest.json         encoder identity, dim, metric, index type, counts, corpus source, created-at,
                              and the checksum of every file
        shard-<i>/passages.sqlite   row -> (id, title, text)
                  embeddings.npy    float32 [count, dim], row-aligned; memory-mapped when loaded
                  ann.faiss         only for approximate index types (HNSW, IVF-PQ, faiss factory strings)

Shard i holds the i-th contiguous slice of the corpus's passages; a retriever serves one shard. A build writes
into `<root>/<name>/.tmp-*` and renames it into place when complete, so a loader never sees a half-written
version; a failed build removes its temp directory. Passages whose title and text are unchanged since the
newest version built with the same encoder keep their embeddings, so an update re-encodes only what changed.

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
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
from tqdm import tqdm

from rag.errors import FailedPrecondition, InvalidArgument, NotFound
from rag.files import sha256_file
from rag.index_refs import VERSION_PATTERN, check_name, check_version
from rag.types import Passage
from retriever_svc.corpus import Document, read_documents, split_passages

if TYPE_CHECKING:  # encoders load torch and transformers: `rag index list` and manifest checks need neither
    from retriever_svc.encoders import Encoder

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PASSAGES = "passages.sqlite"
EMBEDDINGS = "embeddings.npy"
ANN = "ann.faiss"
FORMAT_VERSION = 1
ENCODE_CHUNK = 8192  # passages read from the store and encoded per chunk (bounded memory for any corpus)
ANN_CANDIDATES = 8  # approximate indexes propose this many times k candidates; exact rescoring keeps the best k


def shard_dir(shard: int) -> str:
    return f"shard-{shard}"


@dataclass(frozen=True)
class EncoderInfo:
    """What an index records about the encoder that built it."""

    kind: str
    spec: str
    question_identity: str
    passage_identity: str
    dim: int
    score_temperature: float

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> EncoderInfo:
        return cls(**data)  # type: ignore[arg-type]


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
    num_shards: int
    shard_counts: list[int]
    encoder: EncoderInfo
    corpus: dict[str, str]
    checksums: dict[str, str]  # "shard-<i>/<file>" -> sha256
    created_at: str
    embeddings_reused: dict[str, object] = dataclasses.field(default_factory=dict)  # {"from": ref, "passages": n}

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
            raise FailedPrecondition(
                f"{path.parent} has no {MANIFEST}: not a published index version", reason="no_manifest"
            ) from err
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise FailedPrecondition(f"{path} is not a valid index manifest: {err}", reason="bad_manifest") from err

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


# --------------------------------------------------------------------------------------------------------
# Naming and listing
# --------------------------------------------------------------------------------------------------------


def versions(root: Path, name: str) -> list[str]:
    """Published versions of `name`, oldest first."""
    directory = root / name
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in directory.iterdir() if (m := VERSION_PATTERN.match(p.name))]
    return [version for _, version in sorted(found)]


def index_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and versions(root, p.name)) if root.is_dir() else []


def resolve(root: Path, ref: str) -> Path:
    """`NAME[@VERSION]` (default: the newest version) -> its directory under `root`, refusing anything outside."""
    name, _, version = ref.partition("@")
    if not name:
        names = index_names(root)
        if len(names) != 1:
            raise InvalidArgument(f"name the index to serve (NAME[@VERSION]); {root} holds {names or 'none'}")
        name = names[0]
    check_name(name)
    available = versions(root, name)
    if not available:
        raise NotFound(
            f"no index named {name!r} under {root}; build one with `rag index build --name {name}`", reason="not_found"
        )
    version = check_version(version) if version else available[-1]
    if version not in available:
        raise NotFound(f"index {name!r} has no version {version!r}; it has {', '.join(available)}", reason="not_found")
    directory = (root / name / version).resolve()
    if not directory.is_relative_to(root.resolve()):  # a symlinked version must not lead outside the root
        raise InvalidArgument(f"{name}@{version} resolves outside the index root {root}")
    return directory


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
                f"ivfpq needs at least 9,984 passages per shard (39 per PQ centroid) to train; a shard has {count}: "
                "use flat or hnsw, or fewer shards"
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


_SCHEMA = "CREATE TABLE passages (row INTEGER PRIMARY KEY, id TEXT NOT NULL, title TEXT NOT NULL, text TEXT NOT NULL)"


def _write_staging_store(path: Path, documents: Iterator[Document], passage_words: int) -> int:
    """Every passage of the corpus, in order, into one SQLite file; returns the passage count."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute(_SCHEMA)
        connection.execute("CREATE UNIQUE INDEX passage_ids ON passages (id)")
        count = 0
        batch: list[tuple[int, str, str, str]] = []
        for document in documents:
            for passage in split_passages(document, passage_words):
                batch.append((count, passage.id, passage.title, passage.text))
                count += 1
                if len(batch) == 10_000:
                    _insert(connection, batch)
        _insert(connection, batch)
        if count == 0:
            raise InvalidArgument("the corpus holds no passages")
        return count
    finally:
        connection.close()


def _insert(connection: sqlite3.Connection, batch: list[tuple[int, str, str, str]]) -> None:
    try:
        connection.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)", batch)
        connection.commit()
    except sqlite3.IntegrityError as err:  # name the duplicate id: the batch against itself and what came before
        connection.rollback()
        seen: set[str] = set()
        for _, pid, _, _ in batch:
            if pid in seen or connection.execute("SELECT 1 FROM passages WHERE id = ?", (pid,)).fetchone():
                raise InvalidArgument(f"passage id {pid!r} occurs twice in the corpus; ids must be unique") from err
            seen.add(pid)
        raise
    batch.clear()


def _content_key(title: str, text: str) -> bytes:
    return hashlib.sha1(f"{title}\0{text}".encode()).digest()


class _EmbeddingReuse:
    """Embeddings of an earlier version built by the same encoder, looked up by passage title and text."""

    def __init__(self, version_dir: Path, manifest: Manifest) -> None:
        self.by_content: dict[bytes, tuple[int, int]] = {}
        self.embeddings = []
        for shard in range(manifest.num_shards):
            directory = version_dir / shard_dir(shard)
            self.embeddings.append(np.load(directory / EMBEDDINGS, mmap_mode="r"))
            with sqlite3.connect(f"file:{directory / PASSAGES}?mode=ro", uri=True) as store:
                for row, title, text in store.execute("SELECT row, title, text FROM passages"):
                    self.by_content[_content_key(title, text)] = (shard, row)
        self.source = manifest.ref

    def lookup(self, title: str, text: str) -> np.ndarray | None:
        found = self.by_content.get(_content_key(title, text))
        return None if found is None else self.embeddings[found[0]][found[1]]


def _reusable(root: Path, name: str, encoder: Encoder, reuse_from: str = "") -> _EmbeddingReuse | None:
    """`reuse_from` (NAME[@VERSION]), else the newest version of `name`, if built by this very encoder."""
    candidates = (
        [resolve(root, reuse_from)] if reuse_from else [root / name / v for v in reversed(versions(root, name))]
    )
    for directory in candidates:
        try:
            manifest = Manifest.from_file(directory / MANIFEST)
        except FailedPrecondition:
            continue
        if (
            manifest.encoder.passage_identity == encoder.info.passage_identity
            and manifest.format_version == FORMAT_VERSION
        ):
            return _EmbeddingReuse(directory, manifest)
    if reuse_from:
        raise InvalidArgument(f"cannot reuse embeddings from {reuse_from}: it was built by another encoder")
    return None


def _encode_shard(
    store_path: Path, out: np.ndarray, encoder: Encoder, reuse: _EmbeddingReuse | None, progress: tqdm
) -> int:
    """Fill `out` with the embeddings of the shard's passages; returns how many came from `reuse`."""
    reused = 0
    with sqlite3.connect(store_path) as store:
        count = out.shape[0]
        for start in range(0, count, ENCODE_CHUNK):
            rows = store.execute(
                "SELECT title, text FROM passages WHERE row >= ? AND row < ? ORDER BY row",
                (start, start + ENCODE_CHUNK),
            ).fetchall()
            todo: list[int] = []
            for i, (title, text) in enumerate(rows):
                known = reuse.lookup(title, text) if reuse else None
                if known is None:
                    todo.append(i)
                else:
                    out[start + i] = known
            reused += len(rows) - len(todo)
            progress.update(len(rows) - len(todo))
            if todo:
                encoded = encoder.encode_passages_sorted(
                    [rows[i][0] for i in todo], [rows[i][1] for i in todo], progress
                )
                out[[start + i for i in todo]] = encoded
    return reused


def build_index(
    corpus: Path,
    fmt: str,
    root: Path,
    name: str,
    encoder: Encoder,
    index_type: str = "flat",
    passage_words: int = 100,
    shards: int = 1,
    reuse_embeddings: bool = True,
    reuse_from: str = "",
    show_progress: bool = True,
) -> Manifest:
    """Build and publish a new version of `name`, split into `shards` shards; returns its manifest."""
    check_name(name)
    if not 1 <= shards <= 1024:
        raise InvalidArgument(f"shards must be in [1, 1024], got {shards}")
    (root / name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root / name))
    try:
        staging = tmp / "staging.sqlite"
        count = _write_staging_store(staging, read_documents(corpus, fmt), passage_words)
        if count < shards:
            raise InvalidArgument(f"{count} passages cannot fill {shards} shards")
        bounds = [count * i // shards for i in range(shards + 1)]
        factory = _faiss_factory(index_type, encoder.info.dim, bounds[1] - bounds[0])
        reuse = _reusable(root, name, encoder, reuse_from) if reuse_embeddings else None
        reused = 0
        with tqdm(total=count, desc=f"encoding {name}", unit="passage", disable=not show_progress) as progress:
            for shard in range(shards):
                directory = tmp / shard_dir(shard)
                directory.mkdir()
                with sqlite3.connect(directory / PASSAGES) as store:
                    store.execute(_SCHEMA)
                    store.execute("ATTACH DATABASE ? AS staging", (str(staging),))
                    store.execute(
                        "INSERT INTO passages SELECT row - ?, id, title, text FROM staging.passages WHERE row >= ? AND row < ?",
                        (bounds[shard], bounds[shard], bounds[shard + 1]),
                    )
                    store.commit()
                    store.execute("DETACH DATABASE staging")
                shape = (bounds[shard + 1] - bounds[shard], encoder.info.dim)
                embeddings = np.lib.format.open_memmap(directory / EMBEDDINGS, mode="w+", dtype=np.float32, shape=shape)
                reused += _encode_shard(directory / PASSAGES, embeddings, encoder, reuse, progress)
                embeddings.flush()
                if factory:
                    _write_ann(directory / ANN, np.ascontiguousarray(embeddings), factory)
                del embeddings
        staging.unlink()
        if reuse is not None:
            log.info("reused the embeddings of %d of %d passages from %s", reused, count, reuse.source)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = Manifest(
            name=name,
            version="",
            format_version=FORMAT_VERSION,
            index_type=index_type,
            faiss_factory=factory,
            metric="inner_product",
            dim=encoder.info.dim,
            count=count,
            num_shards=shards,
            shard_counts=[bounds[i + 1] - bounds[i] for i in range(shards)],
            encoder=encoder.info,
            corpus={"path": str(corpus.resolve()), "format": fmt, "sha256": sha256_file(corpus)},
            checksums={f: sha256_file(tmp / f) for f in files},
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            embeddings_reused={"from": reuse.source, "passages": reused} if reuse else {},
        )
        return _publish(tmp, root, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_ann(path: Path, vectors: np.ndarray, factory: str) -> None:
    ann = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not ann.is_trained:
        ann.train(vectors[np.random.default_rng(0).permutation(len(vectors))[: 256 * 1024]])
    ann.add(vectors)
    faiss.write_index(ann, str(path))


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


class IndexShard:
    """One shard of one version, loaded and validated; read-only and safe to search from many threads."""

    def __init__(self, version_dir: Path, shard: int, verify_checksums: bool = True, mmap_ann: bool = False) -> None:
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
        required = {f"{shard_dir(shard)}/{f}" for f in (PASSAGES, EMBEDDINGS) + ((ANN,) if m.faiss_factory else ())}
        missing = sorted(f for f in required if not (version_dir / f).is_file())
        if missing or not required <= set(expected):
            raise FailedPrecondition(
                f"{where}: missing {', '.join(missing or sorted(required - set(expected)))}", reason="missing_file"
            )
        if verify_checksums:
            for file, digest in sorted(expected.items()):
                if sha256_file(version_dir / file) != digest:
                    raise FailedPrecondition(
                        f"{where}: checksum mismatch for {file}; the file is corrupt or was changed", reason="checksum"
                    )
        count = m.shard_counts[shard]
        try:
            self.embeddings = np.load(directory / EMBEDDINGS, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise FailedPrecondition(f"{where}: {EMBEDDINGS} is unreadable ({err})") from err
        if self.embeddings.shape != (count, m.dim) or self.embeddings.dtype != np.float32:
            raise FailedPrecondition(
                f"{where}: embeddings are {self.embeddings.shape} {self.embeddings.dtype}, the manifest says ({count}, {m.dim}) float32",
                reason="shape",
            )
        self.ann = None
        if m.faiss_factory:
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap_ann else 0
            self.ann = faiss.read_index(str(directory / ANN), flags)
            if self.ann.ntotal != count or self.ann.d != m.dim:
                raise FailedPrecondition(
                    f"{where}: {ANN} holds {self.ann.ntotal}x{self.ann.d}, the manifest says {count}x{m.dim}",
                    reason="shape",
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

    @property
    def ref(self) -> str:
        return self.manifest.ref

    def close(self) -> None:
        self._store.close()

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k by inner product for each query row, best first."""
        k = min(k, self.count)
        if self.ann is None:
            return _exact_top_k(self.embeddings, queries, k)
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
