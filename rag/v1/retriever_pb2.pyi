from rag.v1 import passage_pb2 as _passage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("questions", "k", "include_embeddings", "include_query_embeddings", "index_version")
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_QUERY_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    questions: _containers.RepeatedScalarFieldContainer[str]
    k: int
    include_embeddings: bool
    include_query_embeddings: bool
    index_version: str
    def __init__(self, questions: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., include_embeddings: _Optional[bool] = ..., include_query_embeddings: _Optional[bool] = ..., index_version: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "index_version", "score_temperature", "shard", "num_shards")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    index_version: str
    score_temperature: float
    shard: int
    num_shards: int
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., index_version: _Optional[str] = ..., score_temperature: _Optional[float] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("passages", "query_embedding")
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    QUERY_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[_passage_pb2.Passage]
    query_embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, passages: _Optional[_Iterable[_Union[_passage_pb2.Passage, _Mapping]]] = ..., query_embedding: _Optional[_Iterable[float]] = ...) -> None: ...
