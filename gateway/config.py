"""Gateway settings: each field is a `rag serve gateway` flag with an env mirror."""

from __future__ import annotations

from dataclasses import dataclass

from rag.config import option
from rag.serving import ServerConfig


@dataclass
class GatewayConfig(ServerConfig):
    port: int = option(50051, "gRPC port (0 picks a free one)")
    retriever_address: str = option("127.0.0.1:50052", "retriever address (dns:///name:port balances over all its pods)")
    generator_address: str = option("127.0.0.1:50053", "generator address (dns:///name:port balances over all its pods)")
    default_k: int = option(5, "passages to retrieve when a request leaves k unset")
    max_k: int = option(50, "largest k a request may ask for")
    timeout_seconds: float = option(120.0, "deadline for a request whose caller set none")
