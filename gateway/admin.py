"""AdminService: swap every retriever to another index version, all or nothing, and report what they hold.

A swap has two phases across every shard and replica: load and validate everywhere, then activate
everywhere. A failure in the first phase aborts the swap (versions loaded so far are unloaded) and every
retriever keeps serving what it served. Activation only switches pointers, so the second phase takes
milliseconds; both versions stay resident on every replica until all have switched, so answers stay on one
version throughout (see gateway.retrievers). Then the old version is released everywhere: each replica
closes it when its in-flight requests have finished. Rollback is a swap back (a reload, validated again).

Gateway replicas share no state but the retrievers'. Each swap gets a generation, newer than every one the
swapping gateway has seen, and each retriever records the generation of the swap that activated its version
(refusing older ones). The newest generation the retrievers hold is the desired version: every gateway's
reconcile loop brings retrievers that serve another (a replica restarted, or missed an activation) to it, so
replicas converge on the last swap made through any of them, a rollback through another replica included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc

from gateway.retrievers import RetrieverTier
from rag import metrics
from rag.auth import AdminAuth, bearer
from rag.clients import downstream_error
from rag.errors import Aborted, RagError, require
from rag.index_ref import IndexRef
from rag.v1 import admin_pb2, admin_pb2_grpc, index_admin_pb2

if TYPE_CHECKING:  # the typed stub exists in the .pyi only
    from rag.v1.index_admin_pb2_grpc import IndexAdminServiceAsyncStub

log = logging.getLogger("rag.audit")
Reply = TypeVar("Reply")
# One IndexAdminService call on one retriever: (stub, timeout, metadata) -> its reply.
AdminCall = Callable[["IndexAdminServiceAsyncStub", float, tuple[tuple[str, str], ...]], Awaitable[Reply]]


def load(ref: IndexRef) -> AdminCall[index_admin_pb2.LoadIndexResponse]:
    request = index_admin_pb2.LoadIndexRequest(index_version=str(ref))
    return lambda stub, timeout, metadata: stub.LoadIndex(request, timeout=timeout, metadata=metadata)


def activate(swap: Swap) -> AdminCall[index_admin_pb2.ActivateIndexResponse]:
    request = index_admin_pb2.ActivateIndexRequest(index_version=str(swap.ref), swap_generation=swap.generation)
    return lambda stub, timeout, metadata: stub.ActivateIndex(request, timeout=timeout, metadata=metadata)


def unload(ref: IndexRef) -> AdminCall[index_admin_pb2.UnloadIndexResponse]:
    request = index_admin_pb2.UnloadIndexRequest(index_version=str(ref))
    return lambda stub, timeout, metadata: stub.UnloadIndex(request, timeout=timeout, metadata=metadata)


@dataclass(frozen=True)
class Swap:
    """A version every retriever is to serve, and the generation of the swap that asked for it."""

    generation: int
    ref: IndexRef

    def key(self) -> tuple[int, str]:
        """Newest first by generation; two swaps numbered alike (made at once) are ordered by version."""
        return self.generation, str(self.ref)

    @classmethod
    def of(cls, status: index_admin_pb2.IndexStatus) -> Swap | None:
        """The swap a retriever's active version came from, if one did."""
        if not status.swap_generation or not status.active_version:
            return None
        return cls(status.swap_generation, IndexRef.parse(status.active_version))


