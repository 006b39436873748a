from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadIndexRequest(_message.Message):
    __slots__ = ("index_version",)
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    def __init__(self, index_version: _Optional[str] = ...) -> None: ...

class LoadIndexResponse(_message.Message):
    __slots__ = ("index_version", "passages", "load_seconds")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    passages: int
    load_seconds: float
    def __init__(self, index_version: _Optional[str] = ..., passages: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class ActivateIndexRequest(_message.Message):
    __slots__ = ("index_version",)
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    def __init__(self, index_version: _Optional[str] = ...) -> None: ...

class ActivateIndexResponse(_message.Message):
    __slots__ = ("index_version", "previous_version")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    previous_version: str
    def __init__(self, index_version: _Optional[str] = ..., previous_version: _Optional[str] = ...) -> None: ...

class UnloadIndexRequest(_message.Message):
    __slots__ = ("index_version",)
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    def __init__(self, index_version: _Optional[str] = ...) -> None: ...

class UnloadIndexResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetIndexStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetIndexStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: IndexStatus
    def __init__(self, status: _Optional[_Union[IndexStatus, _Mapping]] = ...) -> None: ...

class IndexStatus(_message.Message):
    __slots__ = ("endpoint", "shard", "num_shards", "active_version", "staged_version", "previous_version", "active_passages", "in_flight")
    class InFlightEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    shard: int
    num_shards: int
    active_version: str
    staged_version: str
    previous_version: str
    active_passages: int
    in_flight: _containers.ScalarMap[str, int]
    def __init__(self, endpoint: _Optional[str] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., active_version: _Optional[str] = ..., staged_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., active_passages: _Optional[int] = ..., in_flight: _Optional[_Mapping[str, int]] = ...) -> None: ...
