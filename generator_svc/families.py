"""The two generator families behind `PassageLM` (generator_svc.loading loads them).

`EncoderDecoderLM` (BART/T5, including the generator inside an unchanged `facebook/rag-*` checkpoint) and
`DecoderOnlyLM` (chat/instruct LMs such as Qwen2.5 or SmolLM2). They differ only in how rows are built and run
to their first answer token (`encode`) and how one more chunk of tokens runs (`_cache`, `_forward`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    Cache,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from generator_svc import context_attention
from generator_svc.context_attention import KV, SharedContext
from generator_svc.passage_cache import PassageKVCache
from generator_svc.passage_lm import (
    Context,
    Contexts,
    DecodingRules,
    DecodingState,
    PassageLM,
    Watch,
    holding,
    length_buckets,
    log_softmax,
    select_rows,
    watched,
)
from generator_svc.prompts import ChatPrompt
from rag import metrics
from rag.errors import FailedPrecondition
from rag.types import Passage

log = logging.getLogger(__name__)


def _rules_from(
    config: GenerationConfig, tokenizer: PreTrainedTokenizerBase, decoder_prompt: tuple[int, ...]
) -> DecodingRules:
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    if None in eos_ids:
        raise FailedPrecondition("the generator defines no end-of-sequence token")
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return DecodingRules(
        eos_token_ids=eos_ids,
        pad_token_id=pad if pad is not None else eos_ids[0],
        decoder_prompt=decoder_prompt,
        forced_bos_token_id=config.forced_bos_token_id,
        forced_eos_token_id=config.forced_eos_token_id,
        no_repeat_ngram_size=config.no_repeat_ngram_size or 0,
        min_new_tokens=config.min_new_tokens or 0,
        length_penalty=config.length_penalty if config.length_penalty is not None else 1.0,
        early_stopping=config.early_stopping if config.early_stopping is not None else False,
    )


# --------------------------------------------------------------------------------------------------------
# Encoder-decoder (BART, T5)
# --------------------------------------------------------------------------------------------------------


class EncoderDecoderLM(PassageLM):
    """BART/T5 reading `title / text // question`, as transformers' RagRetriever builds it."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        generation_config: GenerationConfig,
        name: str,
        max_input_tokens: int = 300,
        title_sep: str = " / ",
        doc_sep: str = " // ",
    ) -> None:
        context_attention.install(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_input_tokens = max_input_tokens
        self.title_sep, self.doc_sep = title_sep, doc_sep
        self.prefix = getattr(model.config, "prefix", None) or ""
        start = generation_config.decoder_start_token_id
        if start is None:
            start = model.config.decoder_start_token_id
        self.decoder_start = int(start)
        self.rules = _rules_from(generation_config, tokenizer, (self.decoder_start,))
        self.bos_token_id = generation_config.bos_token_id
        positions = getattr(model.config, "max_position_embeddings", None)  # BART has a table; T5 has none
        self.max_answer_tokens = positions - 2 if positions else None  # the decoder start and BOS take two

    def input_text(self, question: str, context: Context) -> str:
        """transformers' RAG input, `title / text // question`; several passages joined by ` // `."""
        docs = [p.title.removeprefix('"').removesuffix('"') + self.title_sep + p.text + self.doc_sep for p in context]
        return (self.prefix + "".join(docs) + question).replace("  ", " ")

    def tokenize(self, questions: Sequence[str], contexts: Sequence[Sequence[Context]]) -> dict[str, torch.Tensor]:
        """The encoder input of every row (question-major), padded to the longest."""
        texts = [self.input_text(q, c) for q, cs in zip(questions, contexts, strict=True) for c in cs]
        batch = self._encoded(
            texts, max_length=self.max_input_tokens, truncation=True, padding=True, return_tensors="pt"
        )
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    def prompt_lengths(self, question: str, contexts: Sequence[Context]) -> list[int]:
        texts = [self.input_text(question, c) for c in contexts]
        ids = self._encoded(texts, max_length=self.max_input_tokens, truncation=True)["input_ids"]
        return [len(row) for row in ids]

    @torch.inference_mode()
    def encode(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Context]], watch: Watch | None = None
    ) -> Contexts:
        batch = self.tokenize(questions, contexts)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        per_pass = max(1, self.chunk_tokens // ids.shape[1])
        passes = [
            self._encode_rows(ids[i : i + per_pass], mask[i : i + per_pass], watch)
            for i in range(0, len(ids), per_pass)
        ]
        states, prefix, cross, first = (
            passes[0][0],
            _concat_rows([p[1] for p in passes]),
            _concat_rows([p[2] for p in passes]),
            torch.cat([p[3] for p in passes]),
        )
        rows = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]
        return Contexts(
            len(questions),
            len(contexts[0]),
            mask.cpu(),
            prefix=prefix,
            first_logprobs=first,
            encoder_states=states[:1].clone(),  # a view would keep the pass's rows alive while decoding
            cross=cross,
            source_ids=rows,
        )

    def _encode_rows(
        self, ids: torch.Tensor, mask: torch.Tensor, watch: Watch | None
    ) -> tuple[torch.Tensor, KV, KV, torch.Tensor]:
        """One pass over some rows: their encoder states, the decoder start token's self-attention and cross-
        attention caches, and the first answer token's log-probabilities."""
        states = self.model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        # The decoder start token, once per row: it fills the cross-attention cache (the encoder states
        # projected for every decoder layer) and gives the first answer token's distribution.
        start = torch.full((len(mask), 1), self.decoder_start, dtype=torch.long, device=self.device)
        out = self.model(
            encoder_outputs=(states,),
            attention_mask=mask,
            decoder_input_ids=start,
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
            use_cache=True,
            return_dict=True,
        )
        metrics.MODEL_TOKENS.labels("prompt").inc(ids.numel())
        watched(watch)(None)
        cache = out.past_key_values
        return (
            states,
            [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers],
            [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers],
            log_softmax(out.logits[:, -1]).cpu(),
        )

    def _cache(self, ctx: Contexts, rows: torch.Tensor) -> tuple[Cache, SharedContext]:
        assert ctx.cross is not None
        # The decoder start token's cache is one token per row: copied. The cross-attention cache keeps one row
        # per context row (the attention reads it per context, see context_attention); holding it marks it
        # computed, so the encoder states are never projected again.
        cache = EncoderDecoderCache(select_rows(ctx.prefix, rows), holding(ctx.cross))
        return cache, SharedContext(rows, ctx.attention_mask, len(ctx.cross), self.device)

    def _inputs(self, state: DecodingState, tokens: torch.Tensor) -> dict[str, Any]:
        assert state.ctx.encoder_states is not None
        return {  # cross-attention reads its cached keys and values: the states only give the shape
            "encoder_outputs": (state.ctx.encoder_states.expand(len(state.rows), -1, -1),),
            "attention_mask": state.attention_mask.to(self.device),
            "decoder_input_ids": tokens.to(self.device),
        }

    def answer_token_ids(self, answer: str) -> list[int]:
        ids = self._encoded(answer, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] not in self.rules.eos_token_ids:
            ids = ids + [self.rules.eos_token_ids[0]]
        return ids

    def teacher_forced(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Context]], targets: torch.Tensor
    ) -> torch.Tensor:
        batch = self.tokenize(questions, contexts)
        K = len(contexts[0])
        rows = targets.to(self.device).repeat_interleave(K, dim=0)  # [B*K, T]
        start = torch.full((len(rows), 1), self.decoder_start, dtype=torch.long, device=self.device)
        out = self.model(**batch, decoder_input_ids=torch.cat([start, rows[:, :-1]], dim=1), return_dict=True)
        logprobs = log_softmax(out.logits).gather(-1, rows[:, :, None]).squeeze(-1)
        return logprobs.view(len(questions), K, -1)


