"""Client channels: the same options everywhere, round-robin over every address a DNS name resolves to
(a headless Kubernetes Service gives one per pod), so requests spread over replicas."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag.errors import FailedPrecondition, RagError
from rag.tls import ClientTLS

log = logging.getLogger(__name__)
Reply = TypeVar("Reply")
Stub = TypeVar("Stub")
_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_options(max_message_mb: int = 16) -> list[tuple[str, object]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Reconnect within seconds of a backend coming back: grpc's default backoff grows to 120 s, so after a
        # long outage a client kept failing with UNAVAILABLE for up to two minutes after the server was back.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        # Connections of its own: grpc shares them between a process's channels to the same address, so a new
        # channel to a server started again where an old channel still backed off from the one that had gone
        # failed with UNAVAILABLE until that backoff ended.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def aio_channel(address: str, tls: ClientTLS | None = None) -> grpc.aio.Channel:
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(address, tls.credentials(), options=channel_options() + tls.channel_options())
    return grpc.aio.insecure_channel(address, options=channel_options())


class Backend(Generic[Stub]):
    """A long-lived client of one service: `backend()` is its stub. grpc reads channel credentials once, so
    when the client's TLS files change (cert-manager rotates a mounted Secret in place) the channel is made
    again and new calls present the new certificate; calls on the old channel get a grace period to finish."""

    CLOSE_GRACE_S = 60.0

    def __init__(self, address: str, tls: ClientTLS | None, stub: Callable[[grpc.aio.Channel], Stub]) -> None:
        self.address, self.tls, self._make_stub = address, tls, stub
        self._stamp = tls.stamp() if tls is not None and tls.enabled else ()
        self._channel = aio_channel(address, tls)
        self._stub = stub(self._channel)
        self._closing: set[asyncio.Task[None]] = set()

    def __call__(self) -> Stub:
        if self.tls is not None and self.tls.enabled and self.tls.stamp() != self._stamp:
            self._renew()
        return self._stub

    def _renew(self) -> None:
        assert self.tls is not None
        self._stamp = self.tls.stamp()  # tried once per change: the next write changes it again
        try:
            channel = aio_channel(self.address, self.tls)
        except FailedPrecondition as err:  # mid-rotation (a file missing or half written): keep the old one
            log.warning("client TLS files changed but cannot be read yet (%s); keeping the previous ones", err)
            return
        old, self._channel = self._channel, channel
        self._stub = self._make_stub(channel)
        closing = asyncio.get_running_loop().create_task(old.close(grace=self.CLOSE_GRACE_S))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        log.info("client TLS files changed: new calls to %s present the new certificate", self.address)


def channel(address: str, tls: ClientTLS | None = None) -> grpc.Channel:
    if tls is not None and tls.enabled:
        return grpc.secure_channel(address, tls.credentials(), options=channel_options() + tls.channel_options())
    return grpc.insecure_channel(address, options=channel_options())


def downstream_error(service: str, err: grpc.RpcError) -> RagError:
    """A failed call to another service, reported with its own status code and the service that failed."""
    return RagError(f"{service}: {err.details()}", code=err.code())


def call(address: str, rpc: Callable[[grpc.Channel], Reply], tls: ClientTLS | None = None) -> Reply:
    """One call from a command-line client, e.g. `call(addr, lambda ch: Stub(ch).Rpc(request, timeout=10))`;
    a failure becomes a RagError carrying the server's status."""
    try:
        with channel(address, tls) as ch:
            return rpc(ch)
    except grpc.RpcError as err:
        raise client_error(address, err) from err


def stream(
    address: str, rpc: Callable[[grpc.Channel], Iterable[Reply]], tls: ClientTLS | None = None
) -> Iterator[Reply]:
    """The replies of one server-streaming call from a command-line client, as they come; a failure becomes a
    RagError carrying the server's status."""
    try:
        with channel(address, tls) as ch:
            yield from rpc(ch)
    except grpc.RpcError as err:
        raise client_error(address, err) from err


_NEXT_STEP = {
    grpc.StatusCode.UNAVAILABLE: "is the service running there? (`rag up` starts one; --gateway or RAG_GATEWAY "
    "picks the address)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "it did not answer in time; raise --timeout, or retry when it is less busy",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "it is overloaded; retry shortly",
    grpc.StatusCode.UNAUTHENTICATED: "set RAG_ADMIN_TOKEN or --admin-token-file to the service's admin token",
}


def client_error(address: str, err: grpc.RpcError) -> RagError:
    """What a command-line client reports: the status, the server's message, and what to do next."""
    details = err.details() or ""
    if err.code() is grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or not details):
        details = f"cannot reach {address}"  # grpc's own text names sockets and errno, not the user's problem
    hint = _NEXT_STEP.get(err.code())
    return RagError(f"{err.code().name}: {details}" + (f"; {hint}" if hint else ""), code=err.code())


def health(address: str, timeout: float = 2.0) -> int | None:
    """The service's grpc.health.v1 status (SERVING, NOT_SERVING...), or None when it does not answer in time."""
    try:
        with channel(address) as ch:
            return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status)
    except grpc.RpcError:
        return None


def is_serving(address: str, timeout: float = 2.0) -> bool:
    return health(address, timeout) == health_pb2.HealthCheckResponse.SERVING


def wait_until_serving(address: str, timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_serving(address):
            return True
        time.sleep(poll)
    return False