def get_status() -> AdminCall[index_admin_pb2.GetIndexStatusResponse]:
    request = index_admin_pb2.GetIndexStatusRequest()
    return lambda stub, timeout, metadata: stub.GetIndexStatus(request, timeout=timeout, metadata=metadata)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, tier: RetrieverTier, admin_token: str, swap_timeout: float) -> None:
        self.tier = tier
        self.admin_token = admin_token  # also what this gateway presents to the retrievers
        self.auth = AdminAuth(admin_token)
        self.swap_timeout = swap_timeout
        self._swap_lock = asyncio.Lock()  # one swap (or repair) at a time through this gateway
        # The newest swap this gateway knows of, made through it or seen on the retrievers: what they should serve.
        self.desired: Swap | None = None

    def _observe(self, statuses: Iterable[index_admin_pb2.IndexStatus]) -> None:
        for swap in filter(None, map(Swap.of, statuses)):
            if self.desired is None or swap.key() > self.desired.key():
                self.desired = swap

    def _next_generation(self) -> int:
        """Newer than every swap seen (so a swap after another, through any gateway, wins); among swaps made at
        once through different gateways, the clock decides (microseconds)."""
        return max(time.time_ns() // 1000, (self.desired.generation + 1) if self.desired else 1)

    async def _on_all(self, call: AdminCall[Reply], endpoints: list[str], timeout: float) -> list[Reply | RagError]:
        """Make one IndexAdminService call on every endpoint at once; failures are returned, not raised."""
        metadata = bearer(self.admin_token)

        async def one(endpoint: str) -> Reply | RagError:
            try:
                return await call(self.tier.admin(endpoint), timeout, metadata)
            except grpc.aio.AioRpcError as err:
                return downstream_error(f"retriever {endpoint}", err)

        return list(await asyncio.gather(*(one(e) for e in endpoints)))

    async def _statuses(self, timeout: float) -> list[index_admin_pb2.IndexStatus]:
        endpoints = await self.tier.endpoints()
        statuses = []
        for endpoint, reply in zip(endpoints, await self._on_all(get_status(), endpoints, timeout), strict=True):
            if isinstance(reply, RagError):
                raise reply
            reply.status.endpoint = endpoint
            statuses.append(reply.status)
        return statuses

    async def ListIndexStatus(
        self, request: admin_pb2.ListIndexStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListIndexStatusResponse:
        self.auth.check(context)
        return admin_pb2.ListIndexStatusResponse(retrievers=await self._statuses(timeout=30))

    async def SwapIndex(
        self, request: admin_pb2.SwapIndexRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SwapIndexResponse:
        caller = self.auth.check(context)
        require(bool(request.version), "give the version to swap to, e.g. v3")
        wanted = IndexRef(request.name, request.version) if request.name else None  # checked before anyone is asked
        async with self._swap_lock:
            started = time.perf_counter()
            statuses = await self._statuses(timeout=30)
            self._observe(statuses)
            previous = IndexRef.parse(statuses[0].active_version)
            ref = wanted or previous.at(request.version)
            try:
                response = await self._swap(
                    Swap(self._next_generation(), ref), previous, [s.endpoint for s in statuses]
                )
            except RagError as err:
                metrics.INDEX_SWAPS.labels("failed").inc()
                metrics.INDEX_SWAP_SECONDS.labels("failed").observe(time.perf_counter() - started)
                log.warning("index swap by %s: %s -> %s FAILED, nothing changed: %s", caller, previous, ref, err)
                raise
            metrics.INDEX_SWAPS.labels("swapped").inc()
            metrics.INDEX_SWAP_SECONDS.labels("swapped").observe(time.perf_counter() - started)
            log.info(
                "index swap by %s: %s -> %s (generation %d) on %d retrievers (load %.2fs, activate %.3fs)",
                caller, previous, ref, response.swap_generation, response.retrievers, response.load_seconds,
                response.activate_seconds,
            )  # fmt: skip
            return response

    async def reconcile(self) -> list[str]:
        """Bring every retriever that serves another version than the newest swap's (made through any gateway)
        to it: a replica restarted after a swap comes up on its configured version. Returns those repaired."""
        if self._swap_lock.locked():
            return []
        async with self._swap_lock:
            endpoints = await self.tier.endpoints()
            replies = await self._on_all(get_status(), endpoints, 30)
            statuses = [(e, r.status) for e, r in zip(endpoints, replies, strict=True) if not isinstance(r, RagError)]
            self._observe(status for _, status in statuses)
            desired = self.desired
            if desired is None:
                return []
            repaired = []
            for endpoint, status in statuses:
                if Swap.of(status) == desired:
                    continue
                serving = status.active_version
                [loaded] = await self._on_all(load(desired.ref), [endpoint], self.swap_timeout)
                [activated] = (
                    [loaded] if isinstance(loaded, RagError) else await self._on_all(activate(desired), [endpoint], 30)
                )
                if isinstance(activated, RagError):
                    log.warning("retriever %s serves %s, not %s (generation %d), and cannot be moved: %s",
                                endpoint, serving, desired.ref, desired.generation, activated)  # fmt: skip
                    continue
                if serving and serving != str(desired.ref):
                    await self._on_all(unload(IndexRef.parse(serving)), [endpoint], 30)
                log.warning("retriever %s served %s, not %s of the newest swap (generation %d): moved it",
                            endpoint, serving, desired.ref, desired.generation)  # fmt: skip
                metrics.INDEX_SWAPS.labels("repaired").inc()
                repaired.append(endpoint)
            return repaired

    async def reconcile_forever(self, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.reconcile()
            except Exception:
                logging.getLogger(__name__).exception("bug while reconciling the retrievers' index versions")

    async def _swap(self, swap: Swap, previous: IndexRef, endpoints: list[str]) -> admin_pb2.SwapIndexResponse:
        ref = swap.ref
        # Phase 1: load and validate everywhere; any failure aborts with nothing activated.
        started = time.perf_counter()
        loaded, failures = _split(endpoints, await self._on_all(load(ref), endpoints, self.swap_timeout))
        if failures:
            if ref != previous:
                await self._on_all(unload(ref), loaded, 30)
            raise RagError(
                f"swap to {ref} aborted, every retriever still serves {previous}: {failures[0]}", code=failures[0].code
            )
        loaded_at = time.perf_counter()
        # Phase 2: activate everywhere (a pointer swap on each replica).
        done, failures = _split(endpoints, await self._on_all(activate(swap), endpoints, 30))
        stale = [f for f in failures if f.code == grpc.StatusCode.ABORTED]
        if stale:  # a newer swap, through another gateway, came first: the retrievers follow it, not this one
            raise Aborted(f"swap to {ref} superseded by a newer swap made through another gateway: {stale[0]}")
        if failures:  # a replica vanished between the phases: put the others back, as the newest swap
            self.desired = Swap(self._next_generation(), previous)
            await self._on_all(activate(self.desired), done, 30)
            raise RagError(
                f"activating {ref} failed, rolled back to {previous}: {failures[0]}", code=grpc.StatusCode.UNAVAILABLE
            )
        self.desired = swap
        activated_at = time.perf_counter()
        metrics.INDEX_ACTIVATION_SECONDS.observe(activated_at - loaded_at)
        # Phase 3: release the old version everywhere; each replica closes it once its last request ends.
        if previous != ref:
            await self._on_all(unload(previous), endpoints, 30)
        return admin_pb2.SwapIndexResponse(
            index_version=str(ref),
            previous_version=str(previous),
            retrievers=len(endpoints),
            load_seconds=loaded_at - started,
            activate_seconds=activated_at - loaded_at,
            swap_generation=swap.generation,
        )


def _split(endpoints: list[str], replies: list[Reply | RagError]) -> tuple[list[str], list[RagError]]:
    """The endpoints that succeeded, and the errors of those that did not."""
    failures = [r for r in replies if isinstance(r, RagError)]
    return [e for e, r in zip(endpoints, replies, strict=True) if not isinstance(r, RagError)], failures
