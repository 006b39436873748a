"""The admin token: one shared secret for admin RPCs, sent as `authorization: Bearer <token>` metadata.

The token comes from RAG_ADMIN_TOKEN or a mounted secret file (--admin-token-file); a service without one
refuses every admin RPC. Comparison is constant-time; logs name a caller by peer and token fingerprint,
never by the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import string
import time
from collections import Counter, OrderedDict, deque
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


MIN_TOKEN_BITS = 128
_HEX = (frozenset("0123456789abcdef"), frozenset("0123456789ABCDEF"))
_BASE64 = frozenset(string.ascii_letters + string.digits + "+/-_=")


def token_bits(token: str) -> float:
    """An upper estimate of a token's entropy, which catches short and patterned tokens (not dictionary words):
    its length times the bits a character of its alphabet carries (hex 4, base64 6, any printable 6.6), and
    nothing for characters that repeat like a pattern (under 2.5 bits of Shannon entropy per character; a random
    hex string of 32 characters has 2.8 at the least seen in 100,000)."""
    if not token:
        return 0.0
    counts = Counter(token)
    if -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values()) < 2.5:
        return 0.0
    chars = set(token)
    per_char = 4.0 if any(chars <= hex_ for hex_ in _HEX) else 6.0 if chars <= _BASE64 else math.log2(95)
    return len(token) * per_char


def require_strong(token: str) -> None:
    """Refuse to serve admin RPCs with a token that could be guessed: at least MIN_TOKEN_BITS of entropy."""
    bits = token_bits(token)
    if token and bits < MIN_TOKEN_BITS:
        raise FailedPrecondition(
            f"the admin token has about {bits:.0f} bits of entropy; at least {MIN_TOKEN_BITS} are needed: generate one "
            "with `openssl rand -hex 32`"
        )


class _Failures:
    """Failed attempts within a sliding window, per key (a client host, or everyone)."""

    def __init__(self, window_seconds: float, max_keys: int) -> None:
        self.window_seconds = window_seconds
        self.max_keys = max_keys
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def add(self, key: str) -> int:
        """Record a failure of `key` now; how many it has in the window."""
        now = time.monotonic()
        times = self._times.pop(key, deque())
        while times and times[0] < now - self.window_seconds:
            times.popleft()
        times.append(now)
        self._times[key] = times  # most recent last
        while len(self._times) > self.max_keys:  # a flood from many hosts cannot grow the table
            self._times.popitem(last=False)
        return len(times)


class AdminAuth:
    """Checks admin calls against the configured token (at least 128 bits of entropy, so guessing it is
    infeasible at any rate). A call with the right token always passes: a flood of bad tokens from the same
    host (all of loopback under `rag up`, a node's SNAT in a cluster) cannot lock the admin out. Failures are
    counted, logged, and limited per client host and in all: beyond `per_host` (or `total`) in `window_seconds`,
    they get RESOURCE_EXHAUSTED instead of UNAUTHENTICATED and are counted without a log line each."""

    def __init__(self, expected: str, per_host: int = 10, total: int = 60, window_seconds: float = 60.0) -> None:
        require_strong(expected)
        self.expected = expected
        self.per_host, self.total = per_host, total
        self.window_seconds = window_seconds
        self._failures = _Failures(window_seconds, max_keys=10_000)

    def check(self, context: grpc.aio.ServicerContext) -> str:
        """UNAUTHENTICATED unless the call carries the admin token; returns who called, for the audit log."""
        if not self.expected:
            raise Unauthenticated(
                "admin RPCs are disabled here: start the service with RAG_ADMIN_TOKEN or --admin-token-file"
            )
        peer = context.peer() or "unknown"
        presented = presented_token(context)
        if presented and hmac.compare_digest(presented.encode(), self.expected.encode()):
            return f"{peer} (token {fingerprint(presented)})"
        host = peer.rpartition(":")[0] or peer  # "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"
        from_host, in_all = self._failures.add(host), self._failures.add("*")
        throttled = from_host > self.per_host or in_all > self.total
        metrics.ADMIN_AUTH_FAILURES.labels("throttled" if throttled else "refused").inc()
        what = f"token {fingerprint(presented)}" if presented else "no token"
        if not throttled:
            log.warning(
                "admin authentication failed: %s from %s (%d in %.0fs)", what, peer, from_host, self.window_seconds
            )
        elif from_host == self.per_host + 1 or in_all == self.total + 1:
            log.warning(
                "admin authentication failures: %d from %s and %d in all in %.0fs; further ones are counted "
                "(rag_admin_auth_failures_total), not logged, and refused with RESOURCE_EXHAUSTED",
                from_host, host, in_all, self.window_seconds,
            )  # fmt: skip
        if throttled:
            raise ResourceExhausted(
                f"too many failed admin authentications ({from_host} from {host}, {in_all} in all, in the last "
                f"{self.window_seconds:.0f}s); retry later with the right token"
            )
        if not presented:
            raise Unauthenticated(
                "admin RPCs need `authorization: Bearer <token>` metadata (rag reads RAG_ADMIN_TOKEN)"
            )
        raise Unauthenticated("the admin token is not valid")
