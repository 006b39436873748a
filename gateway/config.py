"""Gateway settings: each field is a `rag serve gateway` flag with an env mirror."""

from __future__ import annotations

from dataclasses import dataclass

from rag.config import option
from rag.serving import ServerConfig
from rag.tls import ClientTLS


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
    max_in_flight: int = option(
        16, "Asks in progress at once (retrieval and generation); about the generators' --max-queue in all"
    )
    max_waiting: int = option(16, "Asks waiting for a slot; beyond them, RESOURCE_EXHAUSTED before any work")
    retrieval: str = option(
        "", "dense, lexical or hybrid for Asks that name none; empty: the retrievers' default (their --retrieval)"
    )
    default_k: int = option(5, "passages to retrieve when a request leaves k unset")
    max_k: int = option(50, "largest k a request may ask for")
    timeout_seconds: float = option(120.0, "deadline for a request whose caller set none")
    swap_timeout_seconds: float = option(900.0, "deadline for an index swap (loading large indexes takes time)")
    tls_ca: str = option(
        "",
        "CA (PEM) to verify the retrievers and the generator with; set: call them over TLS, presenting "
        "--tls-cert/--tls-key as the client certificate (mTLS)",
    )
    tls_server_name: str = option("", "name the backends' certificates carry, when their addresses are IPs")
    reconcile_seconds: float = option(
        10.0,
        "how often to bring retrievers serving another version than the last swap's back to it (0: never)",
    )
    admin_token: str = option(
        "", "token for the AdminService RPCs (also sent to retrievers); prefer the env mirror or a file"
    )
    admin_token_file: str = option("", "file holding the admin token (a mounted Kubernetes Secret)")

    def backend_tls(self) -> ClientTLS:
        """How the gateway calls its backends: TLS when --tls-ca is set, with its own certificate as the client's."""
        if not self.tls_ca:
            return ClientTLS()
        return ClientTLS(self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)
