"""The interface between the RAG math and a generator model: an LM that reads one context per row.

`PassageLM` is all the RAG math (generator_svc.rag_math) needs:
- `encode` turns B questions x K contexts into per-row encoded inputs, computed once per request
  (encoder states for BART/T5, a prompt KV cache for decoder-only LMs). A context is what one row reads:
  one passage for RAG, none (closed book) or all of them (concatenation) for the baselines;
- `start` / `step` / `reorder` / `keep` decode rows incrementally with a KV cache;
- `token_logprobs` teacher-forces given answers, reusing the contexts;
- `rules`: what the checkpoint's generation config imposes on every decode.

The model may sit on a GPU; what the RAG math sees (log-probabilities, masks, token ids) stays on the CPU: a
step's distributions are small next to the model's work, and the search stays one plain code path.

The two families that implement it live in generator_svc.families; generator_svc.loading loads them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import Cache, DynamicCache, EncoderDecoderCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from generator_svc.context_attention import KV, SharedContext
from generator_svc.prompts import tokenized
from rag import metrics
from rag.types import Passage

Context = tuple[Passage, ...]  # the passages one row reads: one for RAG; none or all for the baselines

# watch(tokens) is called after every model pass: decoding steps (greedy search passes the token each row chose,
# beam search None: its best hypothesis is known only at the end) and each chunk of a prompt or of scored answers
# (None). It may raise DecodingStopped to end the work there, so no request holds the model past its caller.
Watch = Callable[[torch.Tensor | None], None]


class DecodingStopped(Exception):
    """Raised by a watch to stop the model's work on a request (its caller went away)."""


def watched(watch: Watch | None) -> Watch:
    """`watch`, or one that never stops anything."""
    return watch if watch is not None else lambda _: None


def one_each(passages: Sequence[Passage]) -> list[Context]:
    """RAG's contexts: one row per passage."""
    return [(p,) for p in passages]


@dataclass
class Contexts:
    """Encoded inputs of B questions x K contexts; row b*K + k is question b with context k.

    Each row has been run up to its first answer token: `prefix` is the decoder's self-attention cache at that
    point (the prompt for a decoder-only LM, the decoder start token for BART/T5) and `first_logprobs` the
    distribution of the first answer token. Decoding and teacher forcing both start from there, so the shared
    work of a request is done once.
    """

    num_questions: int
    contexts_per_question: int
    attention_mask: torch.Tensor  # [B*K, L]: the prompt (decoder-only) or the encoder input (BART/T5)
    prefix: KV  # on the model's device, like `cross`
    first_logprobs: torch.Tensor  # [B*K, V], on the CPU
    encoder_states: torch.Tensor | None = None  # BART/T5 [1, L, H]: decoding reads its shape only (see `cross`)
    cross: KV | None = None  # BART/T5: cross-attention keys and values, once per context row (read in place)
    # Per row, the token ids of its input (passage and question): what drafted decoding copies from.
    source_ids: list[list[int]] = field(default_factory=list)

    def question_source_ids(self, b: int) -> list[int]:
        """What question b's rows read, all of them: a RAG-Token answer copies from any of its passages."""
        K = self.contexts_per_question
        return [token for row in self.source_ids[b * K : (b + 1) * K] for token in row]

    def rows_as_questions(self) -> Contexts:
        """The same rows, each its own question with one context: RAG-Sequence searches each passage alone."""
        return replace(self, num_questions=self.num_questions * self.contexts_per_question, contexts_per_question=1)


