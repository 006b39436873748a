"""The RAG math of Lewis et al. 2020, written once for every generator family.

Notation: B questions, K passages per question (rows question-major: row b*K + k), N beams, V vocabulary.

    prior        log p(z_k|x)            = log_softmax(doc_scores / tau)
    RAG-Token    log p(y|x)              = sum_t logsumexp_k [ log p(z_k|x) + log p(y_t|x,z_k,y<t) ]
    RAG-Sequence log p(y|x)              = logsumexp_k [ log p(z_k|x) + sum_t log p(y_t|x,z_k,y<t) ]
    posterior    p(z_k|x,y)              = softmax_k [ log p(z_k|x) + sum_t log p(y_t|x,z_k,y<t) ]

The model behind p(y_t|x,z_k,y<t) is a `PassageLM` (generator_svc.passage_lm): one row per (question, passage),
encoder-decoder or decoder-only. It is asked for exactly three things: the next-token log-probabilities of
each row (`step`), a reordering of rows between beams (`reorder`), and teacher-forced log-probabilities
of given answers (`token_logprobs`). Everything below is independent of the family. The baselines, closed
book and concatenated passages, are the K = 1 case: one context per question, where both marginals reduce
to plain decoding.

Greedy and beam search reproduce transformers' `generate` step for step (same candidate counts, length
penalty, early-stopping heuristic and forced tokens), so RAG-Token matches `RagTokenForGeneration.generate`
and RAG-Sequence "thorough" matches `RagSequenceForGeneration.generate` token for token.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from generator_svc.passage_lm import Contexts, DecodingRules, PassageLM, Watch
from rag import metrics
from rag.types import DecodingOptions, Mode

NEG_INF = -1.0e9  # transformers' "impossible" score; kept finite so sums stay comparable


def log_prior(doc_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(z|x) over each question's K passages. [B, K] -> [B, K]. Scaled in float64: a finite float32 score
    over a temperature >= 1e-3 stays finite there (in float32, 1e36 / 1e-3 is inf, and the prior NaN)."""
    return torch.log_softmax(doc_scores.double() / temperature, dim=-1).float()


# --------------------------------------------------------------------------------------------------------
# Decoding rules: the generation-config constraints transformers applies as logits processors.
# --------------------------------------------------------------------------------------------------------


def constrain(scores: torch.Tensor, generated: torch.Tensor, max_new_tokens: int, rules: DecodingRules) -> torch.Tensor:
    """Apply the rules to next-token scores [R, V]; `generated` [R, t] holds the tokens so far."""
    step = generated.shape[1]
    if rules.no_repeat_ngram_size > 0:
        scores = _block_repeated_ngrams(scores, generated, rules)
    if step < rules.min_new_tokens:
        scores = scores.index_fill(1, torch.tensor(rules.eos_token_ids), float("-inf"))
    forced = None
    if step == 0 and rules.forced_bos_token_id is not None:
        forced = rules.forced_bos_token_id
    if step == max_new_tokens - 1 and rules.forced_eos_token_id is not None:
        forced = rules.forced_eos_token_id
    if forced is not None:  # the forced token gets probability 1, as in transformers' Forced*LogitsProcessor
        scores = torch.full_like(scores, float("-inf"))
        scores[:, forced] = 0.0
    return scores


def _block_repeated_ngrams(scores: torch.Tensor, generated: torch.Tensor, rules: DecodingRules) -> torch.Tensor:
    n = rules.no_repeat_ngram_size
    prompt = torch.tensor(rules.decoder_prompt, dtype=torch.long).expand(generated.shape[0], -1)
    seen = torch.cat([prompt, generated], dim=1)
    if seen.shape[1] < n:
        return scores
    # A token is banned when the last n-1 tokens followed by it already occurred as an n-gram.
    suffix = seen[:, seen.shape[1] + 1 - n :]
    windows = seen.unfold(1, n, 1)
    matches = (windows[..., :-1] == suffix.unsqueeze(1)).all(dim=-1)
    vocab = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


# --------------------------------------------------------------------------------------------------------
# Search: greedy and beam, over any next-token distribution.
# --------------------------------------------------------------------------------------------------------

# next_logprobs(tokens, origin) feeds the tokens just chosen (None before the first step) to the rows, after
# moving row histories so that row i continues row origin[i] (None: no move), and returns log-probs [rows, V].
NextLogprobs = Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    tokens: tuple[int, ...]
    # Sum of the unconstrained log-probs of `tokens` under the searched distribution.
    log_prob: float


