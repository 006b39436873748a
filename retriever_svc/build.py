"""Building a new index version from a corpus, published atomically.

A build writes into `<root>/<name>/.tmp-*` and renames it into place when complete, so a loader never sees a
half-written version; a failed build removes its temp directory. Passages whose title and text are unchanged
since the newest version built with the same encoder keep their embeddings, so an update re-encodes only what
changed. Approximate index types also get a faiss index over the embeddings; every version gets a lexical (BM25)
index beside the dense one unless asked not to, published in the same rename and covered by the same checksums.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from rag.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from rag.files import sha256_file
from rag.index_ref import IndexRef
from retriever_svc.corpus import Document, check_passages, read_documents, split_passages
from retriever_svc.encoders import Encoder, load_encoder
from retriever_svc.layout import (
    ANN,
    EMBEDDINGS,
    FORMAT_VERSION,
    MANIFEST,
    PASSAGES,
    PASSAGES_SCHEMA,
    Manifest,
    file_damage,
    resolve,
    shard_dir,
    versions,
)
from retriever_svc.lexical import ANALYZER, build_lexical

log = logging.getLogger(__name__)

ENCODE_CHUNK = 8192  # passages read from the store and encoded per chunk (bounded memory for any corpus)


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


def _write_staging_store(path: Path, passages: Iterator[Document]) -> int:
    """Every passage of the corpus, in order, into one SQLite file; returns the passage count."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute(PASSAGES_SCHEMA)
        connection.execute("CREATE UNIQUE INDEX passage_ids ON passages (id)")
        count = 0
        batch: list[tuple[int, str, str, str]] = []
        for passage in passages:
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


def _reusable(root: Path, name: str, encoder: Encoder, reuse_from: IndexRef | None) -> _EmbeddingReuse | None:
    """`reuse_from` (no version: its newest), else the newest version of `name`, if built by this very encoder."""
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
            problem = _damage(directory, manifest)
            if problem is None:
                return _EmbeddingReuse(directory, manifest)
            if reuse_from:
                raise FailedPrecondition(f"cannot reuse embeddings from {manifest.ref}: {problem}", reason="checksum")
            log.warning(
                "not reusing the embeddings of %s: %s; encoding what an older version cannot give",
                manifest.ref,
                problem,
            )
    if reuse_from:
        raise InvalidArgument(f"cannot reuse embeddings from {reuse_from}: it was built by another encoder")
    return None


