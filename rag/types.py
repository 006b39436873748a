"""Domain types shared by the services and their clients.

Protobuf stays at the edges: each type owns its `from_pb`/`to_pb`, and parsing checks only what holds for
every deployment (known enum values, non-negative counts). Limits that depend on the model (how many beams,
tokens or passages) belong to the generator, which checks them (generator_svc.requests).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from rag.errors import require
from rag.index_ref import IndexRef
from rag.v1 import gateway_pb2, generator_pb2, passage_pb2, retriever_pb2

MAX_QUESTION_CHARS = 2000
# What a passage may hold, for the generator that reads it and for `rag index build` that stores it (one rule).
MAX_TITLE_CHARS = 1_000
MAX_PASSAGE_CHARS = 20_000
# p(z|x) = softmax(score / temperature): below this, finite scores overflow to inf and the priors turn NaN.
MIN_SCORE_TEMPERATURE = 1e-3
E = TypeVar("E", bound=enum.Enum)
P = TypeVar("P", bound=int)


def parse_question(text: str, max_chars: int = MAX_QUESTION_CHARS) -> str:
    question = text.strip()
    require(bool(question), "question is empty")
    require(len(question) <= max_chars, f"question is {len(question)} characters; the limit is {max_chars}")
    return question


def passage_problem(title: str, text: str, max_text_chars: int = MAX_PASSAGE_CHARS) -> str | None:
    """Why a passage cannot be read by a generator (None when it can)."""
    if not (title.strip() or text.strip()):
        return "has neither title nor text"
    if len(title) > MAX_TITLE_CHARS:
        return f"has a {len(title)}-character title; the limit is {MAX_TITLE_CHARS}"
    if len(text) > max_text_chars:
        return f"is {len(text)} characters; the limit is {max_text_chars}"
    return None


def require_finite(values: tuple[float, ...], what: str) -> None:
    require(all(map(math.isfinite, values)), f"{what} holds NaN or infinity; send finite numbers")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float = 0.0  # what it was ranked by and the prior's logit (times its temperature)
    embedding: tuple[float, ...] = ()
    dense_score: float | None = None  # q . d, when the question was encoded
    lexical_score: float | None = None  # normalised BM25, when the lexical index was searched

    @classmethod
    def from_pb(cls, pb: passage_pb2.Passage) -> Passage:
        embedding = tuple(pb.embedding)
        dense = pb.dense_score if pb.HasField("dense_score") else None
        lexical = pb.lexical_score if pb.HasField("lexical_score") else None
        require_finite((pb.score, *(s for s in (dense, lexical) if s is not None)), f"passage {pb.id!r}'s score")
        require_finite(embedding, f"passage {pb.id!r}'s embedding")
        return cls(pb.id, pb.title, pb.text, pb.score, embedding, dense, lexical)

    def to_pb(self) -> passage_pb2.Passage:
        return passage_pb2.Passage(
            id=self.id,
            title=self.title,
            text=self.text,
            score=self.score,
            embedding=list(self.embedding),
            dense_score=self.dense_score,
            lexical_score=self.lexical_score,
        )


class Mode(enum.Enum):
    """How an answer is generated: the two RAG marginals, and two baselines. The one vocabulary of the API, the
    CLI, `rag eval` and the benchmarks."""

    TOKEN = "token"
    SEQUENCE = "sequence"
    CLOSED_BOOK = "closed-book"  # baseline: no passage
    CONCAT = "concat"  # baseline: all passages in one input

    @property
    def is_rag(self) -> bool:
        return self in (Mode.TOKEN, Mode.SEQUENCE)

    @property
    def label(self) -> str:
        return _MODE_LABELS[self]

    @classmethod
    def parse(cls, text: str) -> Mode:
        return from_word(cls, text, "mode")

    @classmethod
    def from_pb(cls, pb: generator_pb2.RagMode.ValueType) -> Mode:
        return _from_pb_value(_MODE_FROM_PB, pb, "mode", generator_pb2.RagMode.Name)

    def to_pb(self) -> generator_pb2.RagMode.ValueType:
        return _MODE_TO_PB[self]


class SequenceDecoding(enum.Enum):
    """RAG-Sequence only: thorough re-scores every hypothesis under every passage; fast does not."""

    THOROUGH = "thorough"
    FAST = "fast"

    @classmethod
    def parse(cls, text: str) -> SequenceDecoding:
        return from_word(cls, text, "sequence decoding")

    @classmethod
    def from_pb(cls, pb: generator_pb2.SequenceDecoding.ValueType) -> SequenceDecoding:
        return _from_pb_value(_DECODING_FROM_PB, pb, "sequence_decoding", generator_pb2.SequenceDecoding.Name)

    def to_pb(self) -> generator_pb2.SequenceDecoding.ValueType:
        return _DECODING_TO_PB[self]


class RetrievalMode(enum.Enum):
    """How passages are found: by embedding (dense), by BM25 over the words (lexical), or both fused (hybrid)."""

    DENSE = "dense"
    LEXICAL = "lexical"
    HYBRID = "hybrid"

    @property
    def uses_dense(self) -> bool:
        return self is not RetrievalMode.LEXICAL

    @property
    def uses_lexical(self) -> bool:
        return self is not RetrievalMode.DENSE

    @classmethod
    def parse(cls, text: str) -> RetrievalMode:
        return from_word(cls, text, "retrieval")

    @classmethod
    def from_pb(cls, pb: retriever_pb2.RetrievalMode.ValueType) -> RetrievalMode | None:
        """The mode a request names; None when it leaves the choice to the server."""
        if pb == retriever_pb2.RETRIEVAL_MODE_UNSPECIFIED:
            return None
        return _from_pb_value(_RETRIEVAL_FROM_PB, pb, "retrieval", retriever_pb2.RetrievalMode.Name)

    def to_pb(self) -> retriever_pb2.RetrievalMode.ValueType:
        return _RETRIEVAL_TO_PB[self]


def to_pb_or_unset(mode: RetrievalMode | None) -> retriever_pb2.RetrievalMode.ValueType:
    return mode.to_pb() if mode else retriever_pb2.RETRIEVAL_MODE_UNSPECIFIED


def from_word(enumeration: type[E], text: str, what: str) -> E:
    """The member named by a command-line word, or INVALID_ARGUMENT listing the words."""
    words = [member.value for member in enumeration]
    require(text in words, f"{what} must be one of {', '.join(words)}, got {text!r}")
    return enumeration(text)


def _from_pb_value(table: Mapping[P, E], pb: P, field: str, name: Callable[[P], str]) -> E:
    """The member a protobuf enum value stands for (unset: the default), or INVALID_ARGUMENT naming the values."""
    names = [name(value) for value in table if value]
    require(pb in table, f"unknown {field} {pb}; use {', '.join(names[:-1])} or {names[-1]}")
    return table[pb]


_MODE_LABELS = {
    Mode.TOKEN: "RAG-Token",
    Mode.SEQUENCE: "RAG-Sequence",
    Mode.CLOSED_BOOK: "closed book",
    Mode.CONCAT: "concatenated passages",
}
_MODE_TO_PB = {
    Mode.TOKEN: generator_pb2.RAG_MODE_TOKEN,
    Mode.SEQUENCE: generator_pb2.RAG_MODE_SEQUENCE,
    Mode.CLOSED_BOOK: generator_pb2.RAG_MODE_CLOSED_BOOK,
    Mode.CONCAT: generator_pb2.RAG_MODE_CONCAT,
}
_MODE_FROM_PB = {generator_pb2.RAG_MODE_UNSPECIFIED: Mode.TOKEN, **{pb: mode for mode, pb in _MODE_TO_PB.items()}}
_RETRIEVAL_TO_PB = {
    RetrievalMode.DENSE: retriever_pb2.RETRIEVAL_MODE_DENSE,
    RetrievalMode.LEXICAL: retriever_pb2.RETRIEVAL_MODE_LEXICAL,
    RetrievalMode.HYBRID: retriever_pb2.RETRIEVAL_MODE_HYBRID,
}
_RETRIEVAL_FROM_PB = {pb: mode for mode, pb in _RETRIEVAL_TO_PB.items()}
_DECODING_TO_PB = {
    SequenceDecoding.THOROUGH: generator_pb2.SEQUENCE_DECODING_THOROUGH,
    SequenceDecoding.FAST: generator_pb2.SEQUENCE_DECODING_FAST,
}
_DECODING_FROM_PB = {
    generator_pb2.SEQUENCE_DECODING_UNSPECIFIED: SequenceDecoding.THOROUGH,
    **{pb: decoding for decoding, pb in _DECODING_TO_PB.items()},
}


@dataclass(frozen=True)
class DecodingOptions:
    mode: Mode = Mode.TOKEN
    sequence_decoding: SequenceDecoding = SequenceDecoding.THOROUGH
    num_beams: int = 1
    num_return_sequences: int = 1
    # 0 = the generator's default (its --max-new-tokens).
    max_new_tokens: int = 0
    # 0 = every given passage.
    n_docs: int = 0
    # 0 = the default of the encoder that produced the scores.
    score_temperature: float = 0.0

    @property
    def thorough(self) -> bool:
        return self.sequence_decoding is SequenceDecoding.THOROUGH

    def __post_init__(self) -> None:
        require(self.num_beams >= 1, f"num_beams must be at least 1, got {self.num_beams}")
        require(
            1 <= self.num_return_sequences <= self.num_beams,
            f"num_return_sequences must be in [1, num_beams={self.num_beams}], got {self.num_return_sequences}",
        )
        require(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0 (0: the default), got {self.max_new_tokens}")
        require(self.n_docs >= 0, f"n_docs must be >= 0 (0: every passage), got {self.n_docs}")
        require(
            self.score_temperature == 0
            or (math.isfinite(self.score_temperature) and self.score_temperature >= MIN_SCORE_TEMPERATURE),
            f"score_temperature must be 0 (the encoder's default) or a finite number >= {MIN_SCORE_TEMPERATURE}, "
            f"got {self.score_temperature}",
        )

    @classmethod
    def from_pb(cls, pb: generator_pb2.DecodingOptions) -> DecodingOptions:
        """Parse and check; unset fields take their defaults, zeros stay "the serving default"."""
        return cls(
            mode=Mode.from_pb(pb.mode),
            sequence_decoding=SequenceDecoding.from_pb(pb.sequence_decoding),
            num_beams=pb.num_beams or 1,
            num_return_sequences=pb.num_return_sequences or 1,
            max_new_tokens=pb.max_new_tokens,
            n_docs=pb.n_docs,
            score_temperature=pb.score_temperature,
        )

    def to_pb(self) -> generator_pb2.DecodingOptions:
        return generator_pb2.DecodingOptions(
            mode=self.mode.to_pb(),
            sequence_decoding=self.sequence_decoding.to_pb(),
            num_beams=self.num_beams,
            num_return_sequences=self.num_return_sequences,
            max_new_tokens=self.max_new_tokens,
            n_docs=self.n_docs,
            score_temperature=self.score_temperature,
        )

    def with_defaults(self, max_new_tokens: int = 0, score_temperature: float = 0.0) -> DecodingOptions:
        """These options with the unset (zero) fields given."""
        return replace(
            self,
            max_new_tokens=self.max_new_tokens or max_new_tokens,
            score_temperature=self.score_temperature or score_temperature,
        )


@dataclass(frozen=True)
class Hypothesis:
    """One generated (or scored) answer: its text, marginal log-likelihood, and posterior over the passages."""

    text: str
    log_prob: float
    passage_posteriors: tuple[float, ...] = ()  # empty for the baselines
    token_ids: tuple[int, ...] = ()

    @classmethod
    def from_pb(cls, pb: generator_pb2.Hypothesis) -> Hypothesis:
        return cls(pb.text, pb.log_prob, tuple(pb.passage_posteriors), tuple(pb.token_ids))

    def to_pb(self) -> generator_pb2.Hypothesis:
        return generator_pb2.Hypothesis(
            text=self.text,
            token_ids=list(self.token_ids),
            log_prob=self.log_prob,
            passage_posteriors=list(self.passage_posteriors),
        )


@dataclass(frozen=True)
class Answered:
    """What the generator returns for one question: hypotheses best first, and p(z|x) over the passages it used."""

    hypotheses: tuple[Hypothesis, ...]
    passage_priors: tuple[float, ...]

    @classmethod
    def from_pb(cls, pb: generator_pb2.GenerateResponse) -> Answered:
        return cls(tuple(Hypothesis.from_pb(h) for h in pb.hypotheses), tuple(pb.passage_priors))

    def to_pb(self) -> generator_pb2.GenerateResponse:
        return generator_pb2.GenerateResponse(
            hypotheses=[h.to_pb() for h in self.hypotheses], passage_priors=list(self.passage_priors)
        )


@dataclass(frozen=True)
class Retrieved:
    """One question's top-k passages, best first, all from one index version."""

    passages: tuple[Passage, ...]
    index: IndexRef
    score_temperature: float  # the default temperature of p(z|x) for the scores (the encoder's, or the fusion's)
    retrieval: RetrievalMode = RetrievalMode.DENSE


