"""The model's thread, and batching. torch already uses every core for one forward pass, so one thread runs the
model, and concurrent requests share its passes:
- decoder-only generators batch continuously (generator_svc.joint): a request joins the passes of those in
  flight at the next step boundary, whatever its options, and leaves when it ends;
- encoder-decoders batch whole requests: Generate and GenerateStream requests that wait together and decode alike
  (same mode, beams, lengths and passage count) run as one batch, the RAG math batched over their questions.
A streamed request gets its question's tokens as they are chosen.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from generator_svc.joint import JointDecoder, joins
from generator_svc.model import RagModel
from generator_svc.passage_lm import DecodingStopped, PassageLM, Watch
from generator_svc.requests import Request
from rag import metrics
from rag.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


def batch_key(request: Request) -> tuple[Any, ...]:
    """Requests with equal keys decode alike and can share a batch."""
    o = request.options
    return (
        o.mode,
        o.thorough,
        o.num_beams,
        o.num_return_sequences,
        o.max_new_tokens,
        request.n_docs,
    )


@dataclass(frozen=True)
class Decode:
    """A Generate or GenerateStream request: decoded in a batch with the others that decode alike."""

    request: Request
    on_token: Callable[[int], None] | None = None  # a stream's: each token chosen for its question (greedy)
    streamed: list[int] = field(default_factory=list)  # the tokens `on_token` has had (a stream's text so far)


@dataclass(frozen=True)
class Call:
    """Work that runs alone (Score), with a watch that stops it when its caller goes away."""

    run: Callable[[RagModel, Watch], Any]


@dataclass
class Job:
    """Work for the model thread. `cancelled` is set when the caller goes away."""

    future: asyncio.Future[Any]
    deadline: float | None
    work: Decode | Call
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys share a batch; a Call shares with nothing."""
        return batch_key(self.work.request) if isinstance(self.work, Decode) else None

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        error = _as_status(error) if error is not None else None

        def done() -> None:
            if self.future.done():
                return
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

        self.future.get_loop().call_soon_threadsafe(done)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def stopped(self, started: bool = True) -> Exception:
        """Why its work was stopped, or (not `started`) never began: its deadline passed (DEADLINE_EXCEEDED, even
        when the server notices it just before the caller's own clock does), or its caller cancelled it."""
        if self.expired():
            if started:
                return DeadlineExceeded("the deadline passed while the model worked on the request; it was stopped")
            return DeadlineExceeded("the deadline passed while the request waited for the model")
        if started:
            return Cancelled("the caller cancelled the request; its work was stopped")
        return Cancelled("the caller cancelled the request while it waited for the model")

    def abandoned(self) -> bool:
        """Nobody waits for the result any more: cancelled, or past its deadline."""
        return self.cancelled.is_set() or self.expired()

    def drop_if_abandoned(self) -> bool:
        """Settle the job, taken from the queue, with no model work where nobody waits for it any more (a caller
        that went away while its request waited would otherwise cost its prompts' work); whether it was."""
        if not self.abandoned():
            return False
        error = self.stopped(started=False)
        metrics.REQUESTS_DROPPED.labels("deadline" if isinstance(error, DeadlineExceeded) else "cancelled").inc()
        self.settle(error=error)
        return True


def _as_status(error: BaseException) -> BaseException:
    """Running out of memory is load, not a bug: RESOURCE_EXHAUSTED (a client may retry), not INTERNAL. CUDA raises
    torch.OutOfMemoryError; the CPU allocator a RuntimeError that says so."""
    if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
        return ResourceExhausted(
            f"the generator ran out of memory for this request ({str(error)[:200]}); retry later, or ask with fewer "
            "passages or new tokens"
        )
    return error


def batch_watch(jobs: list[Job]) -> Watch:
    """A watch that ends the work between two model passes once every job of the batch is abandoned, and hands
    each streamed job its question's token at every greedy step. A job decoded again (alone, after its batch
    failed) gets the same tokens again: those its stream has sent are not sent twice."""
    streams = [(i, job.work) for i, job in enumerate(jobs) if isinstance(job.work, Decode) and job.work.on_token]
    steps = 0

    def watch(tokens: torch.Tensor | None) -> None:
        nonlocal steps
        if all(job.abandoned() for job in jobs):
            raise DecodingStopped
        if tokens is None:
            return
        for i, work in streams:
            token = int(tokens[i])
            if steps < len(work.streamed):
                if token != work.streamed[steps]:
                    raise Unavailable("decoding this streamed answer again gave other tokens than those sent; retry")
                continue
            work.streamed.append(token)
            assert work.on_token is not None
            work.on_token(token)
        steps += 1

    return watch


