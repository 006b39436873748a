"""The admin token: one shared secret for admin RPCs, sent as `authorization: Bearer <token>` metadata.

The token comes from RAG_ADMIN_TOKEN or a mounted secret file (--admin-token-file); a service without one
refuses every admin RPC. Comparison is constant-time; logs name a caller by peer and token fingerprint,
never by the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import grpc

from rag.errors import FailedPrecondition, Unauthenticated


def load_admin_token(token: str, token_file: str) -> str:
    """The configured token ("" when admin RPCs are off); a file wins over the environment."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            raise FailedPrecondition(f"cannot read the admin token file {token_file}: {err}") from err
        if not token:
            raise FailedPrecondition(f"the admin token file {token_file} is empty")
    return token.strip()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the admin token."""
    return (("authorization", f"Bearer {token}"),)


def presented_token(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return ""


def require_admin(context: grpc.aio.ServicerContext, expected: str) -> str:
    """UNAUTHENTICATED unless the call carries the admin token; returns who called, for the audit log."""
    if not expected:
        raise Unauthenticated(
            "admin RPCs are disabled here: start the service with RAG_ADMIN_TOKEN or --admin-token-file"
        )
    presented = presented_token(context)
    if not presented:
        raise Unauthenticated("admin RPCs need `authorization: Bearer <token>` metadata (rag reads RAG_ADMIN_TOKEN)")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise Unauthenticated("the admin token is not valid")
    return f"{context.peer()} (token sha256:{hashlib.sha256(presented.encode()).hexdigest()[:12]})"
