"""The admin token: one shared secret for admin RPCs, sent as `authorization: Bearer <token>` metadata.

The token comes from RAG_ADMIN_TOKEN or a mounted secret file (--admin-token-file); a service without one
refuses every admin RPC. Comparison is constant-time; logs name a caller by peer and token fingerprint,
never by the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import deque
from pathlib import Path

import grpc

from rag import metrics
from rag.errors import FailedPrecondition, ResourceExhausted, Unauthenticated

log = logging.getLogger(__name__)


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
    """The token of an `authorization: Bearer <token>` header (the scheme is case-insensitive, RFC 7235)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def fingerprint(token: str) -> str:
    return f"sha256:{hashlib.sha256(token.encode()).hexdigest()[:12]}"


class AdminAuth:
    """Checks admin calls against the configured token. Failed attempts are logged (peer, token fingerprint)
    and limited per client host: after `max_failures` in `window_seconds`, its calls are refused with
    RESOURCE_EXHAUSTED before any comparison, so that guessing the token takes years, not minutes."""

    def __init__(self, expected: str, max_failures: int = 10, window_seconds: float = 60.0) -> None:
        self.expected = expected
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self._failures: dict[str, deque[float]] = {}

    def check(self, context: grpc.aio.ServicerContext) -> str:
        """UNAUTHENTICATED unless the call carries the admin token; returns who called, for the audit log."""
        if not self.expected:
            raise Unauthenticated(
                "admin RPCs are disabled here: start the service with RAG_ADMIN_TOKEN or --admin-token-file"
            )
        peer = context.peer() or "unknown"
        host = peer.rpartition(":")[0] or peer  # "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"
        failures = self._recent_failures(host)
        if len(failures) >= self.max_failures:
            retry = failures[0] + self.window_seconds - time.monotonic()
            raise ResourceExhausted(
                f"{len(failures)} failed admin authentications from {host} in the last {self.window_seconds:.0f}s; "
                f"retry in {retry:.0f}s with the right token"
            )
        presented = presented_token(context)
        if not presented:
            self._failed(host, failures, peer, "no token")
            raise Unauthenticated(
                "admin RPCs need `authorization: Bearer <token>` metadata (rag reads RAG_ADMIN_TOKEN)"
            )
        if not hmac.compare_digest(presented.encode(), self.expected.encode()):
            self._failed(host, failures, peer, f"token {fingerprint(presented)}")
            raise Unauthenticated("the admin token is not valid")
        return f"{peer} (token {fingerprint(presented)})"

    def _recent_failures(self, host: str) -> deque[float]:
        failures = self._failures.get(host, deque())
        while failures and failures[0] < time.monotonic() - self.window_seconds:
            failures.popleft()
        if not failures:
            self._failures.pop(host, None)  # the table holds only the hosts failing now
        return failures

    def _failed(self, host: str, failures: deque[float], peer: str, presented: str) -> None:
        failures.append(time.monotonic())
        self._failures[host] = failures
        metrics.ADMIN_AUTH_FAILURES.inc()
        log.warning(
            "admin authentication failed: %s from %s (%d in %.0fs)", presented, peer, len(failures), self.window_seconds
        )