AskMessage = TypeVar("AskMessage", gateway_pb2.AskRequest, gateway_pb2.AskStreamRequest)


@dataclass(frozen=True)
class AskRequest:
    """A question for the gateway. k = 0 means the gateway's default."""

    question: str
    k: int = 0
    options: DecodingOptions = field(default_factory=DecodingOptions)
    retrieve_only: bool = False
    retrieval: RetrievalMode | None = None  # None: the gateway's default

    @classmethod
    def from_pb(cls, pb: gateway_pb2.AskRequest | gateway_pb2.AskStreamRequest) -> AskRequest:
        """From Ask's request or AskStream's (the same fields)."""
        return cls(
            parse_question(pb.question),
            pb.k,
            DecodingOptions.from_pb(pb.options),
            pb.retrieve_only,
            RetrievalMode.from_pb(pb.retrieval),
        )

    def to_pb(self) -> gateway_pb2.AskRequest:
        return self.as_pb(gateway_pb2.AskRequest)

    def to_stream_pb(self) -> gateway_pb2.AskStreamRequest:
        return self.as_pb(gateway_pb2.AskStreamRequest)

    def as_pb(self, message: type[AskMessage]) -> AskMessage:
        return message(
            question=self.question,
            k=self.k,
            options=self.options.to_pb(),
            retrieve_only=self.retrieve_only,
            retrieval=to_pb_or_unset(self.retrieval),
        )