def greedy_search(
    next_logprobs: NextLogprobs, num_rows: int, max_new_tokens: int, rules: DecodingRules, watch: Watch | None = None
) -> list[list[Candidate]]:
    """The argmax token per step; finished rows are fed padding until every row has ended."""
    generated = torch.empty(num_rows, 0, dtype=torch.long)
    unfinished = torch.ones(num_rows, dtype=torch.bool)
    total = torch.zeros(num_rows)
    tokens = None
    eos = torch.tensor(rules.eos_token_ids)
    for _ in range(max_new_tokens):
        logprobs = next_logprobs(tokens, None)
        chosen = _greedy_choice(logprobs, generated, unfinished, max_new_tokens, rules)
        total += torch.where(unfinished, logprobs.gather(1, chosen[:, None]).squeeze(1), 0.0)
        generated = torch.cat([generated, chosen[:, None]], dim=1)
        unfinished &= ~torch.isin(chosen, eos)
        tokens = chosen
        if watch is not None:
            watch(chosen)
        if not unfinished.any():
            break
    lengths = _lengths(generated, rules.eos_token_ids)
    return [[Candidate(tuple(generated[r, : lengths[r]].tolist()), float(total[r]))] for r in range(num_rows)]


def _greedy_choice(
    scores: torch.Tensor, generated: torch.Tensor, unfinished: torch.Tensor, max_new_tokens: int, rules: DecodingRules
) -> torch.Tensor:
    """Each row's next token under the rules: the argmax for unfinished rows, padding for finished ones."""
    chosen = constrain(scores, generated, max_new_tokens, rules).argmax(dim=-1)
    return torch.where(unfinished, chosen, rules.pad_token_id)


def _lengths(generated: torch.Tensor, eos_token_ids: tuple[int, ...]) -> list[int]:
    """Length of each row up to and including its first end-of-sequence token (or the whole row)."""
    ends = torch.isin(generated, torch.tensor(eos_token_ids))
    first_end = torch.where(ends.any(dim=1), ends.int().argmax(dim=1) + 1, generated.shape[1])
    return first_end.tolist()


def beam_search(
    next_logprobs: NextLogprobs,
    num_groups: int,
    num_beams: int,
    max_new_tokens: int,
    rules: DecodingRules,
    num_return: int,
    watch: Watch | None = None,
) -> list[list[Candidate]]:
    """transformers' vectorised beam search (GenerationMixin._beam_search), one group of beams per input.

    Rows are group-major: row g*N + n is beam n of group g. Returns each group's best `num_return`
    finished hypotheses, best first.
    """
    G, N, T = num_groups, num_beams, max_new_tokens
    eos = torch.tensor(rules.eos_token_ids)
    keep = max(2, 1 + len(rules.eos_token_ids)) * N  # enough candidates that N can always continue
    is_top_n = torch.arange(keep) < N
    early_stopping = rules.early_stopping

    def gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        while index.dim() < tensor.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(tensor, index, dim=1)

    # Running beams: only the first beam of a group is live at the start, so the first step picks distinct tokens.
    run_seqs = torch.full((G, N, T), rules.pad_token_id, dtype=torch.long)
    run_scores = torch.zeros(G, N)
    run_scores[:, 1:] = NEG_INF
    run_raw = torch.zeros(G, N)
    # Finished hypotheses, kept sorted by length-penalised score.
    fin_seqs = run_seqs.clone()
    fin_scores = torch.full((G, N), NEG_INF)
    fin_raw = torch.zeros(G, N)
    fin_lengths = torch.zeros(G, N, dtype=torch.long)
    fin_done = torch.zeros(G, N, dtype=torch.bool)
    improvable = torch.ones(G, 1, dtype=torch.bool)

    tokens, origin = None, None
    for t in range(T):
        raw = next_logprobs(tokens, origin)  # [G*N, V]
        vocab = raw.shape[-1]
        scores = constrain(torch.log_softmax(raw, dim=-1), run_seqs[:, :, :t].reshape(G * N, t), T, rules)
        totals = (scores.view(G, N, vocab) + run_scores[:, :, None]).view(G, N * vocab)

        # The `keep` best continuations over all beams of a group.
        top_scores, top_index = torch.topk(totals, keep)
        top_beam, top_token = top_index // vocab, top_index % vocab
        top_seqs = gather(run_seqs, top_beam)
        top_seqs[:, :, t] = top_token
        top_raw = gather(run_raw, top_beam) + raw.view(G, N * vocab).gather(1, top_index)
        ends = torch.isin(top_token, eos) | (t + 1 >= T)

        # Continue with the N best that did not end.
        live_scores = top_scores + ends.float() * NEG_INF
        best = torch.topk(live_scores, N).indices
        run_seqs, run_scores, run_raw = gather(top_seqs, best), gather(live_scores, best), gather(top_raw, best)
        origin = (gather(top_beam, best) + torch.arange(G)[:, None] * N).view(-1)
        tokens = run_seqs[:, :, t].reshape(-1)

        # Keep the N best finished among the old ones and those that just ended within the top N.
        just_ended = ends & is_top_n
        ended_scores = top_scores / ((t + 1) ** rules.length_penalty)
        ended_scores = ended_scores + (fin_done.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG_INF
        ended_scores = ended_scores + (~improvable).float() * NEG_INF + (~just_ended).float() * NEG_INF
        merged = torch.topk(torch.cat([fin_scores, ended_scores], 1), N).indices
        fin_seqs = gather(torch.cat([fin_seqs, top_seqs], 1), merged)
        fin_scores = gather(torch.cat([fin_scores, ended_scores], 1), merged)
        fin_raw = gather(torch.cat([fin_raw, top_raw], 1), merged)
        fin_lengths = gather(torch.cat([fin_lengths, torch.full((G, keep), t + 1)], 1), merged)
        fin_done = gather(torch.cat([fin_done, just_ended], 1), merged)

        # Stop when no running beam can beat the finished ones (transformers' default heuristic).
        best_length = T if (early_stopping == "never" and rules.length_penalty > 0) else t + 1
        best_possible = run_scores[:, :1] / (best_length**rules.length_penalty)
        worst_finished = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, NEG_INF)
        improvable = improvable & (best_possible > worst_finished).any(dim=-1, keepdim=True)
        all_full = fin_done.all() & (early_stopping is True)
        if watch is not None:
            watch(None)
        if not improvable.any() or all_full or ends.all():
            break

    return [  # a slot no hypothesis ever filled is left out: with one step, a forced end leaves one hypothesis
        [
            Candidate(tuple(fin_seqs[g, i, : fin_lengths[g, i]].tolist()), float(fin_raw[g, i]))
            for i in range(num_return)
            if fin_lengths[g, i] > 0
        ]
        for g in range(G)
    ]


