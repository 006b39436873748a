"""Continuous batching: requests join the rows being decoded at a step boundary and leave when they end.

Each request runs the code it runs alone (RagModel.generate, or a Score call) in a thread of its own, against a
`JoinedLM`: a stand-in for the PassageLM whose model calls become operations the model thread runs. The decoding
passes (`step`, `feed`) of every request in flight wait for each other and run as one forward pass over all their
rows (`Rows`, the union of their decoding states); the other calls (encoding prompts, teacher forcing, one
request's reorder or rewind) run alone, between two passes. A new request is admitted between passes: its prompts
are encoded while the others wait (as TGI's and vLLM's prefill does) and its rows join the next pass. So no
request waits for a running batch to finish, and the RAG math is unchanged: it sees a PassageLM.

The union needs a position per row and a mask over the rows' own cached tokens (rows that joined at different
steps hold different numbers of them, and a request's drafts that were not accepted are masked rather than
cropped): decoder-only LMs, whose positions are explicit. Encoder-decoders (one position counter for all rows)
batch whole requests (generator_svc.worker).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from generator_svc.context_attention import KV, SharedContext
from generator_svc.families import DecoderOnlyLM
from generator_svc.passage_lm import (
    Context,
    Contexts,
    DecodingState,
    PassageLM,
    Watch,
    holding,
    log_softmax,
)
from rag import metrics


def joins(lm: PassageLM) -> bool:
    """Whether requests to this generator can join each other's decoding passes."""
    return isinstance(lm, DecoderOnlyLM)


# ------------------------------------------------------------------------------------------------ the rows


@dataclass(eq=False)  # parts are told apart by identity
class Part:
    """One request's rows in the union: where they read (`context_rows`, into its own Contexts) and the own-cache
    slots of the tokens it was fed (the same for each of its rows)."""

    ctx: Contexts
    context_rows: torch.Tensor
    slots: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.context_rows)


