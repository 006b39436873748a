from rag.v1 import index_admin_pb2 as _index_admin_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SwapIndexRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SwapIndexResponse(_message.Message):
    __slots__ = ("index_version", "previous_version", "retrievers", "load_seconds", "activate_seconds")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    previous_version: str
    retrievers: int
    load_seconds: float
    activate_seconds: float
    def __init__(self, index_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., retrievers: _Optional[int] = ..., load_seconds: _Optional[float] = ..., activate_seconds: _Optional[float] = ...) -> None: ...

class ListIndexStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListIndexStatusResponse(_message.Message):
    __slots__ = ("retrievers",)
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    retrievers: _containers.RepeatedCompositeFieldContainer[_index_admin_pb2.IndexStatus]
    def __init__(self, retrievers: _Optional[_Iterable[_Union[_index_admin_pb2.IndexStatus, _Mapping]]] = ...) -> None: ...