def search(
    next_logprobs: NextLogprobs,
    num_groups: int,
    options: DecodingOptions,
    rules: DecodingRules,
    num_return: int,
    watch: Watch | None = None,
) -> list[list[Candidate]]:
    """Greedy for one beam (as transformers does), beam search otherwise."""
    if options.num_beams == 1:
        return greedy_search(next_logprobs, num_groups, options.max_new_tokens, rules, watch)
    return beam_search(next_logprobs, num_groups, options.num_beams, options.max_new_tokens, rules, num_return, watch)


# --------------------------------------------------------------------------------------------------------
# Scoring: log-likelihoods and posteriors of given answers, under every passage.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerScores:
    """Scores of H answers, each under the K passages of its question."""

    token_logprobs: torch.Tensor  # [H, K, T] log p(y_t|x,z_k,y<t), 0 beyond each answer's length
    mask: torch.Tensor  # [H, T] true on the answer's tokens
    prior: torch.Tensor  # [H, K] log p(z_k|x)

    def passage_loglik(self) -> torch.Tensor:
        """log p(y|x,z_k). [H, K]"""
        return self.token_logprobs.sum(-1)

    def rag_sequence(self) -> torch.Tensor:
        """log p(y|x) = logsumexp_k [log p(z_k|x) + log p(y|x,z_k)]. [H]"""
        return torch.logsumexp(self.prior + self.passage_loglik(), dim=-1)

    def rag_token(self) -> torch.Tensor:
        """log p(y|x) = sum_t logsumexp_k [log p(z_k|x) + log p(y_t|x,z_k,y<t)]. [H]"""
        per_token = torch.logsumexp(self.prior[:, :, None] + self.token_logprobs, dim=1)
        return torch.where(self.mask, per_token, 0.0).sum(-1)

    def log_prob(self, mode: Mode) -> torch.Tensor:
        """The marginal of the mode (with one context, as the baselines have, the two agree)."""
        return self.rag_sequence() if mode is Mode.SEQUENCE else self.rag_token()

    def posterior(self) -> torch.Tensor:
        """p(z_k|x,y): which passages the answer rests on. [H, K]"""
        return torch.softmax(self.prior + self.passage_loglik(), dim=-1)

    def select(self, index: Sequence[int]) -> AnswerScores:
        """The scores of the answers at `index`."""
        at = torch.tensor(index, dtype=torch.long)
        return AnswerScores(self.token_logprobs[at], self.mask[at], self.prior[at])