class Rows:
    """The decoding rows of every request in flight, as one DecodingState: their context rows side by side (each
    request's prompts, padded to the longest), their own cached tokens in one cache with `valid` marking the real
    ones, and one position per row."""

    def __init__(self, lm: PassageLM) -> None:
        self.lm = lm
        self.parts: list[Part] = []
        self.state: DecodingState | None = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [R, S]

    def offset(self, part: Part) -> int:
        return sum(p.size for p in self.parts[: self.parts.index(part)])

    def rows_of(self, part: Part) -> torch.Tensor:
        start = self.offset(part)
        return torch.arange(start, start + part.size)

    def join(self, ctx: Contexts, context_rows: torch.Tensor) -> Part:
        part = Part(ctx, context_rows)
        own = self._own()
        S = self.valid.shape[1]
        positions = ctx.attention_mask[context_rows].sum(-1)
        if own is not None and S:
            own = [
                (
                    torch.cat([k, k.new_zeros(part.size, *k.shape[1:])]),
                    torch.cat([v, v.new_zeros(part.size, *v.shape[1:])]),
                )
                for k, v in own
            ]
        valid = torch.cat([self.valid, torch.zeros(part.size, S, dtype=torch.bool)])
        previous = self.state.next_position if self.state is not None else torch.zeros(0, dtype=torch.long)
        parts = [*self.parts, part]
        self._commit(parts, valid, self._state(parts, own if S else None, torch.cat([previous, positions])))
        return part

    def leave(self, part: Part) -> None:
        parts = [p for p in self.parts if p is not part]
        if not parts:
            self._commit([], torch.zeros(0, 0, dtype=torch.bool), None)
            return
        self._select(parts, torch.cat([self.rows_of(p) for p in parts]))

    def keep(self, part: Part, index: torch.Tensor) -> None:
        """Only the part's rows `index` decode on (its row i continues its old row index[i]; see PassageLM.keep)."""
        keep = torch.cat([self.rows_of(p)[index] if p is part else self.rows_of(p) for p in self.parts])
        self._select(self.parts, keep, {part: part.context_rows[index]})

    def _select(
        self, parts: list[Part], keep: torch.Tensor, context_rows: dict[Part, torch.Tensor] | None = None
    ) -> None:
        """The union of `parts` made of the rows `keep` (renumbered in that order; a part's new context rows in
        `context_rows`); own-cache slots no row left needs are dropped."""
        assert self.state is not None
        positions = self.state.next_position[keep]
        own = self._own()
        valid = self.valid[keep]
        columns = valid.any(0)
        renumber = torch.cumsum(columns, 0) - 1
        valid = valid[:, columns]
        if own is not None:
            device_keep, device_columns = keep.to(self.lm.device), columns.to(self.lm.device)
            own = [(k[device_keep][:, :, device_columns], v[device_keep][:, :, device_columns]) for k, v in own]
        changed = context_rows or {}
        state = self._state(parts, own if valid.shape[1] else None, positions, changed)
        self._commit(parts, valid, state)
        for p in parts:
            p.slots = [int(renumber[s]) for s in p.slots]
            p.context_rows = changed.get(p, p.context_rows)

    def _commit(self, parts: list[Part], valid: torch.Tensor, state: DecodingState | None) -> None:
        """Make the union `parts`. Everything is built before this, so a change that fails (out of memory while the
        union's tensors are joined) leaves the union as it was, and the requests in it go on."""
        self.parts, self.valid, self.state = parts, valid, state

    def _own(self) -> KV | None:
        """The rows' own cached keys and values, per layer (None before the first pass)."""
        if self.state is None:
            return None
        layers = [layer for layer in self.state.cache.layers if isinstance(layer, DynamicLayer)]  # all of them
        if not layers or not layers[0].is_initialized:
            return None
        return [(layer.keys, layer.values) for layer in layers if layer.keys is not None and layer.values is not None]

    def _state(
        self,
        parts: list[Part],
        own: KV | None,
        positions: torch.Tensor,
        context_rows: dict[Part, torch.Tensor] | None = None,
    ) -> DecodingState:
        """The decoding state of a union of `parts`: contexts side by side, rows renumbered, the own cache given."""
        width = max(p.ctx.attention_mask.shape[1] for p in parts)
        masks, prefix_parts, rows, base = [], [], [], 0
        for p in parts:
            mask, L = p.ctx.attention_mask, p.ctx.attention_mask.shape[1]
            masks.append(torch.nn.functional.pad(mask, (width - L, 0)))  # left: each prompt ends where it answers
            prefix_parts.append([(_left_pad(k, width), _left_pad(v, width)) for k, v in p.ctx.prefix])
            rows.append((context_rows or {}).get(p, p.context_rows) + base)
            base += len(mask)
        prefix = prefix_parts[0]  # a lone request's prompts, as they are
        if len(parts) > 1:
            prefix = [
                (torch.cat([kv[i][0] for kv in prefix_parts]), torch.cat([kv[i][1] for kv in prefix_parts]))
                for i in range(len(prefix))
            ]
        mask = torch.cat(masks)
        ctx = Contexts(1, len(mask), mask, prefix, torch.empty(0))
        decoder_rows = torch.cat(rows)
        shared = SharedContext(decoder_rows, mask, len(prefix), self.lm.device, prompt=prefix)
        cache: Cache = holding(own) if own is not None else DynamicCache(config=self.lm.model.config)
        return DecodingState(ctx, decoder_rows, cache, shared, mask[decoder_rows], next_position=positions)

    def feed(self, feeds: Sequence[tuple[Part, torch.Tensor]]) -> list[torch.Tensor]:
        """One forward pass: each part's tokens [its rows, T_part] after what its rows hold; log p(next token) after
        each, [its rows, T_part, V]. Every part in the union is fed (the model thread runs a pass once every
        request in it waits for one)."""
        assert self.state is not None and len(feeds) == len(self.parts)
        R, S = self.valid.shape
        T = max(tokens.shape[1] for _, tokens in feeds)
        tokens = torch.full((R, T), self.lm.rules.pad_token_id, dtype=torch.long)
        fed = torch.zeros(R, T, dtype=torch.bool)
        for part, given in feeds:
            rows = self.rows_of(part)
            tokens[rows, : given.shape[1]] = given
            fed[rows, : given.shape[1]] = True
        # Within the pass, causality hides the padding after a part's tokens from them; afterwards it is masked.
        self.state.shared.own_valid = torch.cat([self.valid, torch.ones(R, T, dtype=torch.bool)], 1).to(self.lm.device)
        with torch.inference_mode():
            logits = self.lm._forward(self.state, tokens)
        self.state.shared.own_valid = None
        self.valid = torch.cat([self.valid, fed], 1)
        self.state.next_position = self.state.next_position + fed.sum(1)
        logprobs = log_softmax(logits).cpu()
        out = []
        for part, given in feeds:
            part.slots += list(range(S, S + given.shape[1]))
            out.append(logprobs[self.rows_of(part), : given.shape[1]])
        return out

    def rewind(self, part: Part, fed: int) -> None:
        """Forget the part's tokens after its first `fed` (drafts not accepted): masked, and its positions moved back."""
        assert self.state is not None
        dropped = part.slots[fed:]
        if not dropped:
            return
        rows = self.rows_of(part)
        self.valid[rows[:, None], torch.tensor(dropped)[None, :]] = False
        self.state.next_position[rows] -= len(dropped)
        part.slots = part.slots[:fed]

    def reorder(self, part: Part, index: torch.Tensor) -> None:
        """Row i of the part continues the history of its row index[i] (beam search)."""
        assert self.state is not None
        rows = self.rows_of(part)
        whole = torch.arange(len(self.valid))
        whole[rows] = rows[index]
        if self._own() is not None:
            self.state.cache.reorder_cache(whole.to(self.lm.device))  # type: ignore[arg-type]
        self.valid = self.valid[whole]
        self.state.next_position = self.state.next_position[whole]


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """[C, heads, L, D] -> [C, heads, width, D], zeros before (masked by the context mask); `x` itself (not a copy:
    prompts are only read) where it is that wide already."""
    return x if x.shape[2] == width else torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))