@dataclass(frozen=True)
class Source:
    """A passage an answer was conditioned on, with its prior p(z|x) and posterior p(z|x,y) (0 for baselines)."""

    passage: Passage
    prior: float = 0.0
    posterior: float = 0.0


@dataclass(frozen=True)
class Timings:
    retrieve_ms: float
    generate_ms: float
    total_ms: float


@dataclass(frozen=True)
class Answer:
    """What `Ask` returns: the answers best first (none when only retrieving), their sources and index version."""

    answers: tuple[Hypothesis, ...]
    sources: tuple[Source, ...]
    index: IndexRef
    timings: Timings
    retrieval: RetrievalMode = RetrievalMode.DENSE

    @classmethod
    def of(cls, retrieved: Retrieved, answered: Answered | None, timings: Timings) -> Answer:
        """The sources are the passages the generator used (the first n_docs), each with the best answer's
        posterior; a retrieval-only answer lists every passage retrieved."""
        if answered is None:
            return cls((), tuple(Source(p) for p in retrieved.passages), retrieved.index, timings, retrieved.retrieval)
        used = retrieved.passages[: len(answered.passage_priors)]
        best = answered.hypotheses[0].passage_posteriors if answered.hypotheses else ()
        posteriors = tuple(best) + (0.0,) * (len(used) - len(best))  # the baselines report no posterior
        sources = tuple(
            Source(p, prior, posterior)
            for p, prior, posterior in zip(used, answered.passage_priors, posteriors, strict=True)
        )
        return cls(answered.hypotheses, sources, retrieved.index, timings, retrieved.retrieval)

    @property
    def text(self) -> str:
        return self.answers[0].text if self.answers else ""

    @classmethod
    def from_pb(cls, pb: gateway_pb2.AskResponse) -> Answer:
        return cls(
            answers=tuple(Hypothesis(a.text, a.log_prob, tuple(a.passage_posteriors)) for a in pb.answers),
            sources=tuple(Source(Passage.from_pb(s.passage), s.prior, s.posterior) for s in pb.sources),
            index=IndexRef.parse(pb.index_version),
            timings=Timings(pb.timings.retrieve_ms, pb.timings.generate_ms, pb.timings.total_ms),
            retrieval=RetrievalMode.from_pb(pb.retrieval) or RetrievalMode.DENSE,
        )

    def to_pb(self) -> gateway_pb2.AskResponse:
        return gateway_pb2.AskResponse(
            answers=[
                gateway_pb2.Answer(text=a.text, log_prob=a.log_prob, passage_posteriors=list(a.passage_posteriors))
                for a in self.answers
            ],
            sources=[
                gateway_pb2.Source(passage=s.passage.to_pb(), prior=s.prior, posterior=s.posterior)
                for s in self.sources
            ],  # fmt: skip
            index_version=str(self.index),
            timings=gateway_pb2.Timings(
                retrieve_ms=self.timings.retrieve_ms,
                generate_ms=self.timings.generate_ms,
                total_ms=self.timings.total_ms,
            ),
            retrieval=self.retrieval.to_pb(),
        )
