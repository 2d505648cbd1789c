from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VmState(_message.Message):
    __slots__ = ("state_version", "required_features", "config", "memory", "vcpus", "irqchip", "pit", "clock", "devices")
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    IRQCHIP_FIELD_NUMBER: _ClassVar[int]
    PIT_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    state_version: int
    required_features: _containers.RepeatedScalarFieldContainer[str]
    config: VmConfig
    memory: MemoryLayout
    vcpus: _containers.RepeatedCompositeFieldContainer[VcpuState]
    irqchip: IrqchipState
    pit: PitState
    clock: ClockState
    devices: DeviceStates
    def __init__(self, state_version: _Optional[int] = ..., required_features: _Optional[_Iterable[str]] = ..., config: _Optional[_Union[VmConfig, _Mapping]] = ..., memory: _Optional[_Union[MemoryLayout, _Mapping]] = ..., vcpus: _Optional[_Iterable[_Union[VcpuState, _Mapping]]] = ..., irqchip: _Optional[_Union[IrqchipState, _Mapping]] = ..., pit: _Optional[_Union[PitState, _Mapping]] = ..., clock: _Optional[_Union[ClockState, _Mapping]] = ..., devices: _Optional[_Union[DeviceStates, _Mapping]] = ...) -> None: ...

class VmConfig(_message.Message):
    __slots__ = ("name", "memory_bytes", "vcpu_count", "test_guest", "linux", "cpu_template")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    TEST_GUEST_FIELD_NUMBER: _ClassVar[int]
    LINUX_FIELD_NUMBER: _ClassVar[int]
    CPU_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    memory_bytes: int
    vcpu_count: int
    test_guest: TestGuestConfig
    linux: LinuxGuestConfig
    cpu_template: str
    def __init__(self, name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., vcpu_count: _Optional[int] = ..., test_guest: _Optional[_Union[TestGuestConfig, _Mapping]] = ..., linux: _Optional[_Union[LinuxGuestConfig, _Mapping]] = ..., cpu_template: _Optional[str] = ...) -> None: ...

class TestGuestConfig(_message.Message):
    __slots__ = ("working_set_bytes", "dirty_rate_bytes_per_s", "timer_hz", "heartbeat_ms", "verify_bytes_per_s", "use_rtc", "fill_once")
    WORKING_SET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RATE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    TIMER_HZ_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    USE_RTC_FIELD_NUMBER: _ClassVar[int]
    FILL_ONCE_FIELD_NUMBER: _ClassVar[int]
    working_set_bytes: int
    dirty_rate_bytes_per_s: int
    timer_hz: int
    heartbeat_ms: int
    verify_bytes_per_s: int
    use_rtc: bool
    fill_once: bool
    def __init__(self, working_set_bytes: _Optional[int] = ..., dirty_rate_bytes_per_s: _Optional[int] = ..., timer_hz: _Optional[int] = ..., heartbeat_ms: _Optional[int] = ..., verify_bytes_per_s: _Optional[int] = ..., use_rtc: _Optional[bool] = ..., fill_once: _Optional[bool] = ...) -> None: ...

class LinuxGuestConfig(_message.Message):
    __slots__ = ("kernel", "initrd", "cmdline")
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    INITRD_FIELD_NUMBER: _ClassVar[int]
    CMDLINE_FIELD_NUMBER: _ClassVar[int]
    kernel: str
    initrd: str
    cmdline: str
    def __init__(self, kernel: _Optional[str] = ..., initrd: _Optional[str] = ..., cmdline: _Optional[str] = ...) -> None: ...

class MemoryLayout(_message.Message):
    __slots__ = ("page_size", "regions")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    regions: _containers.RepeatedCompositeFieldContainer[MemoryRegion]
    def __init__(self, page_size: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[MemoryRegion, _Mapping]]] = ...) -> None: ...

class MemoryRegion(_message.Message):
    __slots__ = ("guest_phys_addr", "size", "file_offset")
    GUEST_PHYS_ADDR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FILE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    guest_phys_addr: int
    size: int
    file_offset: int
    def __init__(self, guest_phys_addr: _Optional[int] = ..., size: _Optional[int] = ..., file_offset: _Optional[int] = ...) -> None: ...

