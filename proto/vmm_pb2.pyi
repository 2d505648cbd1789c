from vmigrate.proto import state_pb2 as _state_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VmmStatus(_message.Message):
    __slots__ = ("name", "state", "pid", "config", "detail", "exits", "uptime_s", "throttle_percent", "awaiting_commit", "migration_id", "pause_reason", "console_end", "features_in_use", "lazy_bytes_left")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[VmmStatus.State]
        CREATED: _ClassVar[VmmStatus.State]
        RUNNING: _ClassVar[VmmStatus.State]
        PAUSED: _ClassVar[VmmStatus.State]
        STOPPED: _ClassVar[VmmStatus.State]
        CRASHED: _ClassVar[VmmStatus.State]
        STANDBY: _ClassVar[VmmStatus.State]
    STATE_UNSPECIFIED: VmmStatus.State
    CREATED: VmmStatus.State
    RUNNING: VmmStatus.State
    PAUSED: VmmStatus.State
    STOPPED: VmmStatus.State
    CRASHED: VmmStatus.State
    STANDBY: VmmStatus.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    EXITS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    AWAITING_COMMIT_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PAUSE_REASON_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_END_FIELD_NUMBER: _ClassVar[int]
    FEATURES_IN_USE_FIELD_NUMBER: _ClassVar[int]
    LAZY_BYTES_LEFT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: VmmStatus.State
    pid: int
    config: _state_pb2.VmConfig
    detail: str
    exits: int
    uptime_s: float
    throttle_percent: int
    awaiting_commit: bool
    migration_id: str
    pause_reason: str
    console_end: int
    features_in_use: _containers.RepeatedScalarFieldContainer[str]
    lazy_bytes_left: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[VmmStatus.State, str]] = ..., pid: _Optional[int] = ..., config: _Optional[_Union[_state_pb2.VmConfig, _Mapping]] = ..., detail: _Optional[str] = ..., exits: _Optional[int] = ..., uptime_s: _Optional[float] = ..., throttle_percent: _Optional[int] = ..., awaiting_commit: _Optional[bool] = ..., migration_id: _Optional[str] = ..., pause_reason: _Optional[str] = ..., console_end: _Optional[int] = ..., features_in_use: _Optional[_Iterable[str]] = ..., lazy_bytes_left: _Optional[int] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("state", "migration_id", "console_history")
    STATE_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    state: _state_pb2.VmState
    migration_id: str
    console_history: bytes
    def __init__(self, state: _Optional[_Union[_state_pb2.VmState, _Mapping]] = ..., migration_id: _Optional[str] = ..., console_history: _Optional[bytes] = ...) -> None: ...

class LazyRequest(_message.Message):
    __slots__ = ("path", "image_offset", "page_index")
    PATH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    path: str
    image_offset: int
    page_index: bytes
    def __init__(self, path: _Optional[str] = ..., image_offset: _Optional[int] = ..., page_index: _Optional[bytes] = ...) -> None: ...

class CreateRequest(_message.Message):
    __slots__ = ("config", "dir", "memory_file")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DIR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FILE_FIELD_NUMBER: _ClassVar[int]
    config: _state_pb2.VmConfig
    dir: str
    memory_file: str
    def __init__(self, config: _Optional[_Union[_state_pb2.VmConfig, _Mapping]] = ..., dir: _Optional[str] = ..., memory_file: _Optional[str] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("keep_paused",)
    KEEP_PAUSED_FIELD_NUMBER: _ClassVar[int]
    keep_paused: bool
    def __init__(self, keep_paused: _Optional[bool] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("reason", "fetch_dirty_log", "save", "console", "console_from")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FETCH_DIRTY_LOG_FIELD_NUMBER: _ClassVar[int]
    SAVE_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_FROM_FIELD_NUMBER: _ClassVar[int]
    reason: str
    fetch_dirty_log: bool
    save: bool
    console: bool
    console_from: int
    def __init__(self, reason: _Optional[str] = ..., fetch_dirty_log: _Optional[bool] = ..., save: _Optional[bool] = ..., console: _Optional[bool] = ..., console_from: _Optional[int] = ...) -> None: ...

class PauseReply(_message.Message):
    __slots__ = ("pause_ms", "dirty_bitmap", "state", "console", "console_end", "save_ms")
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    DIRTY_BITMAP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_END_FIELD_NUMBER: _ClassVar[int]
    SAVE_MS_FIELD_NUMBER: _ClassVar[int]
    pause_ms: float
    dirty_bitmap: bytes
    state: _state_pb2.VmState
    console: bytes
    console_end: int
    save_ms: float
    def __init__(self, pause_ms: _Optional[float] = ..., dirty_bitmap: _Optional[bytes] = ..., state: _Optional[_Union[_state_pb2.VmState, _Mapping]] = ..., console: _Optional[bytes] = ..., console_end: _Optional[int] = ..., save_ms: _Optional[float] = ...) -> None: ...

class MemoryInfo(_message.Message):
    __slots__ = ("path", "size", "layout")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    layout: _state_pb2.MemoryLayout
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., layout: _Optional[_Union[_state_pb2.MemoryLayout, _Mapping]] = ...) -> None: ...

class DirtyLogRequest(_message.Message):
    __slots__ = ("op",)
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[DirtyLogRequest.Op]
        START: _ClassVar[DirtyLogRequest.Op]
        FETCH: _ClassVar[DirtyLogRequest.Op]
        STOP: _ClassVar[DirtyLogRequest.Op]
    OP_UNSPECIFIED: DirtyLogRequest.Op
    START: DirtyLogRequest.Op
    FETCH: DirtyLogRequest.Op
    STOP: DirtyLogRequest.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    op: DirtyLogRequest.Op
    def __init__(self, op: _Optional[_Union[DirtyLogRequest.Op, str]] = ...) -> None: ...

class DirtyLogReply(_message.Message):
    __slots__ = ("bitmap", "dirty_pages", "fetch_ms")
    BITMAP_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_FIELD_NUMBER: _ClassVar[int]
    FETCH_MS_FIELD_NUMBER: _ClassVar[int]
    bitmap: bytes
    dirty_pages: int
    fetch_ms: float
    def __init__(self, bitmap: _Optional[bytes] = ..., dirty_pages: _Optional[int] = ..., fetch_ms: _Optional[float] = ...) -> None: ...

class ThrottleRequest(_message.Message):
    __slots__ = ("percent",)
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    percent: int
    def __init__(self, percent: _Optional[int] = ...) -> None: ...

class ConsoleReadRequest(_message.Message):
    __slots__ = ("follow", "tail_bytes", "only_new")
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ONLY_NEW_FIELD_NUMBER: _ClassVar[int]
    follow: bool
    tail_bytes: int
    only_new: bool
    def __init__(self, follow: _Optional[bool] = ..., tail_bytes: _Optional[int] = ..., only_new: _Optional[bool] = ...) -> None: ...

class ConsoleData(_message.Message):
    __slots__ = ("data", "end_offset")
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    end_offset: int
    def __init__(self, data: _Optional[bytes] = ..., end_offset: _Optional[int] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