def answer_targets(answers: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers as right-padded targets [H, T], and the mask [H, T] of their real tokens."""
    T = max(len(a) for a in answers)
    targets = torch.full((len(answers), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(answers), T, dtype=torch.bool)
    for h, answer in enumerate(answers):
        targets[h, : len(answer)] = torch.tensor(answer, dtype=torch.long)
        mask[h, : len(answer)] = True
    return targets, mask


def score_answers(
    lm: PassageLM,
    ctx: Contexts,
    prior: torch.Tensor,
    questions: Sequence[int],
    answers: Sequence[Sequence[int]],
    watch: Watch | None = None,
) -> AnswerScores:
    """Teacher-force answer h (of question questions[h]) under each of that question's K passages."""
    K = ctx.contexts_per_question
    targets, mask = answer_targets(answers, lm.rules.pad_token_id)
    question_index = torch.tensor(questions, dtype=torch.long)
    rows = (question_index[:, None] * K + torch.arange(K)).view(-1)  # (answer h, passage k) -> context row
    lengths = [len(answer) for answer in answers for _ in range(K)]  # rows of like length run together
    per_row = lm.token_logprobs(ctx, rows, targets.repeat_interleave(K, dim=0), lengths, watch)
    logprobs = torch.where(mask[:, None, :], per_row.view(len(answers), K, -1), 0.0)
    return AnswerScores(logprobs, mask, prior[question_index])


def without_forced_bos(
    scores: AnswerScores, questions: Sequence[int], answers: Sequence[Sequence[int]], bos_token_id: int | None
) -> AnswerScores:
    """The scores transformers ranks RAG-Sequence hypotheses by: the first token unscored when every answer of a
    question starts with BOS (a forced BOS says nothing about the answer, but where some candidates lack it, it
    tells them apart)."""
    if bos_token_id is None:
        return scores
    starts = [answer[0] == bos_token_id for answer in answers]
    every = {b: all(s for s, q in zip(starts, questions, strict=True) if q == b) for b in set(questions)}
    mask = scores.mask.clone()
    mask[:, 0] &= torch.tensor([not every[b] for b in questions])
    return AnswerScores(torch.where(mask[:, None, :], scores.token_logprobs, 0.0), mask, scores.prior)


# --------------------------------------------------------------------------------------------------------
# Decoding: RAG-Token and RAG-Sequence.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    tokens: tuple[int, ...]
    log_prob: float  # marginal log p(y|x) under the decoding mode
    posterior: tuple[float, ...]  # p(z_k|x,y)


def generate(
    lm: PassageLM,
    ctx: Contexts,
    prior: torch.Tensor,
    options: DecodingOptions,
    watch: Watch | None = None,
    draft_tokens: int = 0,
) -> list[list[Generated]]:
    """Decode every question of `ctx`; per question, `num_return_sequences` answers, best first. `watch` sees
    each step: with greedy RAG-Token (and the baselines) the token chosen for each question, else None. Greedy
    search (RAG-Token's, each passage's in RAG-Sequence) verifies up to `draft_tokens` tokens drafted from the
    inputs per step (the same tokens)."""
    scores: AnswerScores | None = None
    passes = None if watch is None else lambda _: watch(None)  # what is decoded is not the answer's yet
    if options.mode is Mode.SEQUENCE:  # each passage's own beams: no token is the answer's until the end
        chosen, scores = _rag_sequence_search(lm, ctx, prior, options, passes, draft_tokens)
    elif options.num_beams == 1 and draft_tokens and ctx.source_ids:
        chosen, scores = _drafted_rag_token_search(lm, ctx, prior, options, watch, draft_tokens)
    else:  # RAG-Token, or a baseline's single context (where RAG-Token is plain decoding)
        chosen, scores = _rag_token_search(lm, ctx, prior, options, watch)
    questions = [b for b, answers in enumerate(chosen) for _ in answers]
    flat = [answer for answers in chosen for answer in answers]
    if scores is None:  # exact marginals and posteriors of the chosen answers, in one teacher-forced pass
        scores = score_answers(lm, ctx, prior, questions, flat, watch=passes)
    log_probs, posteriors = scores.log_prob(options.mode).tolist(), scores.posterior().tolist()
    results: list[list[Generated]] = [[] for _ in chosen]
    for h, (b, tokens) in enumerate(zip(questions, flat, strict=True)):
        results[b].append(Generated(tuple(tokens), log_probs[h], tuple(posteriors[h])))
    return results


def _rag_token_search(
    lm: PassageLM, ctx: Contexts, prior: torch.Tensor, options: DecodingOptions, watch: Watch | None
) -> tuple[list[list[tuple[int, ...]]], AnswerScores | None]:
    """Search over the per-step marginal: one decoder row per (question, beam, passage). Greedy search also
    returns the answers' scores: it has computed every chosen token's log-probability under every passage, so
    scoring them again would repeat the work (beams are reordered, so those are scored afterwards)."""
    B, K, N = ctx.num_questions, ctx.contexts_per_question, options.num_beams
    passages = torch.arange(K)
    rows = (torch.arange(B)[:, None, None] * K + passages).expand(B, N, K).reshape(-1)
    state = lm.start(ctx, rows)
    beam_prior = prior.repeat_interleave(N, dim=0)[:, :, None]  # [B*N, K, 1]
    picked: list[torch.Tensor] = []  # greedy: log p(y_t|x,z_k,y<t) of each chosen token, [B, K] per step
    last: list[torch.Tensor] = []  # greedy: the latest step's per-passage log-probs, until its token is known

    def next_logprobs(tokens: torch.Tensor | None, origin: torch.Tensor | None) -> torch.Tensor:
        if origin is not None:  # every passage row of a beam follows its beam
            lm.reorder(state, (origin[:, None] * K + passages).view(-1))
        fed = None if tokens is None else tokens.repeat_interleave(K)
        per_passage = lm.step(state, fed).view(B * N, K, -1)
        if N == 1:
            if tokens is not None:
                picked.append(_log_prob_of(last.pop(), tokens))
            last.append(per_passage)
        return torch.logsumexp(beam_prior + per_passage, dim=1)  # log p'(y_t) = logsumexp_k [...]

    found = search(next_logprobs, B, options, lm.rules, options.num_return_sequences, watch)
    chosen = [[c.tokens for c in group[: options.num_return_sequences]] for group in found]
    if N > 1:
        return chosen, None
    answers = [group[0] for group in chosen]
    step = len(picked)  # the last step's token was chosen but never fed
    final = torch.tensor([a[step] if len(a) > step else lm.rules.pad_token_id for a in answers])
    picked.append(_log_prob_of(last.pop(), final))
    return chosen, _picked_scores(answers, picked, prior, lm.rules.pad_token_id)


def _drafted_rag_token_search(
    lm: PassageLM, ctx: Contexts, prior: torch.Tensor, options: DecodingOptions, watch: Watch | None, draft_tokens: int
) -> tuple[list[list[tuple[int, ...]]], AnswerScores]:
    """Greedy RAG-Token that verifies drafted tokens: each pass feeds the token just chosen and up to
    `draft_tokens` tokens that follow the answer's last n-gram where it occurs in the question's inputs (prompt
    lookup, as LLMA and transformers' prompt_lookup_num_tokens do), and keeps the drafted tokens for as long as
    they are what greedy search chooses from the marginal at their position. Answers copy from the passages, so
    several tokens often come out of one pass; the tokens are plain greedy's (each position's choice is made
    with the same rules from the same history), the rows' caches forget what was not accepted."""
    B, K = ctx.num_questions, ctx.contexts_per_question
    rules, max_new = lm.rules, options.max_new_tokens
    state = lm.start(ctx, torch.arange(B * K))
    eos = torch.tensor(rules.eos_token_ids)
    generated = torch.empty(B, 0, dtype=torch.long)
    unfinished = torch.ones(B, dtype=torch.bool)
    picked: list[torch.Tensor] = []  # log p(y_t|x,z_k,y<t) of each chosen token, [B, K] per step
    per_passage = lm.step(state, None).view(B, K, 1, -1)  # [B, K, positions, V]
    drafts = torch.empty(B, 0, dtype=torch.long)  # fed after the chosen token; [B, 0] before the first pass
    fed_before = state.fed
    while True:
        position = 0
        while True:  # choose at each position while the drafted tokens fed before it were the choices
            marginal = torch.logsumexp(prior[:, :, None] + per_passage[:, :, position], dim=1)  # [B, V]
            chosen = _greedy_choice(marginal, generated, unfinished, max_new, rules)
            picked.append(_log_prob_of(per_passage[:, :, position], chosen))
            generated = torch.cat([generated, chosen[:, None]], dim=1)
            unfinished &= ~torch.isin(chosen, eos)
            if watch is not None:
                watch(chosen)
            if not unfinished.any() or generated.shape[1] == max_new:
                return _answers_and_scores(generated, picked, prior, rules)
            if position == drafts.shape[1] or not bool((drafts[:, position] == chosen)[unfinished].all()):
                break
            position += 1
        if drafts.shape[1]:
            metrics.DRAFT_ACCEPTED.observe(position)
            lm.rewind(state, fed_before + 1 + position)  # the token fed before the drafts, and those chosen
        room = max_new - generated.shape[1] - 1
        proposals = [
            _proposal(history := generated[b].tolist(), ctx.question_source_ids(b) + history, min(draft_tokens, room))
            if unfinished[b]
            else []
            for b in range(B)
        ]
        drafts = torch.full((B, max(len(d) for d in proposals)), rules.pad_token_id, dtype=torch.long)
        for b, draft in enumerate(proposals):
            drafts[b, : len(draft)] = torch.tensor(draft, dtype=torch.long)
        fed_before = state.fed
        feed = torch.cat([chosen[:, None], drafts], dim=1).repeat_interleave(K, dim=0)
        per_passage = lm.feed(state, feed).view(B, K, feed.shape[1], -1)


def _proposal(history: list[int], source: list[int], count: int, longest_ngram: int = 3) -> list[int]:
    """Up to `count` tokens that follow the longest recent n-gram of `history` where it first occurs in
    `source` (prompt lookup decoding), not counting its own place at the end; none when it does not occur."""
    if count <= 0:
        return []
    for n in range(min(longest_ngram, len(history)), 0, -1):
        ngram = history[-n:]
        for i in range(len(source) - n):
            if source[i : i + n] == ngram:
                return source[i + n : i + n + count]
    return []


def _answers_and_scores(
    generated: torch.Tensor, picked: list[torch.Tensor], prior: torch.Tensor, rules: DecodingRules
) -> tuple[list[list[tuple[int, ...]]], AnswerScores]:
    """Greedy answers (up to their end-of-sequence token) and their scores from the chosen tokens' per-passage
    log-probabilities."""
    lengths = _lengths(generated, rules.eos_token_ids)
    answers = [tuple(generated[b, : lengths[b]].tolist()) for b in range(len(generated))]
    return [[a] for a in answers], _picked_scores(answers, picked, prior, rules.pad_token_id)


def _picked_scores(
    answers: Sequence[Sequence[int]], picked: list[torch.Tensor], prior: torch.Tensor, pad_token_id: int
) -> AnswerScores:
    """The scores of greedy answers from what the search computed: `picked` holds, per step, each chosen
    token's log-probability under every passage [B, K]; positions past an answer are masked out."""
    _, mask = answer_targets(answers, pad_token_id)
    token_logprobs = torch.stack(picked, dim=-1)[:, :, : mask.shape[1]]  # [B, K, T]
    return AnswerScores(torch.where(mask[:, None, :], token_logprobs, 0.0), mask, prior)


def _log_prob_of(per_passage: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token_b | x, z_k, ...) from per-passage log-probs [B, K, V] and one token per question. [B, K]"""
    return per_passage.gather(-1, tokens.view(-1, 1, 1).expand(-1, per_passage.shape[1], 1)).squeeze(-1)


def _rag_sequence_search(
    lm: PassageLM,
    ctx: Contexts,
    prior: torch.Tensor,
    options: DecodingOptions,
    watch: Watch | None,
    draft_tokens: int = 0,
) -> tuple[list[list[tuple[int, ...]]], AnswerScores | None]:
    """Each passage's own hypotheses (its beams, or its greedy answer), pooled per question and ranked by the
    marginal. Thorough decoding also returns the chosen answers' scores: it has scored every hypothesis under every
    passage (greedy and undrafted, while searching: `_greedy_hypotheses_scored`)."""
    B, N = ctx.num_questions, options.num_beams
    drafted = N == 1 and bool(draft_tokens) and bool(ctx.source_ids)
    scored: AnswerScores | None
    if N == 1 and options.thorough and not drafted:
        pools, scored = _greedy_hypotheses_scored(lm, ctx, prior, options, watch)
    else:
        pools, scored = _pooled_hypotheses(lm, ctx, prior, options, watch, draft_tokens if drafted else 0)
    questions, flat = _flattened(pools)
    if scored is not None:  # thorough: the exact marginal (with transformers' BOS rule for ranking)
        marginals = without_forced_bos(scored, questions, flat, lm.bos_token_id).rag_sequence()
    else:  # fast: each hypothesis scored under the passages whose own beams found it
        fast = [pool.beam_loglik for pool in pools if pool.beam_loglik is not None]
        assert len(fast) == B
        marginals = torch.cat([torch.logsumexp(prior[b] + loglik, dim=-1) for b, loglik in enumerate(fast)])
    starts = [0, *itertools.accumulate(len(pool) for pool in pools)]
    best = [
        marginals[starts[b] : starts[b + 1]].topk(min(options.num_return_sequences, len(pools[b]))) for b in range(B)
    ]
    picked = [[starts[b] + i for i in best[b].indices.tolist()] for b in range(B)]
    chosen = [[flat[h] for h in group] for group in picked]
    return chosen, None if scored is None else scored.select([h for group in picked for h in group])


@dataclass
class _Pool:
    """A question's distinct hypotheses, in first-seen order (as transformers deduplicates)."""

    hypotheses: list[tuple[int, ...]]
    # Fast decoding's scores: log p(y|x,z_k) under the passages whose own beams found y, -inf elsewhere. [H, K]
    beam_loglik: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.hypotheses)