@dataclass
class DecodingState:
    """Rows being decoded: `rows[i]` is the context row that decoder row i reads. `cache` holds what the rows
    decoded themselves; what they read from their context rows stays there (`shared`), never copied per row."""

    ctx: Contexts
    rows: torch.Tensor
    cache: Cache
    shared: SharedContext
    attention_mask: torch.Tensor  # the rows' context mask
    fed: int = 0  # tokens fed after the prefix
    # Each row's position for the next token it is fed (decoder-only: its real prompt tokens, then what it was fed).
    next_position: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def select_rows(kv: KV, rows: torch.Tensor) -> DynamicCache:
    """A cache holding the given rows of `kv` (a copy: decoding extends it row by row)."""
    return DynamicCache([(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in kv])


def holding(kv: KV) -> DynamicCache:
    """A cache that holds `kv` itself, not a copy (DynamicCache's constructor would concatenate)."""
    cache = DynamicCache()
    for k, v in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def length_buckets(lengths: Sequence[int], slack: float, max_tokens: int) -> list[list[int]]:
    """Row indices grouped by length, shortest first, so that padding each group to its longest row adds at
    most `slack` of the group's tokens, and the group holds at most `max_tokens` (or is one row)."""
    buckets: list[list[int]] = []
    for r in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = lengths[r] * (len(buckets[-1]) + 1) if buckets else 0
        if (
            buckets
            and padded <= max_tokens
            and padded <= (1 + slack) * (sum(lengths[i] for i in buckets[-1]) + lengths[r])
        ):
            buckets[-1].append(r)
        else:
            buckets.append([r])
    return buckets


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass(frozen=True)
class DecodingRules:
    """What the checkpoint's generation config imposes on every decode (transformers semantics)."""

    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    # Tokens the decoder starts from and that n-gram blocking sees (the decoder start token for BART/T5).
    decoder_prompt: tuple[int, ...] = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False


class PassageLM(ABC):
    """Decoding from the per-row prefix caches, the same for both families; they differ in `encode` (how rows
    are built and run to their first answer token), `_cache` and `_inputs` (how one more chunk of tokens runs)."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    rules: DecodingRules
    bos_token_id: int | None
    name: str
    # The longest answer the model can hold (its decoder's positions), when it has such a limit.
    max_answer_tokens: int | None = None
    # The most tokens one row may hold, prompt and answer together (a decoder-only model's positions), when known.
    max_positions: int | None = None
    # The most tokens one pass of prompt or scoring work runs before the caller is checked on (set at loading
    # for the device: generator_svc.loading.chunk_tokens_for).
    chunk_tokens: int = 512

    @abstractmethod
    def encode(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Context]], watch: Watch | None = None
    ) -> Contexts:
        """Rows for each question with each of its contexts (the same number of contexts per question), run in
        passes of at most `chunk_tokens` tokens, `watch` called after each."""

    @abstractmethod
    def input_text(self, question: str, context: Context) -> str:
        """What one row reads, as text (the prompt, or the encoder input): how the model is asked, which its
        scores depend on besides its weights."""

    @abstractmethod
    def prompt_lengths(self, question: str, contexts: Sequence[Context]) -> list[int]:
        """Each of the question's rows' prompt, in tokens (their sum: what `encode` runs, a request's prompt cost)."""

    @abstractmethod
    def _cache(self, ctx: Contexts, rows: torch.Tensor) -> tuple[Cache, SharedContext]:
        """A fresh cache for decoding `rows`, and what they read from their context rows in place."""

    @abstractmethod
    def _inputs(self, state: DecodingState, tokens: torch.Tensor) -> dict[str, Any]:
        """The model's inputs for tokens [R, T] after what `state` has seen (its cache aside)."""

    def _forward(self, state: DecodingState, tokens: torch.Tensor) -> torch.Tensor:
        """Run tokens [R, T] after what `state` has seen, reading the context rows in place; logits [R, T, V].
        The one place a decoding pass calls the model: it checks that every layer read the shared context and
        keeps the rows' grown cache."""
        out = self.model(
            **self._inputs(state, tokens),
            past_key_values=state.cache,
            use_cache=True,
            shared_context=state.shared,
            return_dict=True,
        )
        state.shared.check_read()
        state.cache = out.past_key_values
        return out.logits

    @abstractmethod
    def answer_token_ids(self, answer: str) -> list[int]:
        """The tokens the model would generate for `answer`, end-of-sequence included."""

    @abstractmethod
    def teacher_forced(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Context]], targets: torch.Tensor
    ) -> torch.Tensor:
        """log p(targets[b, t] | question b with context k, targets[b, <t]) as [B, K, T], in one pass that
        gradients flow through (training); `targets` [B, T] is right-padded, positions past an answer are junk."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def padding_slack(self) -> float:
        """How much padding a bucket may add to its tokens: on a CPU padding costs like tokens; a GPU has
        arithmetic to spare and pays per forward pass instead."""
        return 0.1 if self.device.type == "cpu" else math.inf

    def question_tokens(self, question: str) -> int:
        return len(self._encoded(question, add_special_tokens=False)["input_ids"])

    def _encoded(self, text: str | list[str], **options: Any) -> Any:
        """The tokenizer's encoding of `text` (a BatchEncoding), made under the process's tokenizer lock."""
        return tokenized(self.tokenizer, text, **options)

    def start(self, ctx: Contexts, rows: torch.Tensor) -> DecodingState:
        """A decoding state with one row per entry of `rows` (indices into the context rows)."""
        mask = ctx.attention_mask[rows]
        return DecodingState(ctx, rows, *self._cache(ctx, rows), mask, next_position=mask.sum(-1))

    @torch.inference_mode()
    def step(self, state: DecodingState, tokens: torch.Tensor | None) -> torch.Tensor:
        """Feed one token per row (None at the first step); log p(next token) as float32 [rows, V]."""
        if tokens is None:  # encoding already ran every row up to its first answer token
            return state.ctx.first_logprobs[state.rows]
        return self.feed(state, tokens[:, None])[:, -1]

    @torch.inference_mode()
    def feed(self, state: DecodingState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [rows, T]; log p(next token) after each of them as float32 [rows, T, V]."""
        logits = self._forward(state, tokens)
        state.fed += tokens.shape[1]
        state.next_position = state.next_position + tokens.shape[1]
        return log_softmax(logits).cpu()

    def rewind(self, state: DecodingState, fed: int) -> None:
        """Forget what the rows were fed after their first `fed` tokens (drafted tokens that were not accepted)."""
        if fed == state.fed:
            return
        cache = state.cache.self_attention_cache if isinstance(state.cache, EncoderDecoderCache) else state.cache
        assert isinstance(cache, DynamicCache)
        cache.crop(fed - state.fed)  # a negative count: the tokens to drop (transformers 5)
        state.next_position = state.next_position + (fed - state.fed)
        state.fed = fed

    def reorder(self, state: DecodingState, index: torch.Tensor) -> None:
        """Row i continues the history of row index[i]. Rows only move among rows of the same context, so only
        the tokens they decoded move; prompts, encoder states and cross-attention stay put."""
        cache = state.cache.self_attention_cache if isinstance(state.cache, EncoderDecoderCache) else state.cache
        cache.reorder_cache(index)  # type: ignore[arg-type]  # a LongTensor; torch types it as Tensor

    def keep(self, state: DecodingState, index: torch.Tensor) -> None:
        """Only rows `index` of the state decode on: row i continues old row index[i] (a row may go on as several,
        whose histories part from here); the rows left out have ended, and passes no longer compute them."""
        self.reorder(state, index)  # the kept rows' own tokens
        state.rows, state.attention_mask = state.rows[index], state.attention_mask[index]
        state.next_position = state.next_position[index]
        _, state.shared = self._cache(state.ctx, state.rows)  # what they read, for the rows left

    @torch.inference_mode()
    def token_logprobs(
        self,
        ctx: Contexts,
        rows: torch.Tensor,
        targets: torch.Tensor,
        lengths: Sequence[int] | None = None,
        watch: Watch | None = None,
    ) -> torch.Tensor:
        """log p(targets[r, t] | context rows[r], targets[r, <t]) as [R, T], 0 past each row's length (`lengths`,
        default T). Rows run in buckets of like length (see `padding_slack`), of at most `chunk_tokens` tokens
        (which also bounds the [rows, T, V] distributions held at once), `watch` called after each."""
        lengths = [targets.shape[1]] * len(rows) if lengths is None else lengths
        out = torch.zeros(targets.shape)
        out[:, :1] = ctx.first_logprobs[rows].gather(1, targets[:, :1])
        for bucket in length_buckets([length - 1 for length in lengths], self.padding_slack, self.chunk_tokens):
            part, fed = torch.tensor(bucket), max(lengths[r] for r in bucket) - 1
            if fed == 0:
                continue
            inputs, predicted = targets[part, :fed], targets[part, 1 : fed + 1]
            logits = self._forward(self.start(ctx, rows[part]), inputs)
            scored = log_softmax(logits).gather(-1, predicted[:, :, None].to(logits.device)).squeeze(-1).cpu()
            real = torch.arange(1, fed + 1) < torch.tensor(lengths)[part, None]
            out[part, 1 : fed + 1] = torch.where(real, scored, 0.0)
            metrics.MODEL_TOKENS.labels("scored").inc(inputs.numel())
            watched(watch)(None)
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True)).strip()
