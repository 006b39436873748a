"""Gateway settings: each field is a `rag serve gateway` flag with an env mirror."""

from __future__ import annotations

from dataclasses import dataclass

from rag.config import option
from rag.serving import ServerConfig


@dataclass
class GatewayConfig(ServerConfig):
    port: int = option(50051, "gRPC port (0 picks a free one)")
    retrievers: str = option(
        "127.0.0.1:50052",
        "retriever shards in shard order, comma-separated; replicas of a shard joined by '|', or one DNS name "
        "(dns:///name:port) that resolves to every replica",
    )
    generator_address: str = option(
        "127.0.0.1:50053", "generator address (dns:///name:port balances over all its pods)"
    )
    default_k: int = option(5, "passages to retrieve when a request leaves k unset")
    max_k: int = option(50, "largest k a request may ask for")
    timeout_seconds: float = option(120.0, "deadline for a request whose caller set none")
    swap_timeout_seconds: float = option(900.0, "deadline for an index swap (loading large indexes takes time)")
    reconcile_seconds: float = option(
        10.0,
        "how often to bring retrievers serving another version than the last swap's back to it (0: never)",
    )
    admin_token: str = option(
        "", "token for the AdminService RPCs (also sent to retrievers); prefer the env mirror or a file"
    )
    admin_token_file: str = option("", "file holding the admin token (a mounted Kubernetes Secret)")
