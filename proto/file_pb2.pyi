from vmigrate.proto import state_pb2 as _state_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileHeader(_message.Message):
    __slots__ = ("producer", "state_version", "vm", "created_at", "file_id", "parent_path", "parent_id", "memory_bytes", "required_features", "mapped_memory", "memory_offset")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_PATH_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    producer: str
    state_version: int
    vm: str
    created_at: float
    file_id: str
    parent_path: str
    parent_id: str
    memory_bytes: int
    required_features: _containers.RepeatedScalarFieldContainer[str]
    mapped_memory: bool
    memory_offset: int
    def __init__(self, producer: _Optional[str] = ..., state_version: _Optional[int] = ..., vm: _Optional[str] = ..., created_at: _Optional[float] = ..., file_id: _Optional[str] = ..., parent_path: _Optional[str] = ..., parent_id: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., required_features: _Optional[_Iterable[str]] = ..., mapped_memory: _Optional[bool] = ..., memory_offset: _Optional[int] = ...) -> None: ...

class MemoryImage(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class MemoryRecord(_message.Message):
    __slots__ = ("round", "chunks")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    round: int
    chunks: _containers.RepeatedCompositeFieldContainer[_state_pb2.MemoryChunk]
    def __init__(self, round: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[_state_pb2.MemoryChunk, _Mapping]]] = ...) -> None: ...

class PageIndex(_message.Message):
    __slots__ = ("hashes",)
    HASHES_FIELD_NUMBER: _ClassVar[int]
    hashes: bytes
    def __init__(self, hashes: _Optional[bytes] = ...) -> None: ...

class ConsoleRecord(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class FileTrailer(_message.Message):
    __slots__ = ("records", "chain_hash", "memory_pages", "pages_zero", "pages_raw", "pages_compressed", "rounds", "pause_ms", "total_ms")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZERO_FIELD_NUMBER: _ClassVar[int]
    PAGES_RAW_FIELD_NUMBER: _ClassVar[int]
    PAGES_COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    records: int
    chain_hash: int
    memory_pages: int
    pages_zero: int
    pages_raw: int
    pages_compressed: int
    rounds: int
    pause_ms: float
    total_ms: float
    def __init__(self, records: _Optional[int] = ..., chain_hash: _Optional[int] = ..., memory_pages: _Optional[int] = ..., pages_zero: _Optional[int] = ..., pages_raw: _Optional[int] = ..., pages_compressed: _Optional[int] = ..., rounds: _Optional[int] = ..., pause_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class FileSummary(_message.Message):
    __slots__ = ("header", "state", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: FileHeader
    state: _state_pb2.VmState
    trailer: FileTrailer
    def __init__(self, header: _Optional[_Union[FileHeader, _Mapping]] = ..., state: _Optional[_Union[_state_pb2.VmState, _Mapping]] = ..., trailer: _Optional[_Union[FileTrailer, _Mapping]] = ...) -> None: ...
