"""Admission control: the gateway sheds load before doing any work.

Without it, a request past the generator's capacity was refused only after retrieval had run, so under overload
the retrievers spent their time on answers that were never generated and successful throughput fell. Here at
most `limit` Asks are in progress at once, up to `queue` more wait for a slot in arrival order, and the rest get
RESOURCE_EXHAUSTED at once (clients retry with backoff).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from rag import metrics
from rag.errors import ResourceExhausted


class Admission:
    def __init__(self, limit: int, queue: int) -> None:
        if limit < 1 or queue < 0:
            raise ValueError(f"admission needs limit >= 1 and queue >= 0, got {limit} and {queue}")
        self.limit, self.queue = limit, queue
        self._slots = asyncio.Semaphore(limit)
        self.waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the `limit` slots for the block, waiting in line when there is room in the queue."""
        if self._slots.locked() and self.waiting >= self.queue:
            metrics.ASKS_SHED.inc()
            raise ResourceExhausted(
                f"the gateway is at capacity ({self.limit} questions in progress, {self.waiting} waiting); "
                "retry with backoff"
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
