from rag.v1 import generator_pb2 as _generator_pb2
from rag.v1 import passage_pb2 as _passage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AskRequest(_message.Message):
    __slots__ = ("question", "k", "options", "retrieve_only")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    question: str
    k: int
    options: _generator_pb2.DecodingOptions
    retrieve_only: bool
    def __init__(self, question: _Optional[str] = ..., k: _Optional[int] = ..., options: _Optional[_Union[_generator_pb2.DecodingOptions, _Mapping]] = ..., retrieve_only: _Optional[bool] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("answers", "sources", "index_version", "timings")
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[Answer]
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    index_version: str
    timings: Timings
    def __init__(self, answers: _Optional[_Iterable[_Union[Answer, _Mapping]]] = ..., sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("text", "log_prob", "passage_posteriors")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_POSTERIORS_FIELD_NUMBER: _ClassVar[int]
    text: str
    log_prob: float
    passage_posteriors: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, text: _Optional[str] = ..., log_prob: _Optional[float] = ..., passage_posteriors: _Optional[_Iterable[float]] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("passage", "prior", "posterior")
    PASSAGE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    passage: _passage_pb2.Passage
    prior: float
    posterior: float
    def __init__(self, passage: _Optional[_Union[_passage_pb2.Passage, _Mapping]] = ..., prior: _Optional[float] = ..., posterior: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("retrieve_ms", "generate_ms", "total_ms")
    RETRIEVE_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    retrieve_ms: float
    generate_ms: float
    total_ms: float
    def __init__(self, retrieve_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...