def _flattened(pools: Sequence[_Pool]) -> tuple[list[int], list[tuple[int, ...]]]:
    """Every pool's hypotheses in one list, question-major, and the question of each."""
    return [b for b, pool in enumerate(pools) for _ in pool.hypotheses], [h for pool in pools for h in pool.hypotheses]


def _pooled_hypotheses(
    lm: PassageLM, ctx: Contexts, prior: torch.Tensor, options: DecodingOptions, watch: Watch | None, draft_tokens: int
) -> tuple[list[_Pool], AnswerScores | None]:
    """Each passage's own beams (or drafted greedy answer), pooled per question; thorough decoding then scores
    every hypothesis under every passage in one teacher-forced pass."""
    B, K, N = ctx.num_questions, ctx.contexts_per_question, options.num_beams
    if draft_tokens:  # greedy per passage: each row is a question of one context
        rows = ctx.rows_as_questions()
        answers, drafted = _drafted_rag_token_search(lm, rows, torch.zeros(B * K, 1), options, watch, draft_tokens)
        own = drafted.passage_loglik()[:, 0].tolist()  # log p(y|x,z) of each row's answer under its own passage
        per_passage = [[Candidate(a[0], own[r])] for r, a in enumerate(answers)]
    else:
        state = lm.start(ctx, torch.arange(B * K).repeat_interleave(N))  # rows (question, passage, beam)

        def next_logprobs(tokens: torch.Tensor | None, origin: torch.Tensor | None) -> torch.Tensor:
            if origin is not None:
                lm.reorder(state, origin)
            return lm.step(state, tokens)

        per_passage = search(next_logprobs, B * K, options, lm.rules, num_return=N, watch=watch)

    pools: list[_Pool] = []
    for b in range(B):
        seen: dict[tuple[int, ...], int] = {}
        found = [(k, c) for k in range(K) for c in per_passage[b * K + k]]
        for _, c in found:
            seen.setdefault(c.tokens, len(seen))
        loglik = torch.full((len(seen), K), float("-inf"))
        for k, c in found:
            loglik[seen[c.tokens], k] = c.log_prob
        pools.append(_Pool(list(seen), loglik))
    if not options.thorough:
        return pools, None
    questions, flat = _flattened(pools)
    return pools, score_answers(lm, ctx, prior, questions, flat, watch=watch)