# --------------------------------------------------------------------------------------------------------
# Decoder-only (chat LMs)
# --------------------------------------------------------------------------------------------------------


class DecoderOnlyLM(PassageLM):
    """A causal LM prompted with one passage and the question (through its chat template when it has one; see
    generator_svc.prompts)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        generation_config: GenerationConfig,
        name: str,
        max_passage_tokens: int = 256,
        system_prompt: str | None = None,
    ) -> None:
        context_attention.install(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.prompt = ChatPrompt(tokenizer, max_passage_tokens, system_prompt)
        config = model.config
        self.max_positions = next(
            (int(n) for n in (getattr(config, a, None) for a in ("max_position_embeddings", "n_positions")) if n), None
        )
        self.rules = _rules_from(generation_config, tokenizer, ())
        self.bos_token_id = None  # decoder-only answers carry no BOS of their own
        self.passage_cache: PassageKVCache | None = None  # set at loading (--kv-cache-mb)
        self._fixed: dict[tuple[int, ...], KV] = {}  # the fixed prefix's keys and values, by its ids

    def prompt_ids(self, question: str, context: Context) -> list[int]:
        return self.prompt.ids(question, [(p.title, p.text) for p in context])

    def input_text(self, question: str, context: Context) -> str:
        return self.prompt.text(question, [(p.title, p.text) for p in context])

    def prompt_lengths(self, question: str, contexts: Sequence[Context]) -> list[int]:
        return [len(self.prompt_ids(question, c)) for c in contexts]

    @torch.inference_mode()
    def encode(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Context]], watch: Watch | None = None
    ) -> Contexts:
        """Every prompt run once, and what prompts share run once: the prefix common to all rows (system prompt,
        chat template) is computed for one row and shared; the rest of each prompt runs in buckets of similar
        length, since padding costs as much as tokens, and in passes of at most `chunk_tokens`. Row r comes out
        as [shared][padding][its own tokens]: each prompt still ends where its answer begins. With the passage
        KV cache, RAG rows take their passage segments from it (`_encode_cached`)."""
        prompts = [self.prompt_ids(q, c) for q, cs in zip(questions, contexts, strict=True) for c in cs]
        if self.passage_cache is not None and all(len(c) == 1 for cs in contexts for c in cs):
            cached = self._encode_cached(len(questions), [c[0] for cs in contexts for c in cs], prompts, watch)
            if cached is not None:
                return cached
        shared = shared_prefix_length(prompts) if len(prompts) > 1 else 0
        prefix = self._prefill([prompts[0][:shared]], [], 0, watch)[0] if shared else []
        own = [p[shared:] for p in prompts]
        width = shared + max(len(p) for p in own)
        mask = torch.zeros(len(own), width, dtype=torch.long)
        mask[:, :shared] = 1
        kv: KV = []
        first_logprobs = torch.empty(0)
        for bucket in length_buckets([len(p) for p in own], self.padding_slack, self.chunk_tokens):
            bucket_kv, bucket_mask, logits = self._prefill([own[r] for r in bucket], prefix, shared, watch)
            rows, start = torch.tensor(bucket), width - bucket_mask.shape[1]
            if not kv:  # the shapes are known now: heads and head size of every layer
                kv = [
                    (
                        k.new_zeros(len(own), k.shape[1], width, k.shape[3]),
                        v.new_zeros(len(own), v.shape[1], width, v.shape[3]),
                    )
                    for k, v in bucket_kv
                ]
                for (k, v), (k0, v0) in zip(kv, prefix, strict=False):  # no prefix: nothing to copy
                    k[:, :, :shared], v[:, :, :shared] = k0, v0
                first_logprobs = torch.empty(len(own), logits.shape[-1])
            for (k, v), (kb, vb) in zip(kv, bucket_kv, strict=True):
                k[rows.to(k.device), :, start:], v[rows.to(v.device), :, start:] = kb, vb
            mask[rows, start:] = bucket_mask
            first_logprobs[rows] = log_softmax(logits).cpu()
        return Contexts(
            len(questions),
            len(contexts[0]),
            mask,
            kv,
            first_logprobs,
            source_ids=prompts,
        )

    def _fixed_prefix(self, ids: list[int]) -> KV:
        """The keys and values of what every RAG prompt starts with (system turn, template and instruction, up to the
        passage), run once per process (kept for a few distinct prefixes)."""
        key = tuple(ids)
        if key not in self._fixed:
            if len(self._fixed) >= 4:
                self._fixed.pop(next(iter(self._fixed)))
            kv = self._prefill([ids], [], 0, None)[0]
            self._fixed[key] = [(k.clone(), v.clone()) for k, v in kv]
        return self._fixed[key]

    def _segment_ids(self, passage: Passage, prompt: list[int]) -> list[int]:
        """The first tokens of a RAG prompt up to its question (fixed prefix included): what it shares with the
        prompts of the same passage for two other questions. A prefix of the prompt by construction, so a cached
        segment is always the row's own tokens; where the tokenizer merges the question's first characters into
        the template's, the segment ends earlier (another key), never differently."""
        a, b = self.prompt_ids("Alpha?", (passage,)), self.prompt_ids("Beta?", (passage,))
        return prompt[: shared_prefix_length([prompt, a, b])]

    def _passage_start_probes(self) -> list[list[int]]:
        """Two prompts that part where their passages begin: what a request's prompts share with both is at most
        the fixed prefix (system turn, template, instruction)."""
        return [self.prompt_ids(q, (Passage(q, q, q),)) for q in ("Alpha?", "Beta?")]

    # Where a segment ends depends on the question's first characters (a tokenizer may merge them with the
    # template's last ones), so a passage is cached as split before the usual first words of a question.
    QUESTION_STARTS = ("What", "Who", "When", "Where", "Which", "How", "Why", "In")

    def cache_passages(self, passages: Sequence[Passage], watch: Watch | None = None) -> tuple[int, int]:
        """Run and keep the segments of `passages` the cache lacks (filling its disk tier ahead of requests), split
        as requests split them; how many segments ran and how many were there already. A passage whose first
        characters merge into the template is left out: a request holding it splits elsewhere."""
        assert self.passage_cache is not None
        probes = self._passage_start_probes()
        fixed = probes[0][: shared_prefix_length(probes)]
        splits = {
            tuple(self._segment_ids(p, self.prompt_ids(f"{start} is it?", (p,))))
            for p in passages
            for start in self.QUESTION_STARTS
        }
        segments = [list(s) for s in splits if list(s[: len(fixed)]) == fixed and len(s) > len(fixed)]
        lacking = [s for s in segments if not self.passage_cache.holds(self.passage_cache.key(s, len(fixed)))]
        if lacking:
            own = [s[len(fixed) :] for s in lacking]
            self._segments_kv(own, lacking, self._fixed_prefix(fixed), len(fixed), watch)
        return len(lacking), len(segments) - len(lacking)

    def _encode_cached(
        self, num_questions: int, passages: Sequence[Passage], prompts: Sequence[list[int]], watch: Watch | None
    ) -> Contexts | None:
        """RAG rows from cached segments: [fixed prefix][padding][passage segment][question], where only the
        question's tokens (and segments not cached yet) run. None (the uncached path) when the prompts do not
        split alike (the token-id guard: a segment not starting with the fixed prefix, or a question's rows
        whose question tokens differ)."""
        assert self.passage_cache is not None
        fixed = prompts[0][: shared_prefix_length([*prompts, *self._passage_start_probes()])]
        segments = [self._segment_ids(p, prompt) for p, prompt in zip(passages, prompts, strict=True)]
        K = len(prompts) // num_questions
        tails = [prompt[len(segment) :] for prompt, segment in zip(prompts, segments, strict=True)]
        if not fixed or not all(
            segment[: len(fixed)] == fixed and len(segment) > len(fixed) and tail == tails[r // K * K]
            for r, (segment, tail) in enumerate(zip(segments, tails, strict=True))
        ):
            metrics.KV_CACHE_FALLBACKS.inc()
            return None
        fixed_kv = self._fixed_prefix(fixed)
        own = [segment[len(fixed) :] for segment in segments]
        segment_kv = self._segments_kv(own, segments, fixed_kv, len(fixed), watch)
        width = len(fixed) + max(len(o) + len(t) for o, t in zip(own, tails, strict=True))
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        kv: KV = [
            (
                k.new_zeros(len(prompts), k.shape[1], width, k.shape[3]),
                v.new_zeros(len(prompts), v.shape[1], width, v.shape[3]),
            )
            for k, v in fixed_kv
        ]
        first_logprobs = torch.empty(0)
        for b in range(num_questions):  # the question's tokens after each of its rows' [fixed][segment]
            tail = tails[b * K]
            per_group = max(1, self.chunk_tokens // len(tail))
            for first in range(b * K, (b + 1) * K, per_group):
                rows = list(range(first, min(first + per_group, (b + 1) * K)))
                logits = self._after_segments(rows, own, segment_kv, fixed_kv, tail, kv, mask, width, watch)
                if not first_logprobs.numel():
                    first_logprobs = torch.empty(len(prompts), logits.shape[-1])
                first_logprobs[rows] = logits
        return Contexts(num_questions, K, mask, kv, first_logprobs, source_ids=[list(p) for p in prompts])

    def _after_segments(
        self,
        rows: list[int],
        own: Sequence[list[int]],
        segment_kv: Sequence[KV],
        fixed_kv: KV,
        tail: list[int],
        kv: KV,
        mask: torch.Tensor,
        width: int,
        watch: Watch | None,
    ) -> torch.Tensor:
        """Run the question's tokens `tail` after each row's [fixed prefix][padding][segment], a chunk of positions
        at a time (`watch` after each); write the rows' keys, values and mask into `kv` and `mask` (right-aligned
        to `width`); the first answer token's log-probabilities [rows, V]."""
        n, P = len(rows), fixed_kv[0][0].shape[2]
        longest = max(len(own[r]) for r in rows)
        past_mask = torch.zeros(n, P + longest, dtype=torch.long)
        past_mask[:, :P] = 1
        for i, r in enumerate(rows):
            past_mask[i, P + longest - len(own[r]) :] = 1
        past: KV = []
        for layer, (k0, v0) in enumerate(fixed_kv):
            k = k0.new_zeros(n, k0.shape[1], P + longest, k0.shape[3])
            v = torch.zeros_like(k)
            k[:, :, :P], v[:, :, :P] = k0, v0
            for i, r in enumerate(rows):
                ks, vs = segment_kv[r][layer]
                k[i, :, P + longest - ks.shape[2] :], v[i, :, P + longest - vs.shape[2] :] = ks[0], vs[0]
            past.append((k, v))
        cache = DynamicCache(past, config=self.model.config)
        tokens = torch.tensor(tail).expand(n, -1)
        full_mask = torch.cat([past_mask, past_mask.new_ones(n, len(tail))], 1)
        positions = past_mask.sum(-1, keepdim=True) + torch.arange(len(tail))
        out = self._in_passes(tokens, full_mask, positions, cache, watch)
        own_length = longest + len(tail)  # [padding][segment][question] of these rows
        for (k, v), layer in zip(kv, out.past_key_values.layers, strict=True):
            k[rows, :, :P], v[rows, :, :P] = layer.keys[:, :, :P], layer.values[:, :, :P]
            k[rows, :, width - own_length :] = layer.keys[:, :, P:]
            v[rows, :, width - own_length :] = layer.values[:, :, P:]
        mask[rows, :P] = 1
        mask[rows, width - own_length :] = full_mask[:, P:]
        return log_softmax(out.logits[:, -1]).cpu()

    def _segments_kv(
        self, own: Sequence[list[int]], segments: Sequence[list[int]], fixed_kv: KV, offset: int, watch: Watch | None
    ) -> list[KV]:
        """Each row's segment keys and values [1, kv_heads, length, head_dim] per layer: from the cache, or run
        (after the fixed prefix, in buckets) and cached."""
        assert self.passage_cache is not None
        keys = [self.passage_cache.key(segment, offset) for segment in segments]
        found: dict[bytes, KV] = {}
        for key in dict.fromkeys(keys):
            hit = self.passage_cache.get(key)
            if hit is not None:
                found[key] = hit
        missing = list({key: r for r, key in reversed(list(enumerate(keys))) if key not in found}.values())
        lengths = [len(own[r]) for r in missing]
        for bucket in length_buckets(lengths, self.padding_slack, self.chunk_tokens):
            rows = [missing[i] for i in bucket]
            bucket_kv, bucket_mask, _ = self._prefill([own[r] for r in rows], fixed_kv, offset, watch)
            for i, r in enumerate(rows):
                start = bucket_mask.shape[1] - len(own[r])
                entry = [(k[i : i + 1, :, start:].clone(), v[i : i + 1, :, start:].clone()) for k, v in bucket_kv]
                found[keys[r]] = entry
                self.passage_cache.put(keys[r], entry)
        return [found[key] for key in keys]

    def _prefill(
        self, rows: Sequence[Sequence[int]], prefix: KV, offset: int, watch: Watch | None
    ) -> tuple[KV, torch.Tensor, torch.Tensor]:
        """Run token rows (left-padded to the longest) after a one-row `prefix` of `offset` tokens; the rows'
        own part of the cache, their mask and the logits of their last position. Rows longer than a pass
        allows run a chunk of positions at a time (`watch` called after each)."""
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.rules.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row) :] = torch.tensor(row)
            mask[i, longest - len(row) :] = 1
        n = len(rows)
        past = (
            DynamicCache(
                [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix], config=self.model.config
            )
            if prefix
            else DynamicCache(config=self.model.config)
        )
        attention_mask = torch.cat([mask.new_ones(n, offset), mask], 1)
        positions = offset + (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._in_passes(ids, attention_mask, positions, past, watch)
        kv = [(layer.keys[:, :, offset:], layer.values[:, :, offset:]) for layer in out.past_key_values.layers]
        return kv, mask, out.logits[:, -1]

    def _in_passes(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
        watch: Watch | None,
    ) -> Any:
        """Run prompt tokens ids [n, L] after `cache` (attention_mask [n, past + L] covers both) in passes of at
        most `chunk_tokens` positions in all, `watch` called after each; the last pass's output, whose cache holds
        everything and whose logits are the last position's (the vocabulary projection is a quarter of the work)."""
        n, length = ids.shape
        past = attention_mask.shape[1] - length
        per_pass = max(1, self.chunk_tokens // n)
        for start in range(0, length, per_pass):
            end = min(start + per_pass, length)
            out = self.model(
                input_ids=ids[:, start:end].to(self.device),
                attention_mask=attention_mask[:, : past + end].to(self.device),
                position_ids=positions[:, start:end].to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                return_dict=True,
            )
            cache = out.past_key_values
            metrics.MODEL_TOKENS.labels("prompt").inc(n * (end - start))
            watched(watch)(None)
        return out

    def _cache(self, ctx: Contexts, rows: torch.Tensor) -> tuple[Cache, SharedContext]:
        # The rows' cache starts empty: the prompts stay in `ctx.prefix`, read in place by the attention.
        shared = SharedContext(rows, ctx.attention_mask, len(ctx.prefix), self.device, prompt=ctx.prefix)
        return DynamicCache(config=self.model.config), shared

    def _inputs(self, state: DecodingState, tokens: torch.Tensor) -> dict[str, Any]:
        return {  # no mask: the prompt's is the shared context's, and a row's own tokens are real (or own_valid says)
            "input_ids": tokens.to(self.device),
            "position_ids": (state.next_position[:, None] + torch.arange(tokens.shape[1])).to(self.device),
        }

    def answer_token_ids(self, answer: str) -> list[int]:
        return self.prompt.answer_ids(answer) + [self.rules.eos_token_ids[0]]

    def teacher_forced(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Context]], targets: torch.Tensor
    ) -> torch.Tensor:
        """Each row is its prompt (left-padded, as `encode` builds it) followed by the answer (the assistant
        turn); only the last T positions, where the answer tokens are predicted, are projected to the vocabulary."""
        K, T = len(contexts[0]), targets.shape[1]
        prompts = [self.prompt_ids(q, c) for q, cs in zip(questions, contexts, strict=True) for c in cs]
        rows = targets.repeat_interleave(K, dim=0)
        P = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), P + T - 1), self.rules.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, prompt in enumerate(prompts):
            input_ids[r, P - len(prompt) : P] = torch.tensor(prompt)
            mask[r, P - len(prompt) :] = 1  # answers are right-padded: what follows one is never attended to
        input_ids[:, P:] = rows[:, :-1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            logits_to_keep=T,
            return_dict=True,
        )
        logprobs = log_softmax(out.logits).gather(-1, rows.to(self.device)[:, :, None]).squeeze(-1)
        return logprobs.view(len(questions), K, T)


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt has in common, leaving each at least one of its own."""
    shortest = min(len(p) for p in prompts)
    length = 0
    while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def _concat_rows(passes: Sequence[KV]) -> KV:
    """Per-layer keys and values of row groups, joined along the rows."""
    return [
        (torch.cat([p[layer][0] for p in passes]), torch.cat([p[layer][1] for p in passes]))
        for layer in range(len(passes[0]))
    ]