def _damage(directory: Path, manifest: Manifest) -> str | None:
    """Why a version's passages and embeddings cannot be reused (None: they can): every file as its manifest's
    checksum says, the embeddings of the shape it says. A damaged version must not pass into the next one."""
    for shard in range(manifest.num_shards):
        for file in (PASSAGES, EMBEDDINGS):
            relative = f"{shard_dir(shard)}/{file}"
            if relative not in manifest.checksums:
                return f"{relative} is not in its manifest"
            damage = file_damage(directory, relative, manifest.checksums[relative])
            if damage is not None:
                return damage[1]
        try:
            embeddings = np.load(directory / shard_dir(shard) / EMBEDDINGS, mmap_mode="r")
        except (ValueError, OSError) as err:
            return f"{shard_dir(shard)}/{EMBEDDINGS} is unreadable ({err})"
        if embeddings.shape != (manifest.shard_counts[shard], manifest.dim) or embeddings.dtype != np.float32:
            return f"{shard_dir(shard)}/{EMBEDDINGS} is {embeddings.shape}, the manifest says ({manifest.shard_counts[shard]}, {manifest.dim})"
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
    reuse_from: IndexRef | None = None,
    show_progress: bool = True,
    lexical: bool = True,
) -> Manifest:
    """Build and publish a new version of `name`, split into `shards` shards; returns its manifest."""
    IndexRef(name)  # validates the name
    if not 1 <= shards <= 1024:
        raise InvalidArgument(f"shards must be in [1, 1024], got {shards}")
    if passage_words < 1:
        raise InvalidArgument(f"--passage-words must be at least 1, got {passage_words}")
    (root / name).mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(root / name)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root / name))
    space = _Space(corpus.stat().st_size, encoder.info.dim, passage_words, lexical)
    with _building(tmp):
        staging = tmp / "staging.sqlite"
        passages = (p for document in read_documents(corpus, fmt) for p in split_passages(document, passage_words))
        with space.writing(staging):
            count = _write_staging_store(staging, check_passages(passages, corpus))
        if count < shards:
            raise InvalidArgument(f"{count} passages cannot fill {shards} shards")
        bounds = [count * i // shards for i in range(shards + 1)]
        factory = _faiss_factory(index_type, encoder.info.dim, bounds[1] - bounds[0])
        space.learned(count, factory, staging.stat().st_size)
        space.check_free(tmp)  # before hours of encoding: the stores, embeddings and ANN index must fit
        reuse = _reusable(root, name, encoder, reuse_from) if reuse_embeddings else None
        reused = 0
        with tqdm(total=count, desc=f"encoding {name}", unit="passage", disable=not show_progress) as progress:
            for shard in range(shards):
                directory = tmp / shard_dir(shard)
                directory.mkdir()
                with space.writing(directory / PASSAGES), sqlite3.connect(directory / PASSAGES) as store:
                    store.execute(PASSAGES_SCHEMA)
                    store.execute("ATTACH DATABASE ? AS staging", (str(staging),))
                    store.execute(
                        "INSERT INTO passages SELECT row - ?, id, title, text FROM staging.passages WHERE row >= ? AND row < ?",
                        (bounds[shard], bounds[shard], bounds[shard + 1]),
                    )
                    store.commit()
                    store.execute("DETACH DATABASE staging")
                shape = (bounds[shard + 1] - bounds[shard], encoder.info.dim)
                with space.writing(directory / EMBEDDINGS):
                    embeddings = _allocated_npy(directory / EMBEDDINGS, shape)
                reused += _encode_shard(directory / PASSAGES, embeddings, encoder, reuse, progress)
                embeddings.flush()
                if factory:
                    with space.writing(directory / ANN):
                        _write_ann(directory / ANN, np.ascontiguousarray(embeddings), factory)
                del embeddings
        staging.unlink()
        with space.writing(tmp):
            lexical_record = build_lexical(
                [_shard_texts(tmp / shard_dir(shard) / PASSAGES) for shard in range(shards)],
                [tmp / shard_dir(shard) for shard in range(shards)],
            ) if lexical else {}  # fmt: skip
        if lexical:
            log.info("lexical index: %(vocabulary)d terms, %(bytes)d bytes in %(build_seconds).2f s", lexical_record)
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
            embeddings_reused={"from": str(reuse.source), "passages": reused} if reuse else {},
            lexical=lexical_record,
        )
        with space.writing(tmp / MANIFEST):
            return _publish(tmp, root, manifest)


