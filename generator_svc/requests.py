"""What a Generate or Score request asks for, parsed and checked against the limits this generator serves.

The generator owns these limits (it knows its model); the gateway passes requests through unchanged. Everything
is checked here, before batching, so that a bad request fails alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rag.errors import require
from rag.types import MAX_PASSAGE_CHARS, DecodingOptions, Passage, parse_question, passage_problem, require_finite
from rag.v1 import generator_pb2, passage_pb2

MAX_ANSWER_CHARS_PER_TOKEN = 32  # no tokenizer packs more into one token


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this generator; requests beyond these get INVALID_ARGUMENT."""

    max_passages: int = 50
    max_passage_chars: int = MAX_PASSAGE_CHARS
    max_beams: int = 8
    max_new_tokens: int = 256
    max_answers: int = 32
    # Cost is in tokens: a question of 2,000 characters may be 8,000 tokens, and it is read once per passage.
    max_question_tokens: int = 512
    max_prompt_tokens: int = 16384  # k = 50 passages of 256 tokens with a short question fit

    def check(self, options: DecodingOptions) -> None:
        require(
            1 <= options.num_beams <= self.max_beams,
            f"num_beams must be in [1, {self.max_beams}], got {options.num_beams}",
        )
        require(
            1 <= options.max_new_tokens <= self.max_new_tokens,
            f"max_new_tokens must be in [1, {self.max_new_tokens}], got {options.max_new_tokens}",
        )
        require(
            options.n_docs <= self.max_passages, f"n_docs must be in [0, {self.max_passages}], got {options.n_docs}"
        )

    def check_tokens(
        self,
        question_tokens: int,
        prompt_lengths: Callable[[], list[int]],
        answer_tokens: int,
        max_positions: int | None,
    ) -> None:
        """The question's tokens, then (counted only for a question that passes) all the request's prompts', and
        that each prompt with an answer of `answer_tokens` fits the model's `max_positions` (where it has them: a
        decoder-only model would index past its position table, or read positions it was never trained on)."""
        require(
            question_tokens <= self.max_question_tokens,
            f"the question is {question_tokens} tokens; this generator takes {self.max_question_tokens} at most "
            "(--max-question-tokens)",
        )
        lengths = prompt_lengths()
        require(
            sum(lengths) <= self.max_prompt_tokens,
            f"the request's prompts are {sum(lengths)} tokens (the question is read once per passage); this "
            f"generator takes {self.max_prompt_tokens} per request (--max-prompt-tokens): use fewer passages or a "
            "shorter question",
        )
        longest = max(lengths, default=0)
        require(
            max_positions is None or longest + answer_tokens <= max_positions,
            f"a prompt of {longest} tokens and an answer of up to {answer_tokens} do not fit the model's "
            f"{max_positions} positions: use fewer passages (concatenation reads them all in one prompt), shorter "
            "ones, or fewer new tokens",
        )

    def passages(self, pbs: Sequence[passage_pb2.Passage]) -> list[Passage]:
        require(len(pbs) > 0, "no passages given; the generator conditions on at least one")
        require(len(pbs) <= self.max_passages, f"{len(pbs)} passages given; the limit is {self.max_passages}")
        passages = [Passage.from_pb(pb) for pb in pbs]
        for i, p in enumerate(passages):
            problem = passage_problem(p.title, p.text, self.max_passage_chars)
            require(problem is None, f"passage {i} ({p.id!r}) {problem}")
        return passages

    def answers(self, answers: Sequence[str], token_ids: Callable[[str], list[int]]) -> tuple[list[str], int]:
        """Score's answers, each one no longer, in the model's tokens, than an answer it may generate (checked on
        characters first, so that a huge answer is refused before it is tokenized); and the longest one's tokens."""
        require(0 < len(answers) <= self.max_answers, f"give 1 to {self.max_answers} answers, got {len(answers)}")
        longest = 0
        for i, answer in enumerate(answers):
            require(bool(answer.strip()), f"answer {i} is empty")
            require(
                len(answer) <= MAX_ANSWER_CHARS_PER_TOKEN * self.max_new_tokens,
                f"answer {i} is {len(answer)} characters; answers may be {self.max_new_tokens} tokens at most",
            )
            tokens = len(token_ids(answer))
            require(
                tokens <= self.max_new_tokens + 2,  # + the BOS and EOS a checkpoint adds
                f"answer {i} is {tokens} tokens; answers may be {self.max_new_tokens} tokens at most",
            )
            longest = max(longest, tokens)
        return list(answers), longest


@dataclass(frozen=True)
class Request:
    """One question with its passages and decoding options (serving defaults filled in), checked."""

    question: str
    passages: list[Passage]
    options: DecodingOptions
    query_embedding: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (self.options.max_new_tokens and self.options.score_temperature):
            raise ValueError("a Request's options carry the serving defaults (DecodingOptions.with_defaults)")
        require(
            self.options.n_docs <= len(self.passages),
            f"n_docs={self.options.n_docs} but only {len(self.passages)} passages were given",
        )
        require_finite(self.query_embedding, "query_embedding")
        if self.query_embedding:
            for i, p in enumerate(self.passages):
                require(
                    len(p.embedding) == len(self.query_embedding),
                    f"passage {i} has a {len(p.embedding)}-d embedding; query_embedding is "
                    f"{len(self.query_embedding)}-d",
                )

    @classmethod
    def from_pb(
        cls,
        pb: generator_pb2.GenerateRequest | generator_pb2.GenerateStreamRequest | generator_pb2.ScoreRequest,
        limits: Limits,
        default_max_new_tokens: int,
        default_temperature: float,
    ) -> Request:
        options = DecodingOptions.from_pb(pb.options).with_defaults(default_max_new_tokens, default_temperature)
        limits.check(options)
        return cls(parse_question(pb.question), limits.passages(pb.passages), options, tuple(pb.query_embedding))

    @property
    def n_docs(self) -> int:
        """How many of the passages (the first ones) the answer marginalises over."""
        return self.options.n_docs or len(self.passages)

    def doc_scores(self) -> torch.Tensor:
        """Retrieval scores [n_docs]: the passages' own, or q . d recomputed from embeddings when q is given, in
        float64 (finite float32 embeddings can have a dot product past float32's range, and a prior of NaN)."""
        passages = self.passages[: self.n_docs]
        if not self.query_embedding:
            return torch.tensor([p.score for p in passages], dtype=torch.float64)
        q = torch.tensor(self.query_embedding, dtype=torch.float64)
        return torch.tensor([p.embedding for p in passages], dtype=torch.float64) @ q


@dataclass(frozen=True)
class AnswerScore:
    answer: str
    log_prob: float
    num_tokens: int
    passage_posteriors: tuple[float, ...]

    def to_pb(self) -> generator_pb2.AnswerScore:
        return generator_pb2.AnswerScore(
            answer=self.answer,
            log_prob=self.log_prob,
            num_tokens=self.num_tokens,
            passage_posteriors=list(self.passage_posteriors),
        )


@dataclass(frozen=True)
class Scored:
    """What Score returns: each answer's marginal log-likelihood and posterior, and p(z|x) over the passages."""

    scores: tuple[AnswerScore, ...]
    passage_priors: tuple[float, ...]

    def to_pb(self) -> generator_pb2.ScoreResponse:
        return generator_pb2.ScoreResponse(
            scores=[s.to_pb() for s in self.scores], passage_priors=list(self.passage_priors)
        )