class MemoryChunk(_message.Message):
    __slots__ = ("guest_phys_addr", "page_count", "encoding", "data", "checksum")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[MemoryChunk.Encoding]
        ZERO: _ClassVar[MemoryChunk.Encoding]
        RAW: _ClassVar[MemoryChunk.Encoding]
        ZSTD: _ClassVar[MemoryChunk.Encoding]
    ENCODING_UNSPECIFIED: MemoryChunk.Encoding
    ZERO: MemoryChunk.Encoding
    RAW: MemoryChunk.Encoding
    ZSTD: MemoryChunk.Encoding
    GUEST_PHYS_ADDR_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    guest_phys_addr: int
    page_count: int
    encoding: MemoryChunk.Encoding
    data: bytes
    checksum: int
    def __init__(self, guest_phys_addr: _Optional[int] = ..., page_count: _Optional[int] = ..., encoding: _Optional[_Union[MemoryChunk.Encoding, str]] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class VcpuState(_message.Message):
    __slots__ = ("id", "regs", "sregs", "fpu", "xsave", "xcrs", "msrs", "lapic", "events", "mp_state", "debugregs", "cpuid", "tsc_khz")
    ID_FIELD_NUMBER: _ClassVar[int]
    REGS_FIELD_NUMBER: _ClassVar[int]
    SREGS_FIELD_NUMBER: _ClassVar[int]
    FPU_FIELD_NUMBER: _ClassVar[int]
    XSAVE_FIELD_NUMBER: _ClassVar[int]
    XCRS_FIELD_NUMBER: _ClassVar[int]
    MSRS_FIELD_NUMBER: _ClassVar[int]
    LAPIC_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    MP_STATE_FIELD_NUMBER: _ClassVar[int]
    DEBUGREGS_FIELD_NUMBER: _ClassVar[int]
    CPUID_FIELD_NUMBER: _ClassVar[int]
    TSC_KHZ_FIELD_NUMBER: _ClassVar[int]
    id: int
    regs: Regs
    sregs: Sregs
    fpu: bytes
    xsave: bytes
    xcrs: _containers.RepeatedCompositeFieldContainer[Xcr]
    msrs: _containers.RepeatedCompositeFieldContainer[Msr]
    lapic: bytes
    events: VcpuEvents
    mp_state: int
    debugregs: DebugRegs
    cpuid: _containers.RepeatedCompositeFieldContainer[CpuidEntry]
    tsc_khz: int
    def __init__(self, id: _Optional[int] = ..., regs: _Optional[_Union[Regs, _Mapping]] = ..., sregs: _Optional[_Union[Sregs, _Mapping]] = ..., fpu: _Optional[bytes] = ..., xsave: _Optional[bytes] = ..., xcrs: _Optional[_Iterable[_Union[Xcr, _Mapping]]] = ..., msrs: _Optional[_Iterable[_Union[Msr, _Mapping]]] = ..., lapic: _Optional[bytes] = ..., events: _Optional[_Union[VcpuEvents, _Mapping]] = ..., mp_state: _Optional[int] = ..., debugregs: _Optional[_Union[DebugRegs, _Mapping]] = ..., cpuid: _Optional[_Iterable[_Union[CpuidEntry, _Mapping]]] = ..., tsc_khz: _Optional[int] = ...) -> None: ...

class Regs(_message.Message):
    __slots__ = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
    RAX_FIELD_NUMBER: _ClassVar[int]
    RBX_FIELD_NUMBER: _ClassVar[int]
    RCX_FIELD_NUMBER: _ClassVar[int]
    RDX_FIELD_NUMBER: _ClassVar[int]
    RSI_FIELD_NUMBER: _ClassVar[int]
    RDI_FIELD_NUMBER: _ClassVar[int]
    RSP_FIELD_NUMBER: _ClassVar[int]
    RBP_FIELD_NUMBER: _ClassVar[int]
    R8_FIELD_NUMBER: _ClassVar[int]
    R9_FIELD_NUMBER: _ClassVar[int]
    R10_FIELD_NUMBER: _ClassVar[int]
    R11_FIELD_NUMBER: _ClassVar[int]
    R12_FIELD_NUMBER: _ClassVar[int]
    R13_FIELD_NUMBER: _ClassVar[int]
    R14_FIELD_NUMBER: _ClassVar[int]
    R15_FIELD_NUMBER: _ClassVar[int]
    RIP_FIELD_NUMBER: _ClassVar[int]
    RFLAGS_FIELD_NUMBER: _ClassVar[int]
    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int
    def __init__(self, rax: _Optional[int] = ..., rbx: _Optional[int] = ..., rcx: _Optional[int] = ..., rdx: _Optional[int] = ..., rsi: _Optional[int] = ..., rdi: _Optional[int] = ..., rsp: _Optional[int] = ..., rbp: _Optional[int] = ..., r8: _Optional[int] = ..., r9: _Optional[int] = ..., r10: _Optional[int] = ..., r11: _Optional[int] = ..., r12: _Optional[int] = ..., r13: _Optional[int] = ..., r14: _Optional[int] = ..., r15: _Optional[int] = ..., rip: _Optional[int] = ..., rflags: _Optional[int] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
    BASE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    DPL_FIELD_NUMBER: _ClassVar[int]
    DB_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    L_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    AVL_FIELD_NUMBER: _ClassVar[int]
    UNUSABLE_FIELD_NUMBER: _ClassVar[int]
    base: int
    limit: int
    selector: int
    type: int
    present: bool
    dpl: int
    db: bool
    s: bool
    l: bool
    g: bool
    avl: bool
    unusable: bool
    def __init__(self, base: _Optional[int] = ..., limit: _Optional[int] = ..., selector: _Optional[int] = ..., type: _Optional[int] = ..., present: _Optional[bool] = ..., dpl: _Optional[int] = ..., db: _Optional[bool] = ..., s: _Optional[bool] = ..., l: _Optional[bool] = ..., g: _Optional[bool] = ..., avl: _Optional[bool] = ..., unusable: _Optional[bool] = ...) -> None: ...

class DescriptorTable(_message.Message):
    __slots__ = ("base", "limit")
    BASE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    base: int
    limit: int
    def __init__(self, base: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class Sregs(_message.Message):
    __slots__ = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base", "interrupt_bitmap")
    CS_FIELD_NUMBER: _ClassVar[int]
    DS_FIELD_NUMBER: _ClassVar[int]
    ES_FIELD_NUMBER: _ClassVar[int]
    FS_FIELD_NUMBER: _ClassVar[int]
    GS_FIELD_NUMBER: _ClassVar[int]
    SS_FIELD_NUMBER: _ClassVar[int]
    TR_FIELD_NUMBER: _ClassVar[int]
    LDT_FIELD_NUMBER: _ClassVar[int]
    GDT_FIELD_NUMBER: _ClassVar[int]
    IDT_FIELD_NUMBER: _ClassVar[int]
    CR0_FIELD_NUMBER: _ClassVar[int]
    CR2_FIELD_NUMBER: _ClassVar[int]
    CR3_FIELD_NUMBER: _ClassVar[int]
    CR4_FIELD_NUMBER: _ClassVar[int]
    CR8_FIELD_NUMBER: _ClassVar[int]
    EFER_FIELD_NUMBER: _ClassVar[int]
    APIC_BASE_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_BITMAP_FIELD_NUMBER: _ClassVar[int]
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cs: _Optional[_Union[Segment, _Mapping]] = ..., ds: _Optional[_Union[Segment, _Mapping]] = ..., es: _Optional[_Union[Segment, _Mapping]] = ..., fs: _Optional[_Union[Segment, _Mapping]] = ..., gs: _Optional[_Union[Segment, _Mapping]] = ..., ss: _Optional[_Union[Segment, _Mapping]] = ..., tr: _Optional[_Union[Segment, _Mapping]] = ..., ldt: _Optional[_Union[Segment, _Mapping]] = ..., gdt: _Optional[_Union[DescriptorTable, _Mapping]] = ..., idt: _Optional[_Union[DescriptorTable, _Mapping]] = ..., cr0: _Optional[int] = ..., cr2: _Optional[int] = ..., cr3: _Optional[int] = ..., cr4: _Optional[int] = ..., cr8: _Optional[int] = ..., efer: _Optional[int] = ..., apic_base: _Optional[int] = ..., interrupt_bitmap: _Optional[_Iterable[int]] = ...) -> None: ...

class Xcr(_message.Message):
    __slots__ = ("index", "value")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    index: int
    value: int
    def __init__(self, index: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...

class Msr(_message.Message):
    __slots__ = ("index", "value")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    index: int
    value: int
    def __init__(self, index: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...

class VcpuEvents(_message.Message):
    __slots__ = ("exception_injected", "exception_nr", "exception_has_error_code", "exception_pending", "exception_error_code", "interrupt_injected", "interrupt_nr", "interrupt_soft", "interrupt_shadow", "nmi_injected", "nmi_pending", "nmi_masked", "sipi_vector", "flags", "smi_smm", "smi_pending", "smi_inside_nmi", "smi_latched_init", "triple_fault_pending", "exception_has_payload", "exception_payload")
    EXCEPTION_INJECTED_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_NR_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_HAS_ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_PENDING_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_INJECTED_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_NR_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_SOFT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_SHADOW_FIELD_NUMBER: _ClassVar[int]
    NMI_INJECTED_FIELD_NUMBER: _ClassVar[int]
    NMI_PENDING_FIELD_NUMBER: _ClassVar[int]
    NMI_MASKED_FIELD_NUMBER: _ClassVar[int]
    SIPI_VECTOR_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    SMI_SMM_FIELD_NUMBER: _ClassVar[int]
    SMI_PENDING_FIELD_NUMBER: _ClassVar[int]
    SMI_INSIDE_NMI_FIELD_NUMBER: _ClassVar[int]
    SMI_LATCHED_INIT_FIELD_NUMBER: _ClassVar[int]
    TRIPLE_FAULT_PENDING_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_HAS_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    exception_injected: bool
    exception_nr: int
    exception_has_error_code: bool
    exception_pending: bool
    exception_error_code: int
    interrupt_injected: bool
    interrupt_nr: int
    interrupt_soft: bool
    interrupt_shadow: int
    nmi_injected: bool
    nmi_pending: bool
    nmi_masked: bool
    sipi_vector: int
    flags: int
    smi_smm: bool
    smi_pending: bool
    smi_inside_nmi: bool
    smi_latched_init: bool
    triple_fault_pending: bool
    exception_has_payload: bool
    exception_payload: int
    def __init__(self, exception_injected: _Optional[bool] = ..., exception_nr: _Optional[int] = ..., exception_has_error_code: _Optional[bool] = ..., exception_pending: _Optional[bool] = ..., exception_error_code: _Optional[int] = ..., interrupt_injected: _Optional[bool] = ..., interrupt_nr: _Optional[int] = ..., interrupt_soft: _Optional[bool] = ..., interrupt_shadow: _Optional[int] = ..., nmi_injected: _Optional[bool] = ..., nmi_pending: _Optional[bool] = ..., nmi_masked: _Optional[bool] = ..., sipi_vector: _Optional[int] = ..., flags: _Optional[int] = ..., smi_smm: _Optional[bool] = ..., smi_pending: _Optional[bool] = ..., smi_inside_nmi: _Optional[bool] = ..., smi_latched_init: _Optional[bool] = ..., triple_fault_pending: _Optional[bool] = ..., exception_has_payload: _Optional[bool] = ..., exception_payload: _Optional[int] = ...) -> None: ...

class DebugRegs(_message.Message):
    __slots__ = ("db", "dr6", "dr7", "flags")
    DB_FIELD_NUMBER: _ClassVar[int]
    DR6_FIELD_NUMBER: _ClassVar[int]
    DR7_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    db: _containers.RepeatedScalarFieldContainer[int]
    dr6: int
    dr7: int
    flags: int
    def __init__(self, db: _Optional[_Iterable[int]] = ..., dr6: _Optional[int] = ..., dr7: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class CpuidEntry(_message.Message):
    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    EAX_FIELD_NUMBER: _ClassVar[int]
    EBX_FIELD_NUMBER: _ClassVar[int]
    ECX_FIELD_NUMBER: _ClassVar[int]
    EDX_FIELD_NUMBER: _ClassVar[int]
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int
    def __init__(self, function: _Optional[int] = ..., index: _Optional[int] = ..., flags: _Optional[int] = ..., eax: _Optional[int] = ..., ebx: _Optional[int] = ..., ecx: _Optional[int] = ..., edx: _Optional[int] = ...) -> None: ...

class IrqchipState(_message.Message):
    __slots__ = ("pic_master", "pic_slave", "ioapic")
    PIC_MASTER_FIELD_NUMBER: _ClassVar[int]
    PIC_SLAVE_FIELD_NUMBER: _ClassVar[int]
    IOAPIC_FIELD_NUMBER: _ClassVar[int]
    pic_master: PicState
    pic_slave: PicState
    ioapic: IoapicState
    def __init__(self, pic_master: _Optional[_Union[PicState, _Mapping]] = ..., pic_slave: _Optional[_Union[PicState, _Mapping]] = ..., ioapic: _Optional[_Union[IoapicState, _Mapping]] = ...) -> None: ...

class PicState(_message.Message):
    __slots__ = ("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode", "init4", "elcr", "elcr_mask")
    LAST_IRR_FIELD_NUMBER: _ClassVar[int]
    IRR_FIELD_NUMBER: _ClassVar[int]
    IMR_FIELD_NUMBER: _ClassVar[int]
    ISR_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_ADD_FIELD_NUMBER: _ClassVar[int]
    IRQ_BASE_FIELD_NUMBER: _ClassVar[int]
    READ_REG_SELECT_FIELD_NUMBER: _ClassVar[int]
    POLL_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_MASK_FIELD_NUMBER: _ClassVar[int]
    INIT_STATE_FIELD_NUMBER: _ClassVar[int]
    AUTO_EOI_FIELD_NUMBER: _ClassVar[int]
    ROTATE_ON_AUTO_EOI_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FULLY_NESTED_MODE_FIELD_NUMBER: _ClassVar[int]
    INIT4_FIELD_NUMBER: _ClassVar[int]
    ELCR_FIELD_NUMBER: _ClassVar[int]
    ELCR_MASK_FIELD_NUMBER: _ClassVar[int]
    last_irr: int
    irr: int
    imr: int
    isr: int
    priority_add: int
    irq_base: int
    read_reg_select: int
    poll: int
    special_mask: int
    init_state: int
    auto_eoi: int
    rotate_on_auto_eoi: int
    special_fully_nested_mode: int
    init4: int
    elcr: int
    elcr_mask: int
    def __init__(self, last_irr: _Optional[int] = ..., irr: _Optional[int] = ..., imr: _Optional[int] = ..., isr: _Optional[int] = ..., priority_add: _Optional[int] = ..., irq_base: _Optional[int] = ..., read_reg_select: _Optional[int] = ..., poll: _Optional[int] = ..., special_mask: _Optional[int] = ..., init_state: _Optional[int] = ..., auto_eoi: _Optional[int] = ..., rotate_on_auto_eoi: _Optional[int] = ..., special_fully_nested_mode: _Optional[int] = ..., init4: _Optional[int] = ..., elcr: _Optional[int] = ..., elcr_mask: _Optional[int] = ...) -> None: ...

class IoapicState(_message.Message):
    __slots__ = ("base_address", "ioregsel", "id", "irr", "redirection")
    BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IOREGSEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    IRR_FIELD_NUMBER: _ClassVar[int]
    REDIRECTION_FIELD_NUMBER: _ClassVar[int]
    base_address: int
    ioregsel: int
    id: int
    irr: int
    redirection: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, base_address: _Optional[int] = ..., ioregsel: _Optional[int] = ..., id: _Optional[int] = ..., irr: _Optional[int] = ..., redirection: _Optional[_Iterable[int]] = ...) -> None: ...

class PitState(_message.Message):
    __slots__ = ("channels", "flags")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedCompositeFieldContainer[PitChannel]
    flags: int
    def __init__(self, channels: _Optional[_Iterable[_Union[PitChannel, _Mapping]]] = ..., flags: _Optional[int] = ...) -> None: ...

class PitChannel(_message.Message):
    __slots__ = ("count", "latched_count", "count_latched", "status_latched", "status", "read_state", "write_state", "write_latch", "rw_mode", "mode", "bcd", "gate", "count_load_time")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LATCHED_COUNT_FIELD_NUMBER: _ClassVar[int]
    COUNT_LATCHED_FIELD_NUMBER: _ClassVar[int]
    STATUS_LATCHED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    READ_STATE_FIELD_NUMBER: _ClassVar[int]
    WRITE_STATE_FIELD_NUMBER: _ClassVar[int]
    WRITE_LATCH_FIELD_NUMBER: _ClassVar[int]
    RW_MODE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BCD_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_LOAD_TIME_FIELD_NUMBER: _ClassVar[int]
    count: int
    latched_count: int
    count_latched: int
    status_latched: int
    status: int
    read_state: int
    write_state: int
    write_latch: int
    rw_mode: int
    mode: int
    bcd: int
    gate: int
    count_load_time: int
    def __init__(self, count: _Optional[int] = ..., latched_count: _Optional[int] = ..., count_latched: _Optional[int] = ..., status_latched: _Optional[int] = ..., status: _Optional[int] = ..., read_state: _Optional[int] = ..., write_state: _Optional[int] = ..., write_latch: _Optional[int] = ..., rw_mode: _Optional[int] = ..., mode: _Optional[int] = ..., bcd: _Optional[int] = ..., gate: _Optional[int] = ..., count_load_time: _Optional[int] = ...) -> None: ...

class ClockState(_message.Message):
    __slots__ = ("clock_ns", "flags", "realtime_ns", "host_tsc")
    CLOCK_NS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    REALTIME_NS_FIELD_NUMBER: _ClassVar[int]
    HOST_TSC_FIELD_NUMBER: _ClassVar[int]
    clock_ns: int
    flags: int
    realtime_ns: int
    host_tsc: int
    def __init__(self, clock_ns: _Optional[int] = ..., flags: _Optional[int] = ..., realtime_ns: _Optional[int] = ..., host_tsc: _Optional[int] = ...) -> None: ...

class DeviceStates(_message.Message):
    __slots__ = ("serial0", "i8042", "rtc")
    SERIAL0_FIELD_NUMBER: _ClassVar[int]
    I8042_FIELD_NUMBER: _ClassVar[int]
    RTC_FIELD_NUMBER: _ClassVar[int]
    serial0: UartState
    i8042: I8042State
    rtc: RtcState
    def __init__(self, serial0: _Optional[_Union[UartState, _Mapping]] = ..., i8042: _Optional[_Union[I8042State, _Mapping]] = ..., rtc: _Optional[_Union[RtcState, _Mapping]] = ...) -> None: ...

class UartState(_message.Message):
    __slots__ = ("ier", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr", "rx_fifo", "thr_interrupt_pending", "irq_level")
    IER_FIELD_NUMBER: _ClassVar[int]
    LCR_FIELD_NUMBER: _ClassVar[int]
    MCR_FIELD_NUMBER: _ClassVar[int]
    LSR_FIELD_NUMBER: _ClassVar[int]
    MSR_FIELD_NUMBER: _ClassVar[int]
    SCR_FIELD_NUMBER: _ClassVar[int]
    DLL_FIELD_NUMBER: _ClassVar[int]
    DLM_FIELD_NUMBER: _ClassVar[int]
    FCR_FIELD_NUMBER: _ClassVar[int]
    RX_FIFO_FIELD_NUMBER: _ClassVar[int]
    THR_INTERRUPT_PENDING_FIELD_NUMBER: _ClassVar[int]
    IRQ_LEVEL_FIELD_NUMBER: _ClassVar[int]
    ier: int
    lcr: int
    mcr: int
    lsr: int
    msr: int
    scr: int
    dll: int
    dlm: int
    fcr: int
    rx_fifo: bytes
    thr_interrupt_pending: bool
    irq_level: bool
    def __init__(self, ier: _Optional[int] = ..., lcr: _Optional[int] = ..., mcr: _Optional[int] = ..., lsr: _Optional[int] = ..., msr: _Optional[int] = ..., scr: _Optional[int] = ..., dll: _Optional[int] = ..., dlm: _Optional[int] = ..., fcr: _Optional[int] = ..., rx_fifo: _Optional[bytes] = ..., thr_interrupt_pending: _Optional[bool] = ..., irq_level: _Optional[bool] = ...) -> None: ...

class RtcState(_message.Message):
    __slots__ = ("cmos", "index", "nmi_disabled", "offset_ns", "used")
    CMOS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NMI_DISABLED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_NS_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    cmos: bytes
    index: int
    nmi_disabled: bool
    offset_ns: int
    used: bool
    def __init__(self, cmos: _Optional[bytes] = ..., index: _Optional[int] = ..., nmi_disabled: _Optional[bool] = ..., offset_ns: _Optional[int] = ..., used: _Optional[bool] = ...) -> None: ...

class I8042State(_message.Message):
    __slots__ = ("status", "command_byte", "output_byte", "output_full", "pending_command")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_BYTE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FULL_FIELD_NUMBER: _ClassVar[int]
    PENDING_COMMAND_FIELD_NUMBER: _ClassVar[int]
    status: int
    command_byte: int
    output_byte: int
    output_full: bool
    pending_command: int
    def __init__(self, status: _Optional[int] = ..., command_byte: _Optional[int] = ..., output_byte: _Optional[int] = ..., output_full: _Optional[bool] = ..., pending_command: _Optional[int] = ...) -> None: ...