def _greedy_hypotheses_scored(
    lm: PassageLM, ctx: Contexts, prior: torch.Tensor, options: DecodingOptions, watch: Watch | None
) -> tuple[list[_Pool], AnswerScores]:
    """Thorough RAG-Sequence with one beam, as one search. Hypothesis h of a question is passage h's greedy
    answer; each token it chooses is fed to a row of every passage of the question, so its log-likelihood under
    every passage is known when it ends and no second pass teacher-forces the hypotheses. Hypotheses with the
    same tokens so far share those rows (they read the same passages after the same tokens), and part when they
    choose differently; rows stop when their hypotheses have ended. A hypothesis is ruled out before its end once
    no answer starting with it can win: log p(y<t|x,z_j) only falls as tokens are added, so
    logsumexp_j [log p(z_j|x) + log p(y<t|x,z_j)] bounds the marginal of every answer that starts with y<t, and an
    ended answer already ranks above the bound (one beam returns one answer). The answers and their scores are
    those of searching each passage and then scoring every hypothesis."""
    B, K, rules = ctx.num_questions, ctx.contexts_per_question, lm.rules
    H, max_new = B * K, options.max_new_tokens  # hypotheses, question-major
    question = torch.arange(H) // K
    own = torch.arange(H) % K  # hypothesis h of a question chooses from its own passage's row
    eos = torch.tensor(rules.eos_token_ids)
    generated = torch.empty(H, 0, dtype=torch.long)
    running = torch.ones(H, dtype=torch.bool)  # neither ended nor ruled out
    ended = torch.zeros(H, dtype=torch.bool)
    picked: list[torch.Tensor] = []  # per step, log p(y_t|x,z_j,y<t) of each hypothesis's token [H, K]
    ranked = torch.zeros(H, K)  # log p(y<t|x,z_j) as the ranking counts it (transformers' BOS rule)
    hypothesis_prior = prior[question]
    # The state's rows come in groups of K, one per distinct prefix: group g reads every passage of its question.
    # `alive` are the running hypotheses, `group_of` their groups; at first a question's hypotheses share one.
    state = lm.start(ctx, torch.arange(B * K))
    alive, group_of = torch.arange(H), question.clone()
    passages = torch.arange(K)
    tokens: torch.Tensor | None = None
    for t in range(max_new):
        step = lm.step(state, tokens)
        per_group = step.view(-1, K, step.shape[-1])  # [groups, K, V]
        choice = _greedy_choice(per_group[group_of, own[alive]], generated[alive], running[alive], max_new, rules)
        chosen = torch.full((H,), rules.pad_token_id).index_copy(0, alive, choice)
        under_each = per_group[group_of[:, None], passages, choice[:, None]]  # [alive, K]
        logprobs = torch.zeros(H, K).index_copy(0, alive, under_each)
        picked.append(logprobs)
        if t == 0:  # the ranking leaves a first BOS unscored when every hypothesis of the question has it
            starts_with_bos = (chosen == (lm.bos_token_id if lm.bos_token_id is not None else -1)).view(B, K)
            every, some = starts_with_bos.all(1), starts_with_bos.any(1)
            # Ruling out is exact where it cannot change that rule for the hypotheses left: none or all start so.
            prunable = (every | ~some)[question]
            ranked += torch.where(every[question, None], 0.0, logprobs)
        else:
            ranked += logprobs
        generated = torch.cat([generated, chosen[:, None]], dim=1)
        ending = running & (torch.isin(chosen, eos) | (t == max_new - 1))
        ended |= ending
        running &= ~ending
        bound = torch.logsumexp(hypothesis_prior + ranked, dim=-1)  # exact for the ended ones
        best_ended = torch.where(ended, bound, float("-inf")).view(B, K).amax(1)  # one answer is returned
        ruled_out = running & (bound < best_ended[question]) & prunable
        metrics.HYPOTHESES_RULED_OUT.inc(int(ruled_out.sum()))
        running &= ~ruled_out
        if watch is not None:
            watch(chosen)
        if not running.any():
            break
        # Regroup: the running hypotheses of a group that chose the same token go on in one group.
        going_on = running[alive]
        alive = alive[going_on]
        groups, group_of = torch.unique(torch.stack([group_of, choice], 1)[going_on], dim=0, return_inverse=True)
        if len(groups) != len(per_group) or not bool((groups[:, 0] == torch.arange(len(groups))).all()):
            lm.keep(state, (groups[:, :1] * K + passages).view(-1))  # groups that parted fork their rows
        tokens = groups[:, 1].repeat_interleave(K)

    lengths = _lengths(generated, rules.eos_token_ids)
    pools: list[_Pool] = []
    kept: list[int] = []  # the first hypothesis of each distinct ended answer, question-major
    for b in range(B):
        seen: dict[tuple[int, ...], int] = {}
        for h in range(b * K, (b + 1) * K):
            answer = tuple(generated[h, : lengths[h]].tolist())
            if ended[h] and answer not in seen:
                seen[answer] = h
        kept += seen.values()
        pools.append(_Pool(list(seen)))
    _, answers = _flattened(pools)
    scores = _picked_scores(answers, [at_t[kept] for at_t in picked], hypothesis_prior[kept], rules.pad_token_id)
    return pools, scores


# --------------------------------------------------------------------------------------------------------
# Training: the paper's loss (section 2.4) is the negative log of the same marginals.
# --------------------------------------------------------------------------------------------------------


def marginal_nll(token_logprobs: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor, mode: Mode) -> torch.Tensor:
    """-log p(y|x) of each question's target under RAG-Token or RAG-Sequence. [B]

    `token_logprobs` [B, K, T] is log p(y_t|x,z_k,y<t) (PassageLM.teacher_forced), `mask` [B, T] marks the
    target's tokens and `prior` [B, K] is log p(z|x). Gradients reach the generator through the first and the
    query encoder through the prior (doc_scores = q . d, with d fixed in the index); no passage is labelled.
    """
    mask = mask.to(token_logprobs.device)
    scores = AnswerScores(torch.where(mask[:, None, :], token_logprobs, 0.0), mask, prior.to(token_logprobs.device))
    return -scores.log_prob(mode)