# ------------------------------------------------------------------------------------------------ the requests


def _serial_arithmetic() -> None:
    """Run this thread's tensor arithmetic on this thread alone. A request's thread does little arithmetic (the
    marginal over its rows' next-token distributions) while the model thread's passes use every core; run in
    parallel, it would start an OpenMP team of its own, and with more OpenMP threads than cores libgomp stops
    spinning between parallel regions, so each of a decoding pass's ~1,400 small operations waits for sleeping
    threads to wake: served decoding steps took ~100 ms against ~68 ms on the model thread alone (2 cores, the demo
    model). OpenMP keeps a count per thread, and so does MKL, whose vector math (torch's exp over a [rows, vocabulary]
    tensor, in the marginal's logsumexp) opens a team of MKL's own size whatever OpenMP's count says. This sets
    this thread's counts only (torch.set_num_threads would also lower the default every thread started later takes)."""
    torch.get_num_threads()  # torch sets a thread's OpenMP count from the process's default at first use: now
    threadpool_limits(1, user_api="openmp")
    if (mkl := torch_mkl()) is not None:
        mkl.MKL_Set_Num_Threads_Local(1)


@functools.cache
def torch_mkl() -> ctypes.CDLL | None:
    """The MKL that x86 builds of torch link into libtorch_cpu (its C API); None where torch has none."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        mkl = ctypes.CDLL(str(library))  # already loaded: this is a handle to it, not a second copy
        mkl.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]
        mkl.MKL_Get_Max_Threads.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return mkl


@dataclass
class _Op:
    """What a request's thread waits for the model thread to run."""

    kind: str  # "feed": in the next pass; "alone": a call of its own; "rows": bookkeeping on the union
    run: Callable[[], Any] | None = None  # alone and rows
    part: Part | None = None  # feed
    tokens: torch.Tensor | None = None  # feed