def _allocated_npy(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A float32 .npy file of `shape`, mapped for writing, with its disk blocks allocated now: a sparse file
    would be allocated as the map is written, and a full disk then kills the process with SIGBUS."""
    embeddings = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    with path.open("r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that cannot preallocate
                raise
    return embeddings


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file size limit


@dataclasses.dataclass
class _Space:
    """What a build needs on disk, estimated from the corpus and refined once the passages are counted, so that
    a write that fails for lack of space is reported in one line with the space needed."""

    corpus_bytes: int
    dim: int
    passage_words: int
    lexical: bool
    count: int = 0
    ann: bool = True
    store_bytes: int = 0

    def learned(self, count: int, factory: str, staging_bytes: int) -> None:
        self.count, self.ann, self.store_bytes = count, bool(factory), staging_bytes

    def remaining(self) -> int:
        """The shard stores, embeddings and ANN index (about as large as the embeddings) still to write."""
        count = self.count or self.corpus_bytes // (6 * self.passage_words) + 1  # ~6 bytes a word
        vectors = count * self.dim * 4
        return (self.store_bytes or self.corpus_bytes) + vectors * (2 if self.ann else 1)

    def needed(self) -> int:
        """All of it at its peak: the staging store too, and the lexical index (about half the text)."""
        stores = self.store_bytes or self.corpus_bytes
        return stores + self.remaining() + (stores // 2 if self.lexical else 0)

    def message(self, path: Path, reason: str) -> str:
        free = shutil.disk_usage(path.parent if not path.is_dir() else path).free
        return (
            f"cannot write {path} ({reason}): this build needs about {_size(self.needed())} and "
            f"{_size(free)} is free there; free space or build under another --index-root (nothing was published)"
        )

    def check_free(self, tmp: Path) -> None:
        if shutil.disk_usage(tmp).free < self.remaining():
            raise ResourceExhausted(self.message(tmp, f"{_size(self.remaining())} still to write"))

    @contextmanager
    def writing(self, path: Path) -> Iterator[None]:
        """Turn a failed write into one ResourceExhausted line naming `path` when it is for lack of space (an
        OSError, SQLite's full or write error, faiss's write error)."""
        try:
            yield
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            raise ResourceExhausted(self.message(Path(err.filename or path), err.strerror or str(err))) from None
        except sqlite3.OperationalError as err:
            name = getattr(err, "sqlite_errorname", "")
            if name != "SQLITE_FULL" and not name.startswith("SQLITE_IOERR_WRITE"):
                raise
            raise ResourceExhausted(self.message(path, f"{err} ({name})")) from None
        except RuntimeError as err:  # faiss: "... write error in PATH: n != m (strerror)"
            reason = str(err).rpartition("(")[2].rstrip(")")
            if "write error" not in str(err) or reason not in map(os.strerror, NO_SPACE):
                raise
            raise ResourceExhausted(self.message(path, reason)) from None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _shard_texts(store_path: Path) -> Iterator[str]:
    """What the lexical index holds of each passage, in row order: its title and its text."""
    with closing(sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)) as store:
        for title, text in store.execute("SELECT title, text FROM passages ORDER BY row"):
            yield f"{title}\n{text}"


ABANDONED_AFTER_SECONDS = 3600  # a temp directory without a lock file (a build killed before it took one)


@contextmanager
def _building(tmp: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the temp directory while this build runs, so that another build can tell a
    live build's directory from one a killed build left behind; remove both when done."""
    lock = tmp.with_name(tmp.name + ".lock")
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
            lock.unlink(missing_ok=True)


def _remove_abandoned_builds(directory: Path) -> None:
    """Remove the temp directories of builds that were killed (their lock is free, or they never took one)."""
    for tmp in directory.glob(".tmp-*"):
        if not tmp.is_dir():
            continue
        lock = tmp.with_name(tmp.name + ".lock")
        try:
            with lock.open("r+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live build: BlockingIOError
        except BlockingIOError:
            continue
        except FileNotFoundError:
            if time.time() - tmp.stat().st_mtime < ABANDONED_AFTER_SECONDS:
                continue
        log.warning("removing %s, left by a build that did not finish", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)


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


def index_built_from(
    corpus: Path, encoder_spec: str, root: Path, name: str, reuse_from: IndexRef | None = None
) -> IndexRef:
    """The newest version of `name` built from this corpus file with this encoder and with a lexical index, building
    one if there is none
    (with the embeddings of `reuse_from`, or else of the newest version of `name`, where passages match)."""
    corpus_sha = sha256_file(corpus)
    for version in reversed(versions(root, name)):
        try:
            manifest = Manifest.from_file(root / name / version / MANIFEST)
        except FailedPrecondition:  # unreadable (an older format): build anew
            continue
        lexical_current = manifest.lexical.get("analyzer") == ANALYZER
        if manifest.corpus.get("sha256") == corpus_sha and manifest.encoder.spec == encoder_spec and lexical_current:
            log.info("reusing index %s", manifest.ref)
            return manifest.ref
    started = time.perf_counter()
    built = build_index(corpus, "jsonl", root, name, load_encoder(encoder_spec), reuse_from=reuse_from)
    log.info("built %s (%d passages) in %.0f s", built.ref, built.count, time.perf_counter() - started)
    return built.ref
