"""The gateway's view of the retriever tier: shards (each a set of replicas) and their endpoints.

Search goes to one replica per shard (round robin), all shards in parallel; the results merge into one top-k
by score. Hybrid search asks each shard for all its fusion candidates and fuses their union again, which gives
what one shard holding every passage would (rag.fusion). Every answer comes from one index version on all shards: while a swap is being activated some
shards may already serve the new version, so shards that answered from another version are asked again,
pinned to the version most shards answered from (both versions are resident everywhere during a swap).
Admin calls go to every replica individually.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections import Counter
from dataclasses import dataclass

import grpc

from rag.clients import Backend, downstream_error
from rag.errors import FailedPrecondition, InvalidArgument, RagError
from rag.fusion import Fusion
from rag.index_ref import IndexRef
from rag.tls import ClientTLS
from rag.types import Passage, RetrievalMode, Retrieved, to_pb_or_unset
from rag.v1 import index_admin_pb2_grpc, retriever_pb2, retriever_pb2_grpc

DNS_PREFIX = "dns:///"


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix(DNS_PREFIX).rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"retriever address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@dataclass
class Shard:
    index: int
    replicas: list[str]  # as configured: "host:port" each, or one DNS name standing for every replica
    backend: Backend[retriever_pb2_grpc.RetrieverServiceAsyncStub]

    async def endpoints(self) -> list[str]:
        """Every replica's own address: DNS names resolved now (pods come and go)."""
        found: list[str] = []
        loop = asyncio.get_running_loop()
        for replica in self.replicas:
            host, port = _split_host_port(replica)
            if _is_ip(host):
                found.append(replica.removeprefix(DNS_PREFIX))
                continue
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as err:
                raise RagError(f"cannot resolve retriever {replica}: {err}", code=grpc.StatusCode.UNAVAILABLE) from err
            for info in infos:
                ip = str(info[4][0])
                found.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
        return sorted(set(found))


def _channel_target(replicas: list[str]) -> str:
    """One load-balanced target for a shard: a DNS name as given, or the listed IP addresses."""
    if len(replicas) == 1:
        return replicas[0]
    hosts = [_split_host_port(r)[0] for r in replicas]
    if not all(_is_ip(h) and ipaddress.ip_address(h).version == 4 for h in hosts):
        raise InvalidArgument("list replicas of one shard as IPv4 addresses, or give one DNS name for all of them")
    return "ipv4:" + ",".join(replicas)


class RetrieverTier:
    def __init__(self, spec: str, tls: ClientTLS | None = None) -> None:
        self.tls = tls
        shards = [s.strip() for s in spec.split(",") if s.strip()]
        if not shards:
            raise InvalidArgument("no retrievers configured (--retrievers)")
        self.shards = []
        for i, shard in enumerate(shards):
            replicas = [r.strip() for r in shard.split("|") if r.strip()]
            backend = Backend(_channel_target(replicas), tls, retriever_pb2_grpc.RetrieverServiceStub)
            self.shards.append(Shard(i, replicas, backend))
        self._admin: dict[str, Backend[index_admin_pb2_grpc.IndexAdminServiceAsyncStub]] = {}

    def admin(self, endpoint: str) -> index_admin_pb2_grpc.IndexAdminServiceAsyncStub:
        if endpoint not in self._admin:
            self._admin[endpoint] = Backend(endpoint, self.tls, index_admin_pb2_grpc.IndexAdminServiceStub)
        return self._admin[endpoint]()

    async def endpoints(self) -> list[str]:
        """Every retriever replica of every shard (each reports its own shard in its status)."""
        per_shard = await asyncio.gather(*(s.endpoints() for s in self.shards))
        return [e for found in per_shard for e in found]

    async def _search_shard(
        self, shard: Shard, request: retriever_pb2.SearchRequest, timeout: float, pin: str = ""
    ) -> retriever_pb2.SearchResponse:
        """One shard's reply (protobuf: merging needs its shard fields and versions as sent)."""
        pinned = retriever_pb2.SearchRequest()
        pinned.CopyFrom(request)
        pinned.index_version = pin
        try:
            reply = await shard.backend().Search(pinned, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise downstream_error(f"retriever shard {shard.index}", err) from err
        if reply.num_shards != len(self.shards) or reply.shard != shard.index:
            raise FailedPrecondition(
                f"the retriever configured as shard {shard.index} of {len(self.shards)} serves shard {reply.shard} "
                f"of {reply.num_shards} of {reply.index_version}; fix the gateway's --retrievers order"
            )
        return reply

    async def search(self, question: str, k: int, timeout: float, mode: RetrievalMode | None = None) -> Retrieved:
        """Top-k passages over all shards, all from one index version; `mode` None: the retrievers' default."""
        request = retriever_pb2.SearchRequest(
            questions=[question], k=k, retrieval=to_pb_or_unset(mode), fusion_candidates=len(self.shards) > 1
        )
        for attempt in range(3):
            replies = await asyncio.gather(*(self._search_shard(s, request, timeout) for s in self.shards))
            versions = [r.index_version for r in replies]
            if len(set(versions)) > 1:  # a swap is being activated: ask the others for the majority's version
                chosen = Counter(versions).most_common(1)[0][0]
                try:
                    replies = await asyncio.gather(
                        *(
                            _done(r)
                            if r.index_version == chosen
                            else self._search_shard(s, request, timeout, pin=chosen)
                            for s, r in zip(self.shards, replies, strict=True)
                        )
                    )
                except RagError as err:  # that version was released meanwhile: the swap has finished, ask again
                    if err.code != grpc.StatusCode.FAILED_PRECONDITION or attempt == 2:
                        raise
                    continue
            served = RetrievalMode.from_pb(replies[0].retrieval) or RetrievalMode.DENSE
            found = [[Passage.from_pb(p) for p in r.results[0].passages] for r in replies]
            passages = Fusion.from_pb(replies[0].fusion).merge(found, k, served)
            return Retrieved(
                tuple(passages), IndexRef.parse(replies[0].index_version), replies[0].score_temperature, served
            )
        raise AssertionError("unreachable")


async def _done(reply: retriever_pb2.SearchResponse) -> retriever_pb2.SearchResponse:
    return reply
