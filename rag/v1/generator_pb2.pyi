from rag.v1 import passage_pb2 as _passage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RagMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RAG_MODE_UNSPECIFIED: _ClassVar[RagMode]
    RAG_MODE_TOKEN: _ClassVar[RagMode]
    RAG_MODE_SEQUENCE: _ClassVar[RagMode]
    RAG_MODE_CLOSED_BOOK: _ClassVar[RagMode]
    RAG_MODE_CONCAT: _ClassVar[RagMode]

class SequenceDecoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEQUENCE_DECODING_UNSPECIFIED: _ClassVar[SequenceDecoding]
    SEQUENCE_DECODING_THOROUGH: _ClassVar[SequenceDecoding]
    SEQUENCE_DECODING_FAST: _ClassVar[SequenceDecoding]
RAG_MODE_UNSPECIFIED: RagMode
RAG_MODE_TOKEN: RagMode
RAG_MODE_SEQUENCE: RagMode
RAG_MODE_CLOSED_BOOK: RagMode
RAG_MODE_CONCAT: RagMode
SEQUENCE_DECODING_UNSPECIFIED: SequenceDecoding
SEQUENCE_DECODING_THOROUGH: SequenceDecoding
SEQUENCE_DECODING_FAST: SequenceDecoding

class DecodingOptions(_message.Message):
    __slots__ = ("mode", "sequence_decoding", "num_beams", "num_return_sequences", "max_new_tokens", "n_docs", "score_temperature")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_DECODING_FIELD_NUMBER: _ClassVar[int]
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_RETURN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_DOCS_FIELD_NUMBER: _ClassVar[int]
    SCORE_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    mode: RagMode
    sequence_decoding: SequenceDecoding
    num_beams: int
    num_return_sequences: int
    max_new_tokens: int
    n_docs: int
    score_temperature: float
    def __init__(self, mode: _Optional[_Union[RagMode, str]] = ..., sequence_decoding: _Optional[_Union[SequenceDecoding, str]] = ..., num_beams: _Optional[int] = ..., num_return_sequences: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., n_docs: _Optional[int] = ..., score_temperature: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("question", "passages", "options", "query_embedding")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    QUERY_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    question: str
    passages: _containers.RepeatedCompositeFieldContainer[_passage_pb2.Passage]
    options: DecodingOptions
    query_embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, question: _Optional[str] = ..., passages: _Optional[_Iterable[_Union[_passage_pb2.Passage, _Mapping]]] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., query_embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("hypotheses", "passage_priors")
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_PRIORS_FIELD_NUMBER: _ClassVar[int]
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    passage_priors: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., passage_priors: _Optional[_Iterable[float]] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("text", "token_ids", "log_prob", "passage_posteriors")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_POSTERIORS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    log_prob: float
    passage_posteriors: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., log_prob: _Optional[float] = ..., passage_posteriors: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("question", "passages", "answers", "options", "query_embedding")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    QUERY_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    question: str
    passages: _containers.RepeatedCompositeFieldContainer[_passage_pb2.Passage]
    answers: _containers.RepeatedScalarFieldContainer[str]
    options: DecodingOptions
    query_embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, question: _Optional[str] = ..., passages: _Optional[_Iterable[_Union[_passage_pb2.Passage, _Mapping]]] = ..., answers: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., query_embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "passage_priors")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_PRIORS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[AnswerScore]
    passage_priors: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[_Union[AnswerScore, _Mapping]]] = ..., passage_priors: _Optional[_Iterable[float]] = ...) -> None: ...

class AnswerScore(_message.Message):
    __slots__ = ("answer", "log_prob", "num_tokens", "passage_posteriors")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_POSTERIORS_FIELD_NUMBER: _ClassVar[int]
    answer: str
    log_prob: float
    num_tokens: int
    passage_posteriors: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, answer: _Optional[str] = ..., log_prob: _Optional[float] = ..., num_tokens: _Optional[int] = ..., passage_posteriors: _Optional[_Iterable[float]] = ...) -> None: ...
