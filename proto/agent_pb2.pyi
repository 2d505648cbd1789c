from vmigrate.proto import state_pb2 as _state_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentEmpty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("software_version", "state_version_min", "state_version_max", "features")
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_MIN_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_MAX_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    software_version: str
    state_version_min: int
    state_version_max: int
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, software_version: _Optional[str] = ..., state_version_min: _Optional[int] = ..., state_version_max: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("name", "address", "version", "memory_total", "memory_available", "cpus", "cpu_model", "cpu_flags", "tsc_khz", "max_vcpus", "vm_count", "schedulable", "runs_guest_user_space", "user_space_probe_detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    CPU_FLAGS_FIELD_NUMBER: _ClassVar[int]
    TSC_KHZ_FIELD_NUMBER: _ClassVar[int]
    MAX_VCPUS_FIELD_NUMBER: _ClassVar[int]
    VM_COUNT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULABLE_FIELD_NUMBER: _ClassVar[int]
    RUNS_GUEST_USER_SPACE_FIELD_NUMBER: _ClassVar[int]
    USER_SPACE_PROBE_DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    version: VersionInfo
    memory_total: int
    memory_available: int
    cpus: int
    cpu_model: str
    cpu_flags: _containers.RepeatedScalarFieldContainer[str]
    tsc_khz: int
    max_vcpus: int
    vm_count: int
    schedulable: bool
    runs_guest_user_space: bool
    user_space_probe_detail: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., version: _Optional[_Union[VersionInfo, _Mapping]] = ..., memory_total: _Optional[int] = ..., memory_available: _Optional[int] = ..., cpus: _Optional[int] = ..., cpu_model: _Optional[str] = ..., cpu_flags: _Optional[_Iterable[str]] = ..., tsc_khz: _Optional[int] = ..., max_vcpus: _Optional[int] = ..., vm_count: _Optional[int] = ..., schedulable: _Optional[bool] = ..., runs_guest_user_space: _Optional[bool] = ..., user_space_probe_detail: _Optional[str] = ...) -> None: ...

class VmRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RunVmRequest(_message.Message):
    __slots__ = ("config", "paused")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    config: _state_pb2.VmConfig
    paused: bool
    def __init__(self, config: _Optional[_Union[_state_pb2.VmConfig, _Mapping]] = ..., paused: _Optional[bool] = ...) -> None: ...

class VmInfo(_message.Message):
    __slots__ = ("name", "host", "state", "config", "pid", "detail", "uptime_s", "exits", "operation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    EXITS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    state: str
    config: _state_pb2.VmConfig
    pid: int
    detail: str
    uptime_s: float
    exits: int
    operation: str
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., state: _Optional[str] = ..., config: _Optional[_Union[_state_pb2.VmConfig, _Mapping]] = ..., pid: _Optional[int] = ..., detail: _Optional[str] = ..., uptime_s: _Optional[float] = ..., exits: _Optional[int] = ..., operation: _Optional[str] = ...) -> None: ...

class VmList(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VmInfo]
    def __init__(self, vms: _Optional[_Iterable[_Union[VmInfo, _Mapping]]] = ...) -> None: ...

class ReadConsoleRequest(_message.Message):
    __slots__ = ("name", "follow", "tail_bytes", "only_new")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ONLY_NEW_FIELD_NUMBER: _ClassVar[int]
    name: str
    follow: bool
    tail_bytes: int
    only_new: bool
    def __init__(self, name: _Optional[str] = ..., follow: _Optional[bool] = ..., tail_bytes: _Optional[int] = ..., only_new: _Optional[bool] = ...) -> None: ...

class ConsoleChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class WriteConsoleRequest(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("name", "path", "stop", "incremental_from", "target_state_version", "lazy_layout", "compress")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FROM_FIELD_NUMBER: _ClassVar[int]
    TARGET_STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAZY_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    stop: bool
    incremental_from: str
    target_state_version: int
    lazy_layout: bool
    compress: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., stop: _Optional[bool] = ..., incremental_from: _Optional[str] = ..., target_state_version: _Optional[int] = ..., lazy_layout: _Optional[bool] = ..., compress: _Optional[str] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("path", "name", "lazy", "paused")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAZY_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    lazy: bool
    paused: bool
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ..., lazy: _Optional[bool] = ..., paused: _Optional[bool] = ...) -> None: ...

class SendRequest(_message.Message):
    __slots__ = ("name", "destination", "destination_address", "downtime_ms", "streams", "compress", "bandwidth_bytes_per_s", "timeout_s", "auto_converge")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    AUTO_CONVERGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    destination: str
    destination_address: str
    downtime_ms: int
    streams: int
    compress: str
    bandwidth_bytes_per_s: int
    timeout_s: float
    auto_converge: bool
    def __init__(self, name: _Optional[str] = ..., destination: _Optional[str] = ..., destination_address: _Optional[str] = ..., downtime_ms: _Optional[int] = ..., streams: _Optional[int] = ..., compress: _Optional[str] = ..., bandwidth_bytes_per_s: _Optional[int] = ..., timeout_s: _Optional[float] = ..., auto_converge: _Optional[bool] = ...) -> None: ...

class RoundStats(_message.Message):
    __slots__ = ("round", "pages", "bytes_on_wire", "duration_ms", "dirty_pages_per_s", "throttle_percent")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_ON_WIRE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_PER_S_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    round: int
    pages: int
    bytes_on_wire: int
    duration_ms: float
    dirty_pages_per_s: float
    throttle_percent: int
    def __init__(self, round: _Optional[int] = ..., pages: _Optional[int] = ..., bytes_on_wire: _Optional[int] = ..., duration_ms: _Optional[float] = ..., dirty_pages_per_s: _Optional[float] = ..., throttle_percent: _Optional[int] = ...) -> None: ...

