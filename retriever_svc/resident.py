"""The index versions one retriever holds, and the rules for changing them without losing a request.

Triton's model-management rule, applied to indexes: a failed load keeps the old version; a successful one
replaces it without loss of availability; in-flight requests finish on the version they started with.

- at most two versions are resident: the active one, and one other that is either *staged* (loaded and
  validated, waiting for activation) or *previous* (kept after an activation until the gateway has switched
  every shard and releases it, so that requests pinned to it still find it);
- loading validates everything (manifest, checksums, dimension and encoder identity, a smoke search)
  before the version is staged; any failure leaves the retriever as it was;
- activation is one pointer swap under a lock;
- each request holds its version for its whole duration; a version that stops being resident is closed when
  its last request finishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rag import metrics
from rag.errors import Aborted, FailedPrecondition, RagError
from rag.index_ref import IndexRef
from rag.v1 import index_admin_pb2
from retriever_svc.encoders import Encoder
from retriever_svc.layout import resolve
from retriever_svc.search import IndexShard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidentStatus:
    """What one retriever holds, as IndexAdminService.GetIndexStatus reports it."""

    shard: int
    num_shards: int
    active: IndexRef | None
    staged: IndexRef | None
    previous: IndexRef | None
    active_passages: int
    in_flight: dict[IndexRef, int]
    swap_generation: int = 0

    def to_pb(self) -> index_admin_pb2.IndexStatus:
        return index_admin_pb2.IndexStatus(
            shard=self.shard,
            num_shards=self.num_shards,
            active_version=str(self.active or ""),
            staged_version=str(self.staged or ""),
            previous_version=str(self.previous or ""),
            active_passages=self.active_passages,
            in_flight={str(ref): count for ref, count in self.in_flight.items()},
            swap_generation=self.swap_generation,
        )


@dataclass
class Resident:
    index: IndexShard
    in_flight: int = 0
    retired: bool = False


def check_compatible(encoder: Encoder, index: IndexShard) -> None:
    """The index's vectors must come from the document side of this question encoder: the same encoder that
    built it, or a question tower fine-tuned against the encoder that built it."""
    built_by, ours = index.manifest.encoder, encoder.info
    same_encoder = ours.question_identity == built_by.question_identity
    same_documents = bool(ours.passage_identity) and ours.passage_identity == built_by.passage_identity
    if not (same_encoder or same_documents):
        raise FailedPrecondition(
            f"{index.ref} was built with a different encoder, {built_by.spec!r} ({built_by.passage_identity[:12]}); "
            f"this retriever runs {ours.spec!r}, whose document encoder is "
            f"{ours.passage_identity[:12] or 'unknown'}: serve it with the encoder that built the index, or a "
            "query encoder fine-tuned against that one",
            reason="encoder",
        )
    if ours.dim != index.manifest.dim:
        raise FailedPrecondition(
            f"{index.ref} has dimension {index.manifest.dim}; the encoder produces {ours.dim}", reason="dimension"
        )


class ResidentIndexes:
    def __init__(
        self, encoder: Encoder, root: Path, shard: int, verify_checksums: bool = True, mmap: bool = False
    ) -> None:
        self.encoder = encoder
        self.root = root
        self.shard = shard
        self.verify_checksums = verify_checksums
        self.mmap = mmap
        self._lock = threading.Lock()  # guards the fields below; held only for pointer updates
        self._load_lock = threading.Lock()  # one load at a time
        self.active: Resident | None = None
        self.other: Resident | None = None
        self.other_is_staged = False
        self.swap_generation = 0  # of the swap that activated `active` (0: none did)

    # -------------------------------------------------------------------------------------------- serving

    @contextmanager
    def acquire(self, ref: IndexRef | None = None) -> Iterator[IndexShard]:
        """The active version, or the resident version `ref`; held until the block ends."""
        with self._lock:
            entry = self._find(ref) if ref else self.active
            if entry is None:
                resident = ", ".join(str(e.index.ref) for e in (self.active, self.other) if e) or "none"
                raise FailedPrecondition(
                    f"index version {ref or '(active)'} is not resident on this retriever (resident: {resident})"
                )
            entry.in_flight += 1
        try:
            yield entry.index
        finally:
            with self._lock:
                entry.in_flight -= 1
                close = entry.retired and entry.in_flight == 0
            if close:
                entry.index.close()

    def _find(self, ref: IndexRef) -> Resident | None:
        return next((e for e in (self.active, self.other) if e is not None and e.index.ref == ref), None)

    # -------------------------------------------------------------------------------------------- lifecycle

    def load(self, ref: IndexRef) -> IndexShard:
        """Load and validate `ref` next to the active version (staged). A version already resident is not
        loaded again, but its files are checked again (with --verify-checksums): a swap to it must fail if they
        changed on disk."""
        with self._load_lock:
            with self._lock:
                found = self._find(ref)
                if found is not None and found is self.other:
                    self.other_is_staged = True
            if found is not None:
                if self.verify_checksums:
                    found.index.verify_files()
                return found.index
            with self._lock:
                evicted, self.other = self.other, None  # stay within two resident versions while loading
            if evicted is not None:
                self._retire(evicted)
            started = time.perf_counter()
            try:
                index = self._open_validated(ref)
            except RagError as err:
                metrics.INDEX_LOAD_FAILURES.labels(err.reason).inc()
                log.warning("loading %s failed: %s", ref, err)
                raise
            with self._lock:
                self.other, self.other_is_staged = Resident(index), True
            log.info(
                "loaded %s shard %d (%d passages) in %.2fs", ref, self.shard, index.count, time.perf_counter() - started
            )
            return index

    def _open_validated(self, ref: IndexRef) -> IndexShard:
        index = IndexShard(resolve(self.root, ref), self.shard, self.verify_checksums, self.mmap)
        try:
            check_compatible(self.encoder, index)
            hits = index.search(self.encoder.encode_questions(["smoke test"]), 1)
            if not hits or not hits[0] or not index.passages(hits[0], with_embeddings=False):
                raise FailedPrecondition(f"{index.ref}: the smoke search found nothing", reason="smoke_search")
        except BaseException:
            index.close()
            raise
        return index

    def activate(self, ref: IndexRef, swap_generation: int = 0) -> IndexRef | None:
        """Make the resident version `ref` active for swap `swap_generation` (0: none); returns the version that
        was active before. An activation older than the swap that made the active version is refused: a newer
        swap, through any gateway, came first."""
        with self._lock:
            if swap_generation and swap_generation < self.swap_generation:
                raise Aborted(
                    f"a newer swap (generation {self.swap_generation}) made {self.active_ref()} active here; the "
                    f"activation of {ref} (generation {swap_generation}) is stale",
                    reason="stale_swap",
                )
            if self.active is not None and self.active.index.ref == ref:
                self.swap_generation = swap_generation
                return ref
            if self.other is None or self.other.index.ref != ref:
                raise FailedPrecondition(f"{ref} is not loaded on this retriever; load it first")
            previous = self.active
            self.active, self.other, self.other_is_staged = self.other, previous, False
            self.swap_generation = swap_generation
        if previous is not None:
            try:
                metrics.INDEX_INFO.remove(previous.index.manifest.name, previous.index.manifest.version)
            except KeyError:  # a previous version of another name, never exported here
                pass
        metrics.INDEX_INFO.labels(self.active.index.manifest.name, self.active.index.manifest.version).set(1)
        log.info("activated %s (previous: %s)", ref, previous.index.ref if previous else "none")
        return previous.index.ref if previous else None

    def active_ref(self) -> IndexRef | None:
        return self.active.index.ref if self.active else None

    def unload(self, ref: IndexRef) -> None:
        """Release a staged version (an aborted swap) or the previous one (a finished swap); not the active one."""
        with self._lock:
            if self.active is not None and self.active.index.ref == ref:
                raise FailedPrecondition(f"{ref} is active; swap to another version first")
            dropped = self.other if self.other is not None and self.other.index.ref == ref else None
            if dropped is not None:
                self.other = None
        if dropped is not None:
            self._retire(dropped)

    def _retire(self, entry: Resident) -> None:
        with self._lock:
            entry.retired = True
            close = entry.in_flight == 0
        if close:
            entry.index.close()

    def status(self) -> ResidentStatus:
        with self._lock:
            active, other, staged = self.active, self.other, self.other_is_staged
            swap_generation = self.swap_generation
            in_flight = {e.index.ref: e.in_flight for e in (active, other) if e is not None}
        return ResidentStatus(
            shard=self.shard,
            num_shards=active.index.manifest.num_shards if active else 0,
            active=active.index.ref if active else None,
            staged=other.index.ref if other and staged else None,
            previous=other.index.ref if other and not staged else None,
            active_passages=active.index.count if active else 0,
            in_flight=in_flight,
            swap_generation=swap_generation,
        )