class Member:
    """A request in flight: its thread, and the operation it waits for."""

    def __init__(self, joint: JointDecoder, work: Callable[[PassageLM], Any], settle: Callable[..., None]) -> None:
        self.joint = joint
        self.pending: _Op | None = None
        self.part: Part | None = None  # its rows in the union, while it decodes
        self.done = False
        self.failed: BaseException | None = None  # the union it decoded in failed: it cannot go on
        self._answer: tuple[Any, BaseException | None] = (None, None)
        self._answered = threading.Event()
        self.lm = JoinedLM(joint.lm, self)

        def run() -> None:
            _serial_arithmetic()
            try:
                settle(work(self.lm))
            except BaseException as err:  # handed to the waiting RPC, which reports it
                settle(error=err)
            finally:
                with joint.changed:
                    self.done = True
                    joint.changed.notify_all()

        self.thread = threading.Thread(target=run, name="request", daemon=True)

    def call(self, op: _Op) -> Any:
        """From the request's thread: wait for the model thread to run `op`."""
        with self.joint.changed:
            if self.failed is not None:
                raise self.failed
            self.pending = op
            self.joint.changed.notify_all()
        self._answered.wait()
        self._answered.clear()
        result, error = self._answer
        if error is not None:
            raise error
        return result

    def answer(self, result: Any = None, error: BaseException | None = None) -> None:
        """From the model thread."""
        self.pending = None
        self._answer = (result, error)
        self._answered.set()

    def fail(self, error: BaseException) -> None:
        """From the model thread: what it waits for, and whatever it asks for next, fails with `error`."""
        with self.joint.changed:
            self.failed = error
            self.part = None
            self.answer(error=error)


class JointDecoder:
    """The model thread's side: runs what the requests in flight wait for, a decoding pass at a time."""

    def __init__(self, lm: PassageLM) -> None:
        self.lm = lm
        self.rows = Rows(lm)
        self.members: list[Member] = []
        self.changed = threading.Condition()

    def add(self, work: Callable[[PassageLM], Any], settle: Callable[..., None]) -> None:
        """Admit a request: `work` runs in its own thread against a JoinedLM, `settle(result)` or
        `settle(error=...)` gets what it returns or raises."""
        member = Member(self, work, settle)
        if self.rows.parts:
            metrics.GENERATOR_JOINED.inc()
        self.members.append(member)
        member.thread.start()

    def advance(self) -> None:
        """Run what every request in flight waits for: the calls of their own, then one pass for all. Where the
        union itself fails (a pass, or bookkeeping on its rows: out of memory, or a bug), its cache may be half
        grown, so every request in it fails and it starts empty; a request whose own call fails (its prompts, or
        joining the union, which changes nothing until it succeeds) fails alone."""
        with self.changed:
            self.changed.wait_for(lambda: all(m.done or m.pending is not None for m in self.members))
        try:
            for member in [m for m in self.members if m.done]:
                self._release(member)
                self.members.remove(member)
        except BaseException as err:
            self.fail_all(err)
            return
        waiting = [m for m in self.members if m.pending is not None and m.pending.kind != "feed"]
        for member in waiting:
            op = member.pending
            assert op is not None and op.run is not None
            try:
                if op.kind == "alone":  # a new prompt or scoring: its decoding (if any) is over
                    self._release(member)
            except BaseException as err:
                self.fail_all(err)
                return
            try:
                result = op.run()
            except BaseException as err:
                if op.kind == "rows" and member.part is not None:  # the union was changing in place
                    self.fail_all(err)
                    return
                member.answer(error=err)
            else:
                member.answer(result)
        if waiting:
            return  # they will ask for more: the pass runs once every request waits for it
        feeding = [m for m in self.members if m.pending is not None]
        if not feeding:
            return
        metrics.GENERATOR_BATCH_SIZE.observe(len(feeding))
        try:
            results = self.rows.feed([_feed_of(m) for m in feeding])
        except BaseException as err:
            self.fail_all(err)
            return
        for member, result in zip(feeding, results, strict=True):
            member.answer(result)

    def fail_all(self, error: BaseException) -> None:
        """Every request in flight fails with `error`; the union starts empty."""
        for member in self.members:
            member.fail(error)
        self.members.clear()
        self.rows = Rows(self.lm)

    def _release(self, member: Member) -> None:
        if member.part is not None:
            self.rows.leave(member.part)
            member.part = None

    @property
    def busy(self) -> bool:
        return bool(self.members)


