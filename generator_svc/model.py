"""The model and what the service does with it: decode (RAG-Token, RAG-Sequence, baselines) and score answers.

`RagModel` turns checked requests into rows for the `PassageLM` and hands them to the RAG math; it runs on the
worker thread only (generator_svc.worker).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence

import torch

from generator_svc import rag_math
from generator_svc.passage_lm import Context, PassageLM, Watch, one_each
from generator_svc.requests import AnswerScore, Request, Scored
from rag import metrics
from rag.types import Answered, DecodingOptions, Hypothesis, Mode, Passage

log = logging.getLogger(__name__)


class TextDeltas:
    """The text of an answer decoded so far, handed out as the pieces that extend what was sent. A replacement
    character at the end is held back: it may be a multi-byte character split over tokens (an incomplete UTF-8
    sequence decodes to one), which the next token completes."""

    def __init__(self, lm: PassageLM) -> None:
        self.lm = lm
        self.tokens: list[int] = []
        self.sent = ""
        self.ended = False

    def push(self, token: int) -> str:
        if self.ended:
            return ""
        self.tokens.append(token)
        self.ended = token in self.lm.rules.eos_token_ids
        text = self.lm.decode(self.tokens)
        text = text[:-1] if text.endswith("\ufffd") else text
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


# A typical passage (a Wikipedia lead's length) for the warm-up passes.
WARM_UP_TEXT = " ".join(
    ["The passage describes a subject in the plain words of an encyclopedia article, with dates and names."] * 6
)
WARM_UP_QUESTION = "What is the subject of this passage?"


def warm_up_passages(count: int) -> list[Passage]:
    return [Passage(f"warm-up-{i}", f"Subject {i}", WARM_UP_TEXT, score=1.0 / (i + 1)) for i in range(count)]


# Drafted greedy decoding (rag_math) feeds the chosen token and d drafted ones per pass and keeps the drafts greedy
# search would have chosen. On the demo model's warm RAG-Token answers (k = 5, 20 questions), 1, 2, 3 and 5 drafts
# cut the passes from 11.6 to 8.7, 7.8, 7.5 and 7.1: as if a first draft were kept a third of the time and each
# further one 46% of the times the one before it was (`tokens_per_pass` is within 2% of each).
DRAFT_CHOICES = (0, 1, 2, 3, 5, 8)


def tokens_per_pass(drafts: int, first: float = 1 / 3, then: float = 0.46) -> float:
    """The tokens a pass yields on average when it verifies `drafts` drafted tokens."""
    return 1 + first * (1 - then**drafts) / (1 - then)


# Drafting must save a tenth of the time per token: a drafted pass also looks its drafts up and rewinds what was not
# kept, which a pass's time leaves out.
WORTH_DRAFTING = 0.9


def drafts_for(pass_cost: Mapping[int, float]) -> int:
    """The drafted tokens per pass with the least expected time per token, given what a pass verifying each count
    costs (`pass_cost[0]`: a plain step's); none unless that is under WORTH_DRAFTING of a plain step's."""
    per_token = {drafts: cost / tokens_per_pass(drafts) for drafts, cost in pass_cost.items()}
    best = min(per_token, key=per_token.__getitem__)
    return best if per_token[best] < WORTH_DRAFTING * per_token[0] else 0


class RagModel:
    def __init__(self, lm: PassageLM, draft_tokens: int = 0) -> None:
        self.lm = lm
        self.draft_tokens = draft_tokens  # drafted tokens greedy RAG-Token verifies per pass (0: none)

    def warm_up(self, passages: int = 5) -> None:
        """Run the passes a request runs (prompts, decoding steps and scoring, both RAG modes) once before the
        service reports SERVING: the first calls of a process pay for allocations, thread pools and the kernels
        oneDNN builds for each shape, which made the first Ask after start several times slower."""
        given = warm_up_passages(passages)
        for mode in (Mode.TOKEN, Mode.SEQUENCE):
            options = DecodingOptions(mode=mode, max_new_tokens=4).with_defaults(4, 1.0)
            try:
                self.generate([Request(WARM_UP_QUESTION, given, options)])
            except Exception as err:  # an optimisation: a model that cannot run these shapes still serves
                log.warning("warm-up (%s) failed, serving without it: %s", mode.label, err)
                return

    def measure_drafting(self, passages: int = 5, rounds: int = 3) -> tuple[int, str]:
        """Drafted tokens per pass for this machine and model (`drafts_for`), and why. Each count d of DRAFT_CHOICES
        is timed as a pass over 1 + d positions against a plain pass right after it (the median ratio of `rounds`
        pairs: a shared machine's speed drifts by a fifth within minutes, and a pair sees one speed), up to the
        first count so slow that no count above it can beat the best so far. The rows are those of the widest
        drafted pass a request runs: thorough greedy RAG-Sequence feeds each of its `passages` answers under every
        passage. Where arithmetic is cheap next to reading the weights (a GPU; a small model, whose passes are
        mostly overhead) more positions cost little and drafting pays; 2 cores of an AMD EPYC are compute-bound
        at these rows and keep none."""
        most = tokens_per_pass(max(DRAFT_CHOICES))
        try:
            ctx = self.lm.encode([WARM_UP_QUESTION], [one_each(warm_up_passages(passages))])
            rows, longest = torch.arange(passages).repeat(passages), 1 + max(DRAFT_CHOICES)
            tokens = (self.lm.answer_token_ids(" ".join(["subject"] * longest)) * longest)[:longest]
            fed = torch.tensor(tokens).expand(len(rows), -1)

            def seconds(positions: int) -> float:
                state = self.lm.start(ctx, rows)
                started = time.perf_counter()
                self.lm.feed(state, fed[:, :positions])  # log-probabilities back on the CPU: synchronised
                return time.perf_counter() - started

            cost = {0: 1.0}  # a pass's time over a plain pass's
            seconds(1)  # the first pass of a shape builds its kernels
            for drafts in DRAFT_CHOICES[1:]:
                seconds(1 + drafts)
                cost[drafts] = statistics.median(seconds(1 + drafts) / seconds(1) for _ in range(rounds))
                best = min(WORTH_DRAFTING, *(c / tokens_per_pass(d) for d, c in cost.items() if d))
                if cost[drafts] / most >= best:
                    break  # no pass over more positions (longer still) can be worth it, nor beat the best so far
        except Exception as err:  # an optimisation, as the warm-up is
            log.warning("measuring drafted passes failed, drafting none: %s", err)
            return 0, f"measuring failed: {err}"
        measured = {d: c for d, c in cost.items() if d}
        positions = ", ".join(str(1 + d) for d in measured)
        costs = ", ".join(f"{c:.2f}x" for c in measured.values())
        why = f"measured: passes over {positions} positions of {len(rows)} rows took {costs} a plain one"
        return drafts_for(cost), why

    def _contexts(self, request: Request) -> tuple[list[Context], torch.Tensor, torch.Tensor]:
        """What each row reads, the prior the math uses over the rows, and p(z|x) over the passages."""
        options = request.options
        passages = request.passages[: request.n_docs]
        prior = rag_math.log_prior(request.doc_scores(), options.score_temperature)
        if options.mode.is_rag:
            return one_each(passages), prior, prior
        context: Context = () if options.mode is Mode.CLOSED_BOOK else tuple(passages)
        return [context], torch.zeros(1), prior

    def prompt_lengths(self, request: Request) -> list[int]:
        """Each of the request's prompts (its rows), in tokens."""
        return self.lm.prompt_lengths(request.question, self._contexts(request)[0])

    def generate(self, batch: Sequence[Request], watch: Watch | None = None) -> list[Answered]:
        """Decode a batch of requests that share their decoding options and passage count; `watch` sees every
        model pass (prompt chunks, then rag_math.generate's steps) and may stop the work."""
        options = batch[0].options
        prepared = [self._contexts(r) for r in batch]
        with metrics.timed("generate"):
            ctx = self.lm.encode([r.question for r in batch], [contexts for contexts, _, _ in prepared], watch)
            prior = torch.stack([prior for _, prior, _ in prepared])
            found = rag_math.generate(self.lm, ctx, prior, options, watch, self.draft_tokens)
        results = []
        for per_question, (_, _, passage_prior) in zip(found, prepared, strict=True):
            metrics.GENERATED_TOKENS.inc(sum(len(g.tokens) for g in per_question))
            hypotheses = tuple(
                Hypothesis(self.lm.decode(g.tokens), g.log_prob, g.posterior if options.mode.is_rag else (), g.tokens)
                for g in per_question
            )
            results.append(Answered(hypotheses, tuple(passage_prior.exp().tolist())))
        return results

    def score(self, request: Request, answers: Sequence[str], watch: Watch | None = None) -> Scored:
        """Each answer's marginal and posterior; `watch` sees every model pass and may stop the work."""
        contexts, prior, passage_prior = self._contexts(request)
        with metrics.timed("score"):
            ctx = self.lm.encode([request.question], [contexts], watch)
            tokens = [self.lm.answer_token_ids(a) for a in answers]
            scores = rag_math.score_answers(self.lm, ctx, prior[None, :], [0] * len(answers), tokens, watch=watch)
            log_probs = scores.log_prob(request.options.mode).tolist()
            posteriors = scores.posterior().tolist() if request.options.mode.is_rag else [[]] * len(answers)
        return Scored(
            tuple(
                AnswerScore(a, lp, len(t), tuple(post))
                for a, lp, t, post in zip(answers, log_probs, tokens, posteriors, strict=True)
            ),
            tuple(passage_prior.exp().tolist()),
        )