class MigrationReport(_message.Message):
    __slots__ = ("migration_id", "vm", "source", "destination", "outcome", "total_ms", "downtime_ms", "bytes_on_wire", "guest_bytes", "pages_zero", "pages_raw", "pages_compressed", "rounds", "compression", "max_throttle_percent", "state_version", "detail", "setup_ms", "pause_ms", "switchover_ms", "streams", "downtime_steps")
    class DowntimeStepsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_ON_WIRE_FIELD_NUMBER: _ClassVar[int]
    GUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZERO_FIELD_NUMBER: _ClassVar[int]
    PAGES_RAW_FIELD_NUMBER: _ClassVar[int]
    PAGES_COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_THROTTLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SETUP_MS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    SWITCHOVER_MS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_STEPS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    vm: str
    source: str
    destination: str
    outcome: str
    total_ms: float
    downtime_ms: float
    bytes_on_wire: int
    guest_bytes: int
    pages_zero: int
    pages_raw: int
    pages_compressed: int
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStats]
    compression: str
    max_throttle_percent: int
    state_version: int
    detail: str
    setup_ms: float
    pause_ms: float
    switchover_ms: float
    streams: int
    downtime_steps: _containers.ScalarMap[str, float]
    def __init__(self, migration_id: _Optional[str] = ..., vm: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., outcome: _Optional[str] = ..., total_ms: _Optional[float] = ..., downtime_ms: _Optional[float] = ..., bytes_on_wire: _Optional[int] = ..., guest_bytes: _Optional[int] = ..., pages_zero: _Optional[int] = ..., pages_raw: _Optional[int] = ..., pages_compressed: _Optional[int] = ..., rounds: _Optional[_Iterable[_Union[RoundStats, _Mapping]]] = ..., compression: _Optional[str] = ..., max_throttle_percent: _Optional[int] = ..., state_version: _Optional[int] = ..., detail: _Optional[str] = ..., setup_ms: _Optional[float] = ..., pause_ms: _Optional[float] = ..., switchover_ms: _Optional[float] = ..., streams: _Optional[int] = ..., downtime_steps: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CheckpointReport(_message.Message):
    __slots__ = ("path", "file_bytes", "pages_zero", "pages_raw", "pages_compressed", "pages_unchanged", "pause_ms", "total_ms", "rounds", "state_version", "vm", "restore_ms", "first_instruction_ms")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZERO_FIELD_NUMBER: _ClassVar[int]
    PAGES_RAW_FIELD_NUMBER: _ClassVar[int]
    PAGES_COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    PAGES_UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_INSTRUCTION_MS_FIELD_NUMBER: _ClassVar[int]
    path: str
    file_bytes: int
    pages_zero: int
    pages_raw: int
    pages_compressed: int
    pages_unchanged: int
    pause_ms: float
    total_ms: float
    rounds: int
    state_version: int
    vm: str
    restore_ms: float
    first_instruction_ms: float
    def __init__(self, path: _Optional[str] = ..., file_bytes: _Optional[int] = ..., pages_zero: _Optional[int] = ..., pages_raw: _Optional[int] = ..., pages_compressed: _Optional[int] = ..., pages_unchanged: _Optional[int] = ..., pause_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., rounds: _Optional[int] = ..., state_version: _Optional[int] = ..., vm: _Optional[str] = ..., restore_ms: _Optional[float] = ..., first_instruction_ms: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "round", "bytes_done", "bytes_remaining", "dirty_bytes_per_s", "throughput_bytes_per_s", "expected_downtime_ms", "throttle_percent", "message", "migration", "checkpoint")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    DIRTY_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    phase: str
    round: int
    bytes_done: int
    bytes_remaining: int
    dirty_bytes_per_s: float
    throughput_bytes_per_s: float
    expected_downtime_ms: float
    throttle_percent: int
    message: str
    migration: MigrationReport
    checkpoint: CheckpointReport
    def __init__(self, phase: _Optional[str] = ..., round: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_remaining: _Optional[int] = ..., dirty_bytes_per_s: _Optional[float] = ..., throughput_bytes_per_s: _Optional[float] = ..., expected_downtime_ms: _Optional[float] = ..., throttle_percent: _Optional[int] = ..., message: _Optional[str] = ..., migration: _Optional[_Union[MigrationReport, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointReport, _Mapping]] = ...) -> None: ...

class ShutdownAgentRequest(_message.Message):
    __slots__ = ("stop_vms",)
    STOP_VMS_FIELD_NUMBER: _ClassVar[int]
    stop_vms: bool
    def __init__(self, stop_vms: _Optional[bool] = ...) -> None: ...

class CpuInfo(_message.Message):
    __slots__ = ("vendor", "flags", "tsc_khz", "tsc_scaling")
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    TSC_KHZ_FIELD_NUMBER: _ClassVar[int]
    TSC_SCALING_FIELD_NUMBER: _ClassVar[int]
    vendor: str
    flags: _containers.RepeatedScalarFieldContainer[str]
    tsc_khz: int
    tsc_scaling: bool
    def __init__(self, vendor: _Optional[str] = ..., flags: _Optional[_Iterable[str]] = ..., tsc_khz: _Optional[int] = ..., tsc_scaling: _Optional[bool] = ...) -> None: ...

class NegotiateRequest(_message.Message):
    __slots__ = ("migration_id", "vm", "source_host", "version", "needs", "guest_cpu", "config", "compressions")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HOST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FIELD_NUMBER: _ClassVar[int]
    GUEST_CPU_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    COMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    vm: str
    source_host: str
    version: VersionInfo
    needs: _containers.RepeatedCompositeFieldContainer[StateVersionFeatures]
    guest_cpu: CpuInfo
    config: _state_pb2.VmConfig
    compressions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, migration_id: _Optional[str] = ..., vm: _Optional[str] = ..., source_host: _Optional[str] = ..., version: _Optional[_Union[VersionInfo, _Mapping]] = ..., needs: _Optional[_Iterable[_Union[StateVersionFeatures, _Mapping]]] = ..., guest_cpu: _Optional[_Union[CpuInfo, _Mapping]] = ..., config: _Optional[_Union[_state_pb2.VmConfig, _Mapping]] = ..., compressions: _Optional[_Iterable[str]] = ...) -> None: ...

