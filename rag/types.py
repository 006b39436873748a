"""Domain types shared by the services. Protobuf stays at the edges: each type owns its from_pb/to_pb."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from rag.errors import InvalidArgument, require
from rag.v1 import generator_pb2, passage_pb2


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float = 0.0
    embedding: tuple[float, ...] = ()

    @classmethod
    def from_pb(cls, pb: passage_pb2.Passage) -> Passage:
        return cls(id=pb.id, title=pb.title, text=pb.text, score=pb.score, embedding=tuple(pb.embedding))

    def to_pb(self) -> passage_pb2.Passage:
        return passage_pb2.Passage(
            id=self.id, title=self.title, text=self.text, score=self.score, embedding=list(self.embedding)
        )


class Mode(enum.Enum):
    TOKEN = "token"
    SEQUENCE = "sequence"
    CLOSED_BOOK = "closed-book"  # baseline: no passage
    CONCAT = "concat"  # baseline: all passages in one input

    @property
    def is_rag(self) -> bool:
        return self in (Mode.TOKEN, Mode.SEQUENCE)


_MODE_TO_PB = {
    Mode.TOKEN: generator_pb2.RAG_MODE_TOKEN,
    Mode.SEQUENCE: generator_pb2.RAG_MODE_SEQUENCE,
    Mode.CLOSED_BOOK: generator_pb2.RAG_MODE_CLOSED_BOOK,
    Mode.CONCAT: generator_pb2.RAG_MODE_CONCAT,
}
_MODE_FROM_PB = {generator_pb2.RAG_MODE_UNSPECIFIED: Mode.TOKEN, **{pb: mode for mode, pb in _MODE_TO_PB.items()}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; requests beyond these get INVALID_ARGUMENT."""

    max_question_chars: int = 2000
    max_passages: int = 50
    max_passage_chars: int = 20_000
    max_beams: int = 8
    max_new_tokens: int = 256
    max_answers: int = 32


@dataclass(frozen=True)
class DecodingOptions:
    mode: Mode = Mode.TOKEN
    # RAG-Sequence only: thorough re-scores every hypothesis under every passage; fast does not.
    thorough: bool = True
    num_beams: int = 1
    num_return_sequences: int = 1
    max_new_tokens: int = 32
    # 0 = every given passage.
    n_docs: int = 0
    # 0 = the default of the encoder that produced the scores.
    score_temperature: float = 0.0

    @classmethod
    def from_pb(cls, pb: generator_pb2.DecodingOptions, limits: Limits, default_max_new_tokens: int) -> DecodingOptions:
        """Parse and validate; unset fields take their defaults."""
        require(
            pb.mode in _MODE_FROM_PB,
            f"unknown mode {pb.mode}; use RAG_MODE_TOKEN, RAG_MODE_SEQUENCE, RAG_MODE_CLOSED_BOOK or RAG_MODE_CONCAT",
        )
        require(
            pb.sequence_decoding in (0, generator_pb2.SEQUENCE_DECODING_THOROUGH, generator_pb2.SEQUENCE_DECODING_FAST),
            f"unknown sequence_decoding {pb.sequence_decoding}; use SEQUENCE_DECODING_THOROUGH or SEQUENCE_DECODING_FAST",
        )
        options = cls(
            mode=_MODE_FROM_PB[pb.mode],
            thorough=pb.sequence_decoding != generator_pb2.SEQUENCE_DECODING_FAST,
            num_beams=pb.num_beams or 1,
            num_return_sequences=pb.num_return_sequences or 1,
            max_new_tokens=pb.max_new_tokens or default_max_new_tokens,
            n_docs=pb.n_docs,
            score_temperature=pb.score_temperature,
        )
        options.validate(limits)
        return options

    def validate(self, limits: Limits) -> None:
        require(
            1 <= self.num_beams <= limits.max_beams,
            f"num_beams must be in [1, {limits.max_beams}], got {self.num_beams}",
        )
        require(
            1 <= self.num_return_sequences <= self.num_beams,
            f"num_return_sequences must be in [1, num_beams={self.num_beams}], got {self.num_return_sequences}",
        )
        require(
            1 <= self.max_new_tokens <= limits.max_new_tokens,
            f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {self.max_new_tokens}",
        )
        require(
            0 <= self.n_docs <= limits.max_passages, f"n_docs must be in [0, {limits.max_passages}], got {self.n_docs}"
        )
        require(self.score_temperature >= 0, f"score_temperature must be >= 0, got {self.score_temperature}")

    def to_pb(self) -> generator_pb2.DecodingOptions:
        return generator_pb2.DecodingOptions(
            mode=_MODE_TO_PB[self.mode],
            sequence_decoding=(
                generator_pb2.SEQUENCE_DECODING_THOROUGH if self.thorough else generator_pb2.SEQUENCE_DECODING_FAST
            ),
            num_beams=self.num_beams,
            num_return_sequences=self.num_return_sequences,
            max_new_tokens=self.max_new_tokens,
            n_docs=self.n_docs,
            score_temperature=self.score_temperature,
        )


def validate_question(question: str, limits: Limits) -> str:
    question = question.strip()
    require(bool(question), "question is empty")
    require(
        len(question) <= limits.max_question_chars,
        f"question is {len(question)} characters; the limit is {limits.max_question_chars}",
    )
    return question


def parse_passages(pbs: Sequence[passage_pb2.Passage], limits: Limits) -> list[Passage]:
    require(len(pbs) > 0, "no passages given; the generator conditions on at least one")
    require(len(pbs) <= limits.max_passages, f"{len(pbs)} passages given; the limit is {limits.max_passages}")
    passages = [Passage.from_pb(pb) for pb in pbs]
    for i, p in enumerate(passages):
        require(bool(p.text.strip() or p.title.strip()), f"passage {i} has neither title nor text")
        if len(p.text) > limits.max_passage_chars:
            raise InvalidArgument(f"passage {i} is {len(p.text)} characters; the limit is {limits.max_passage_chars}")
    return passages


@dataclass(frozen=True)
class Hypothesis:
    text: str
    token_ids: tuple[int, ...]
    log_prob: float
    passage_posteriors: tuple[float, ...] = field(default=())

    def to_pb(self) -> generator_pb2.Hypothesis:
        return generator_pb2.Hypothesis(
            text=self.text,
            token_ids=list(self.token_ids),
            log_prob=self.log_prob,
            passage_posteriors=list(self.passage_posteriors),
        )
