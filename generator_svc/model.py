"""The model and what the service does with it: decode (RAG-Token, RAG-Sequence, baselines) and score answers.

`RagModel` turns checked requests into rows for the `PassageLM` and hands them to the RAG math; it runs on the
worker thread only (generator_svc.worker).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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


class RagModel:
    def __init__(self, lm: PassageLM, draft_tokens: int = 0) -> None:
        self.lm = lm
        self.draft_tokens = draft_tokens  # drafted tokens greedy RAG-Token verifies per pass (0: none)

    def warm_up(self, passages: int = 5) -> None:
        """Run the passes a request runs (prompts, decoding steps and scoring, both RAG modes) once before the
        service reports SERVING: the first calls of a process pay for allocations, thread pools and the kernels
        oneDNN builds for each shape, which made the first Ask after start several times slower."""
        given = [Passage(f"warm-up-{i}", f"Subject {i}", WARM_UP_TEXT, score=1.0 / (i + 1)) for i in range(passages)]
        for mode in (Mode.TOKEN, Mode.SEQUENCE):
            options = DecodingOptions(mode=mode, max_new_tokens=4).with_defaults(4, 1.0)
            try:
                self.generate([Request("What is the subject of this passage?", given, options)])
            except Exception as err:  # an optimisation: a model that cannot run these shapes still serves
                log.warning("warm-up (%s) failed, serving without it: %s", mode.label, err)
                return

    def _contexts(self, request: Request) -> tuple[list[Context], torch.Tensor, torch.Tensor]:
        """What each row reads, the prior the math uses over the rows, and p(z|x) over the passages."""
        options = request.options
        passages = request.passages[: request.n_docs]
        prior = rag_math.log_prior(request.doc_scores(), options.score_temperature)
        if options.mode.is_rag:
            return one_each(passages), prior, prior
        context: Context = () if options.mode is Mode.CLOSED_BOOK else tuple(passages)
        return [context], torch.zeros(1), prior

    def prompt_tokens(self, request: Request) -> int:
        """What the request's prompts cost in tokens (all its rows)."""
        return self.lm.prompt_tokens(request.question, self._contexts(request)[0])

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
