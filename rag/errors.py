"""Domain errors, each carrying the gRPC status a client should see.

Services raise these; one interceptor (rag.serving) turns them into statuses. Anything else is a bug and
becomes INTERNAL.
"""

from __future__ import annotations

import grpc


class RagError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "other"  # a short fixed label for metrics, where the raiser knows one (never user text)

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if reason:
            self.reason = reason


class InvalidArgument(RagError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RagError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(RagError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(RagError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RagError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(RagError):
    """A concurrency conflict: another change (a newer index swap) came first."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(RagError):
    code = grpc.StatusCode.UNAUTHENTICATED


def require(condition: bool, message: str) -> None:
    """Validate a request field: INVALID_ARGUMENT with `message` when `condition` is false."""
    if not condition:
        raise InvalidArgument(message)


class DeadlineExceeded(RagError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(RagError):
    code = grpc.StatusCode.CANCELLED
