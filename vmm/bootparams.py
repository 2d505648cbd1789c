"""The x86 Linux boot protocol as data: the zero page, the e820 map and where
things go in guest memory. No KVM, no files: pure functions the tests can
check byte by byte against the kernel's documented format.

Facts from the kernel's Documentation/arch/x86/boot.rst and zero-page.rst and
arch/x86/include/uapi/asm/bootparam.h:

- struct boot_params (the "zero page") is one 4 KiB page. The setup header
  sits at 0x1f1 and ends at 0x202 + the byte at 0x201 (the jump's offset). A
  loader copies it from the bzImage into a *zeroed* page; the byte at 0x1ef
  (the sentinel, 0xff in the image) must stay 0 or the kernel discards
  fields it thinks a sloppy loader left.
- e820_entries at 0x1e8 (u8), e820_table at 0x2d0: up to 128 entries of
  {u64 addr, u64 size, u32 type} packed (20 bytes).
- cmd_line_ptr 0x228 (u32) + ext_cmd_line_ptr 0xc8 (high 32 bits);
  ramdisk_image 0x218 / ramdisk_size 0x21c (+ ext_ 0xc0 / 0xc4);
  type_of_loader 0x210 (0xff: a loader with no assigned ID).
- 64-bit entry: paging on, an identity map covering the kernel, the zero
  page and the command line; a GDT with flat __BOOT_CS (0x10, 64-bit code)
  and __BOOT_DS (0x18); rsi = the zero page's address.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30

# ---------------------------------------------------------------- zero page offsets
ZP_ACPI_RSDP_ADDR = 0x070
ZP_EXT_RAMDISK_IMAGE = 0x0C0
ZP_EXT_RAMDISK_SIZE = 0x0C4
ZP_EXT_CMD_LINE_PTR = 0x0C8
ZP_E820_ENTRIES = 0x1E8
ZP_SENTINEL = 0x1EF
ZP_E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20
E820_MAX_ENTRIES = 128

# setup header (offsets in the zero page, same as in the bzImage file)
HDR_START = 0x1F1
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE = 0x234
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_HARDWARE_SUBARCH = 0x23C
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260

BOOT_FLAG = 0xAA55
HDRS = b"HdrS"
LOADER_UNDEFINED = 0xFF          # type_of_loader: "no ID assigned"
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

E820_RAM = 1
E820_RESERVED = 2

# Defaults the boot protocol gives for kernels that do not say otherwise.
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF      # protocol < 2.03
PROTOCOL_203_INITRD_ADDR_MAX = 0x7FFFFFFF
DEFAULT_CMDLINE_SIZE = 255                # protocol < 2.06
X86_COMMAND_LINE_SIZE = 2048              # what a 64-bit kernel's buffer holds
PROTOCOL_WE_SPEAK = 0x020F                # written into headers we synthesize

# ---------------------------------------------------------------- guest layout
# Low memory as kvmtool and Firecracker lay it out: nothing here is used by
# the kernel once it runs (it reserves the first MiB itself).
GDT_ADDR = 0x1000
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000                         # PML4, PDPT, then 4 page directories
CMDLINE_ADDR = 0x20000
EBDA_START = 0x9FC00                       # top of conventional RAM on a PC
BIOS_ROM_START = 0xF0000                   # Linux scans here for MP/ACPI tables
HIGH_MEMORY = 0x100000                     # 1 MiB
IDENTITY_MAP_BYTES = 4 * GIB
BOOT_CS, BOOT_DS = 0x10, 0x18


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(regions: Iterable[tuple[int, int]]) -> list[E820Entry]:
    """The memory map for RAM `regions` ((guest-physical address, size) pairs).

    The PC's first MiB keeps its holes: RAM up to the EBDA, the EBDA and the
    BIOS area reserved (the kernel scans them for tables, which reads zeros
    here), the VGA hole absent.
    """
    out: list[E820Entry] = []
    for addr, size in sorted(regions):
        end = addr + size
        if addr < HIGH_MEMORY:
            if addr < EBDA_START:
                out.append(E820Entry(addr, min(end, EBDA_START) - addr, E820_RAM))
            if end > EBDA_START:
                out.append(E820Entry(EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED))
            if end > BIOS_ROM_START:
                out.append(E820Entry(BIOS_ROM_START, HIGH_MEMORY - BIOS_ROM_START,
                                     E820_RESERVED))
            addr = HIGH_MEMORY
        if end > addr:
            out.append(E820Entry(addr, end - addr, E820_RAM))
    if len(out) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(out)} memory map entries; the zero page holds "
                         f"{E820_MAX_ENTRIES}")
    return out


def setup_header_end(image: bytes) -> int:
    """Where the setup header of a bzImage ends (0x202 + the jump's offset byte)."""
    return 0x202 + image[0x201]


@dataclass(frozen=True)
class BootLayout:
    """Everything the zero page says, as plain values."""

    cmdline_addr: int
    cmdline_size: int              # bytes without the NUL
    initrd_addr: int = 0
    initrd_size: int = 0
    e820: tuple[E820Entry, ...] = ()


def zero_page(setup_header: bytes | None, layout: BootLayout) -> bytes:
    """struct boot_params for `layout`.

    `setup_header` is the bzImage's header (bytes 0x1f1 to its end), copied
    as the protocol asks; None synthesizes the minimal header a raw ELF
    kernel entered at startup_64 reads (as Firecracker does).
    """
    zp = bytearray(PAGE)
    if setup_header is not None:
        zp[HDR_START:HDR_START + len(setup_header)] = setup_header
    else:
        struct.pack_into("<H", zp, HDR_BOOT_FLAG, BOOT_FLAG)
        zp[HDR_MAGIC:HDR_MAGIC + 4] = HDRS
        struct.pack_into("<H", zp, HDR_VERSION, PROTOCOL_WE_SPEAK)
        struct.pack_into("<I", zp, HDR_KERNEL_ALIGNMENT, 2 * MIB)
        struct.pack_into("<I", zp, HDR_CMDLINE_SIZE, X86_COMMAND_LINE_SIZE - 1)
    zp[ZP_SENTINEL] = 0
    zp[HDR_TYPE_OF_LOADER] = LOADER_UNDEFINED
    zp[HDR_LOADFLAGS] |= LOADED_HIGH     # the protected-mode kernel sits at/above 1 MiB
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, layout.cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", zp, ZP_EXT_CMD_LINE_PTR, layout.cmdline_addr >> 32)
    struct.pack_into("<I", zp, HDR_RAMDISK_IMAGE, layout.initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", zp, ZP_EXT_RAMDISK_IMAGE, layout.initrd_addr >> 32)
    struct.pack_into("<I", zp, HDR_RAMDISK_SIZE, layout.initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", zp, ZP_EXT_RAMDISK_SIZE, layout.initrd_size >> 32)
    struct.pack_into("<I", zp, HDR_HARDWARE_SUBARCH, 0)    # X86_SUBARCH_PC
    if len(layout.e820) > E820_MAX_ENTRIES:
        raise ValueError("too many e820 entries for the zero page")
    zp[ZP_E820_ENTRIES] = len(layout.e820)
    for i, e in enumerate(layout.e820):
        struct.pack_into("<QQI", zp, ZP_E820_TABLE + i * E820_ENTRY_SIZE, e.addr, e.size, e.type)
    return bytes(zp)


def parse_e820(zp: bytes) -> list[E820Entry]:
    """The e820 table a zero page carries (for tests and `inspect`)."""
    n = zp[ZP_E820_ENTRIES]
    return [E820Entry(*struct.unpack_from("<QQI", zp, ZP_E820_TABLE + i * E820_ENTRY_SIZE))
            for i in range(n)]


def place_initrd(size: int, ram_end: int, addr_max: int, kernel_end: int) -> int:
    """The address for an initramfs of `size` bytes: as high as allowed.

    It must end at or below `addr_max` (the header's initrd_addr_max, the
    last byte it may use) and the end of RAM, start page-aligned, and not
    overlap the kernel (which ends at `kernel_end`, including its
    decompression/bss space). Raises ValueError when it does not fit.
    """
    top = min(ram_end, addr_max + 1)
    addr = (top - size) & ~(PAGE - 1)
    if size <= 0 or addr < kernel_end:
        raise ValueError(f"needs {size} bytes between {kernel_end:#x} and {top:#x}")
    return addr


# ---------------------------------------------------------------- page tables, GDT


def identity_page_tables(base: int = PML4_ADDR,
                         size: int = IDENTITY_MAP_BYTES) -> list[tuple[int, bytes]]:
    """Tables mapping virtual = physical for the first `size` bytes with 2 MiB pages.

    Laid out as PML4 at `base`, PDPT at base+4K, then one page directory per GiB.
    """
    gibs = (size + GIB - 1) // GIB
    if gibs > 512:
        raise ValueError("identity map larger than 512 GiB")
    pml4 = bytearray(PAGE)
    pdpt = bytearray(PAGE)
    pdpt_addr = base + PAGE
    struct.pack_into("<Q", pml4, 0, pdpt_addr | 0x3)            # present, writable
    out = [(base, bytes(pml4)), (pdpt_addr, b"")]
    for g in range(gibs):
        pd_addr = pdpt_addr + PAGE * (1 + g)
        struct.pack_into("<Q", pdpt, 8 * g, pd_addr | 0x3)
        pd = bytearray(PAGE)
        for i in range(512):
            struct.pack_into("<Q", pd, 8 * i, (g * GIB + i * 2 * MIB) | 0x83)  # P|RW|PS
        out.append((pd_addr, bytes(pd)))
    out[1] = (pdpt_addr, bytes(pdpt))
    return out


def page_tables_end(base: int = PML4_ADDR, size: int = IDENTITY_MAP_BYTES) -> int:
    return base + PAGE * (2 + (size + GIB - 1) // GIB)


def boot_gdt() -> bytes:
    """Null, null, __BOOT_CS (64-bit code), __BOOT_DS (flat data)."""
    gdt = bytearray(4 * 8)
    struct.pack_into("<Q", gdt, BOOT_CS, 0x00AF9B000000FFFF)
    struct.pack_into("<Q", gdt, BOOT_DS, 0x00CF93000000FFFF)
    return bytes(gdt)
