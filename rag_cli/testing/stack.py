"""The services in-process on loopback ports (0: free ones), for the tests and `rag bench`.

`rag up` runs them as child processes, as a cluster would; this runs them on one background event loop, so a
test can start exactly the services it needs and reach into them. A `Launcher` remembers what it started and
stops it all in `close()`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import GatewayConfig
from gateway.server import create_server as create_gateway
from generator_svc.config import GeneratorConfig
from generator_svc.server import create_server as create_generator
from rag.serving import Served, ServerConfig, ServerThread
from retriever_svc.config import RetrieverConfig
from retriever_svc.server import create_server as create_retriever

C = TypeVar("C", bound=ServerConfig)


def loopback(config_class: type[C], **fields: Any) -> C:
    """A service config listening on a free loopback port, with metrics off."""
    return config_class(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, **fields})


def address(served: Served) -> str:
    return f"127.0.0.1:{served.port}"


@dataclass
class Stack:
    """A gateway over its retrievers (one per shard) and a generator."""

    retrievers: list[Served]
    generator: Served
    gateway: Served

    @property
    def gateway_address(self) -> str:
        return address(self.gateway)

    @property
    def generator_address(self) -> str:
        return address(self.generator)

    @property
    def retriever_addresses(self) -> list[str]:
        return [address(r) for r in self.retrievers]


class Launcher:
    """Starts services on one event-loop thread (each waits until it has loaded or failed to) and stops them."""

    def __init__(self, thread: ServerThread | None = None) -> None:
        self.owns_thread = thread is None
        self.thread = thread or ServerThread()
        self.started: list[Served] = []

    def _start(self, create: Callable[[C], Coroutine[Any, Any, Served]], config: C) -> Served:
        served = self.thread.start(create, config)
        self.started.append(served)
        return served

    def retriever(self, index_root: Path, index: str = "", **fields: Any) -> Served:
        return self._start(
            create_retriever, loopback(RetrieverConfig, index_root=str(index_root), index=index, **fields)
        )

    def generator(self, model: Path | str, **fields: Any) -> Served:
        """A generator in float32 and drafting nothing unless `dtype` and `draft_tokens` say otherwise: the same
        numbers and passes on every machine (auto picks bfloat16 where the CPU computes in it; -1 drafts what the
        warm-up measured to be fastest)."""
        fields = {"dtype": "float32", "draft_tokens": 0, **fields}
        return self._start(create_generator, loopback(GeneratorConfig, generator=str(model), **fields))

    def gateway(self, retrievers: str, generator: str, **fields: Any) -> Served:
        return self._start(
            create_gateway, loopback(GatewayConfig, retrievers=retrievers, generator_address=generator, **fields)
        )

    def stack(
        self,
        index_root: Path,
        index: str,
        generator_model: Path | str,
        shards: int = 1,
        admin_token: str = "",
        encoder: str = "",
        **generator_fields: Any,
    ) -> Stack:
        """Retrievers for every shard of `index` (question encoder: `encoder`, default the index's), a generator,
        and a gateway over them."""
        retrievers = [
            self.retriever(index_root, index, shard=s, admin_token=admin_token, encoder=encoder) for s in range(shards)
        ]
        generator = self.generator(generator_model, **generator_fields)
        gateway = self.gateway(",".join(address(r) for r in retrievers), address(generator), admin_token=admin_token)
        return Stack(retrievers, generator, gateway)

    def stop(self, served: Served) -> None:
        self.thread.run(served.stop(0))
        self.started.remove(served)

    def close(self) -> None:
        """Stop everything started here, newest first (gateways before what they call)."""
        for served in reversed(list(self.started)):
            self.stop(served)
        if self.owns_thread:
            self.thread.close()