class ModelWorker:
    """The model's thread: admits jobs into the passes in flight (decoder-only), or takes the oldest job and with
    it every waiting job of the same batch key. At most `max_batch` requests are decoded together."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.model: RagModel | None = None
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []  # taken from the queue but left for a later batch
        self._joint: JointDecoder | None = None
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _take(self, block: bool) -> None:
        """Move what is queued to the waiting list (first waiting for one job, when `block`)."""
        if block:
            self._waiting.append(self._jobs.get())
        while True:  # everything queued now is a candidate
            try:
                self._waiting.append(self._jobs.get_nowait())
            except queue.Empty:
                break

    def _next_batch(self) -> list[Job]:
        self._take(block=not self._waiting)
        first = self._waiting.pop(0)
        if first.key is None:
            return [first]
        batch = [first]
        for job in list(self._waiting):
            if len(batch) == self.max_batch:
                break
            if job.key == first.key:
                batch.append(job)
                self._waiting.remove(job)
        return batch

    def _run(self) -> None:
        while True:
            try:
                if self._joint is None and self.model is not None and joins(self.model.lm):
                    self._joint = JointDecoder(self.model.lm)
                if self._joint is not None:
                    self._advance(self._joint)
                else:
                    self._execute([job for job in self._next_batch() if not job.drop_if_abandoned()])
            except Exception:  # a bug; the thread goes on, or every later request would wait for it forever
                log.exception("the model thread's loop failed; the requests in flight were failed")
                if self._joint is not None:
                    self._joint.fail_all(Unavailable("the generator failed while decoding this request; retry"))
                    self._joint = None

    def _advance(self, joint: JointDecoder) -> None:
        """Admit waiting jobs (while fewer than `max_batch` are in flight), then run one round of the passes."""
        self._take(block=not joint.busy and not self._waiting)
        while self._waiting and len(joint.members) < self.max_batch:
            job = self._waiting.pop(0)
            if not job.drop_if_abandoned():
                joint.add(self._work(job), job.settle)
        if joint.busy:
            joint.advance()

    def _work(self, job: Job) -> Callable[[PassageLM], Any]:
        """What a joined job runs in its thread: its request through the RAG model, on the joined PassageLM."""
        assert self.model is not None
        draft_tokens, watch = self.model.draft_tokens, batch_watch([job])

        def work(lm: PassageLM) -> Any:
            model = RagModel(lm, draft_tokens)
            try:
                if isinstance(job.work, Call):
                    return job.work.run(model, watch)
                return model.generate([job.work.request], watch)[0]
            except DecodingStopped:  # its caller went away: the rows it held leave the passes
                metrics.DECODES_STOPPED.inc()
                raise job.stopped() from None

        return work

    def _execute(self, batch: list[Job]) -> None:
        if not batch:
            return
        model = self.model
        assert model is not None, "jobs are submitted only once the model has loaded"
        try:
            if isinstance(batch[0].work, Call):
                batch[0].settle(batch[0].work.run(model, batch_watch(batch)))
                return
            metrics.GENERATOR_BATCH_SIZE.observe(len(batch))
            requests = [job.work.request for job in batch if isinstance(job.work, Decode)]
            results = model.generate(requests, batch_watch(batch))
            for job, result in zip(batch, results, strict=True):
                job.settle(result)
        except DecodingStopped:  # every caller went away: the model is free for the next batch
            metrics.DECODES_STOPPED.inc()
            for job in batch:
                job.settle(error=job.stopped())
        except Exception as err:  # handed to the waiting RPCs, which report it
            if len(batch) == 1:
                batch[0].settle(error=err)
            else:  # one failing request must not fail the others: run each alone
                for job in batch:
                    self._execute([job])