def _feed_of(member: Member) -> tuple[Part, torch.Tensor]:
    """What a member waiting for the pass feeds: its rows, its tokens."""
    op = member.pending
    assert op is not None and op.part is not None and op.tokens is not None
    return op.part, op.tokens


@dataclass
class JoinedState(DecodingState):
    """What the RAG math holds for a request's rows in the union (their `fed` count kept up to date)."""

    part: Part | None = None


class JoinedLM(PassageLM):
    """The PassageLM a request in flight decodes with: its model calls run on the model thread, its decoding
    passes together with the other requests'."""

    def __init__(self, lm: PassageLM, member: Member) -> None:
        self.inner = lm
        self.member = member
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.rules = lm.rules
        self.bos_token_id = lm.bos_token_id
        self.name = lm.name
        self.max_answer_tokens = lm.max_answer_tokens
        self.max_positions = lm.max_positions
        self.chunk_tokens = lm.chunk_tokens

    def _alone(self, run: Callable[[], Any]) -> Any:
        return self.member.call(_Op("alone", run=run))

    def encode(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Context]], watch: Watch | None = None
    ) -> Contexts:
        return self._alone(lambda: self.inner.encode(questions, contexts, watch))

    def token_logprobs(
        self,
        ctx: Contexts,
        rows: torch.Tensor,
        targets: torch.Tensor,
        lengths: Sequence[int] | None = None,
        watch: Watch | None = None,
    ) -> torch.Tensor:
        return self._alone(lambda: self.inner.token_logprobs(ctx, rows, targets, lengths, watch))

    def input_text(self, question: str, context: Context) -> str:
        return self.inner.input_text(question, context)

    def prompt_lengths(self, question: str, contexts: Sequence[Context]) -> list[int]:
        return self.inner.prompt_lengths(question, contexts)

    def answer_token_ids(self, answer: str) -> list[int]:
        return self.inner.answer_token_ids(answer)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.inner.decode(token_ids)

    def start(self, ctx: Contexts, rows: torch.Tensor) -> DecodingState:
        joint, member = self.member.joint, self.member

        def join() -> Part:
            if member.part is not None:
                joint.rows.leave(member.part)
                member.part = None
            member.part = joint.rows.join(ctx, rows)
            return member.part

        part = member.call(_Op("rows", run=join))
        state = joint.rows.state
        assert state is not None
        mask = ctx.attention_mask[rows]
        return JoinedState(ctx, rows, state.cache, state.shared, mask, part=part)

    def step(self, state: DecodingState, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is None:  # encoding already ran every row up to its first answer token
            return state.ctx.first_logprobs[state.rows]
        return self.feed(state, tokens[:, None])[:, -1]

    def feed(self, state: DecodingState, tokens: torch.Tensor) -> torch.Tensor:
        assert isinstance(state, JoinedState) and state.part is not None
        result = self.member.call(_Op("feed", part=state.part, tokens=tokens))
        state.fed += tokens.shape[1]
        return result

    def rewind(self, state: DecodingState, fed: int) -> None:
        assert isinstance(state, JoinedState) and state.part is not None
        part = state.part
        self.member.call(_Op("rows", run=lambda: self.member.joint.rows.rewind(part, fed)))
        state.fed = fed

    def reorder(self, state: DecodingState, index: torch.Tensor) -> None:
        assert isinstance(state, JoinedState) and state.part is not None
        part = state.part
        self.member.call(_Op("rows", run=lambda: self.member.joint.rows.reorder(part, index)))

    def keep(self, state: DecodingState, index: torch.Tensor) -> None:
        assert isinstance(state, JoinedState) and state.part is not None
        part = state.part
        self.member.call(_Op("rows", run=lambda: self.member.joint.rows.keep(part, index)))
        state.rows, state.attention_mask = state.rows[index], state.attention_mask[index]

    def _cache(self, ctx: Contexts, rows: torch.Tensor) -> tuple[Cache, SharedContext]:
        raise NotImplementedError("a joined request's rows live in the union (JoinedLM.start)")

    def _inputs(self, state: DecodingState, tokens: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError("a joined request's passes run in the union (Rows.feed)")

    def teacher_forced(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Context]], targets: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError("training does not run through the serving worker")