class StateVersionFeatures(_message.Message):
    __slots__ = ("state_version", "features")
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    state_version: int
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state_version: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class NegotiateReply(_message.Message):
    __slots__ = ("accepted", "reason", "state_version", "version", "compressions", "max_streams")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    state_version: int
    version: VersionInfo
    compressions: _containers.RepeatedScalarFieldContainer[str]
    max_streams: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., state_version: _Optional[int] = ..., version: _Optional[_Union[VersionInfo, _Mapping]] = ..., compressions: _Optional[_Iterable[str]] = ..., max_streams: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("migration_id", "config", "populate")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    POPULATE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    config: _state_pb2.VmConfig
    populate: _containers.RepeatedCompositeFieldContainer[FileRange]
    def __init__(self, migration_id: _Optional[str] = ..., config: _Optional[_Union[_state_pb2.VmConfig, _Mapping]] = ..., populate: _Optional[_Iterable[_Union[FileRange, _Mapping]]] = ...) -> None: ...

class FileRange(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("prepare_ms",)
    PREPARE_MS_FIELD_NUMBER: _ClassVar[int]
    prepare_ms: float
    def __init__(self, prepare_ms: _Optional[float] = ...) -> None: ...

class PageFrameHeader(_message.Message):
    __slots__ = ("migration_id", "round", "chunks")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    round: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkHeader]
    def __init__(self, migration_id: _Optional[str] = ..., round: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkHeader, _Mapping]]] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("guest_phys_addr", "page_count", "encoding", "checksum", "data_length")
    GUEST_PHYS_ADDR_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DATA_LENGTH_FIELD_NUMBER: _ClassVar[int]
    guest_phys_addr: int
    page_count: int
    encoding: _state_pb2.MemoryChunk.Encoding
    checksum: int
    data_length: int
    def __init__(self, guest_phys_addr: _Optional[int] = ..., page_count: _Optional[int] = ..., encoding: _Optional[_Union[_state_pb2.MemoryChunk.Encoding, str]] = ..., checksum: _Optional[int] = ..., data_length: _Optional[int] = ...) -> None: ...

class MemoryAck(_message.Message):
    __slots__ = ("pages", "bytes")
    PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    pages: int
    bytes: int
    def __init__(self, pages: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class SwitchoverRequest(_message.Message):
    __slots__ = ("migration_id", "state", "pages_sent", "chunks_sent", "console_tail", "last_pages", "stay_paused")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGES_SENT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_SENT_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_TAIL_FIELD_NUMBER: _ClassVar[int]
    LAST_PAGES_FIELD_NUMBER: _ClassVar[int]
    STAY_PAUSED_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    state: _state_pb2.VmState
    pages_sent: int
    chunks_sent: int
    console_tail: bytes
    last_pages: _containers.RepeatedCompositeFieldContainer[_state_pb2.MemoryChunk]
    stay_paused: bool
    def __init__(self, migration_id: _Optional[str] = ..., state: _Optional[_Union[_state_pb2.VmState, _Mapping]] = ..., pages_sent: _Optional[int] = ..., chunks_sent: _Optional[int] = ..., console_tail: _Optional[bytes] = ..., last_pages: _Optional[_Iterable[_Union[_state_pb2.MemoryChunk, _Mapping]]] = ..., stay_paused: _Optional[bool] = ...) -> None: ...

class SwitchoverReply(_message.Message):
    __slots__ = ("committed", "steps")
    class StepsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    steps: _containers.ScalarMap[str, float]
    def __init__(self, committed: _Optional[bool] = ..., steps: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("migration_id", "reason")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    reason: str
    def __init__(self, migration_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
