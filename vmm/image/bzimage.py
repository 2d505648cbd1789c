"""Reading an x86 bzImage: its setup header, and the raw ELF kernel inside it.

Facts from the kernel's Documentation/arch/x86/boot.rst and
arch/x86/boot/compressed/mkpiggy.c: the setup code fills ``setup_sects + 1``
512-byte sectors (0 means 4); the protected-mode part follows. From boot
protocol 2.08 on, ``payload_offset``/``payload_length`` locate the compressed
kernel inside the protected-mode part; its last 4 bytes are the uncompressed
length (little endian). The uncompressed data is the stripped ``vmlinux`` ELF,
followed on relocatable kernels by a relocation table, which we cut off.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from vmigrate.vmm.image.errors import ImageBuildError

HDRS_MAGIC = b"HdrS"
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
EM_X86_64 = 62

# Magic numbers of the compressors Linux can use for its payload (first match wins).
_MAGICS: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x89LZO", "lzo"),
    (struct.pack("<I", LZ4_LEGACY_MAGIC), "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
]


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the setup header that loading the kernel needs."""

    setup_sects: int
    protocol: tuple[int, int]
    kernel_version: str
    loadflags: int
    code32_start: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int

    @property
    def protected_mode_offset(self) -> int:
        """File offset of the protected-mode (compressed) part of the kernel."""
        return (self.setup_sects + 1) * 512

    @property
    def payload_file_offset(self) -> int:
        return self.protected_mode_offset + self.payload_offset


@dataclass(frozen=True)
class ElfInfo:
    entry: int
    size: int  # bytes the ELF file covers (headers, sections, segments)
    segments: list[tuple[int, int, int, int]]  # (file offset, phys addr, filesz, memsz)


def parse_setup_header(image: bytes) -> SetupHeader:
    """Parse and sanity-check a bzImage's setup header."""
    if len(image) < 0x268 or image[0x202:0x206] != HDRS_MAGIC:
        raise ImageBuildError("not a bzImage: no 'HdrS' setup header at offset 0x202")
    if image[0x1FE:0x200] != b"\x55\xaa":
        raise ImageBuildError("not a bzImage: boot flag 0xAA55 missing")
    version = struct.unpack_from("<H", image, 0x206)[0]
    protocol = (version >> 8, version & 0xFF)
    if protocol < (2, 8):
        raise ImageBuildError(f"boot protocol {protocol[0]}.{protocol[1]} has no payload fields")
    setup_sects = image[0x1F1] or 4
    kver_ptr = struct.unpack_from("<H", image, 0x20E)[0]
    kernel_version = ""
    if kver_ptr:
        start = kver_ptr + 0x200
        end = image.find(b"\0", start, start + 512)
        kernel_version = image[start:end].decode("ascii", "replace") if end > 0 else ""
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    header = SetupHeader(
        setup_sects=setup_sects,
        protocol=protocol,
        kernel_version=kernel_version,
        loadflags=image[0x211],
        code32_start=struct.unpack_from("<I", image, 0x214)[0],
        kernel_alignment=struct.unpack_from("<I", image, 0x230)[0],
        relocatable=bool(image[0x234]),
        xloadflags=struct.unpack_from("<H", image, 0x236)[0],
        payload_offset=payload_offset,
        payload_length=payload_length,
        pref_address=struct.unpack_from("<Q", image, 0x258)[0],
        init_size=struct.unpack_from("<I", image, 0x260)[0],
    )
    if payload_length < 8 or header.payload_file_offset + payload_length > len(image):
        raise ImageBuildError(
            f"bzImage payload (offset {header.payload_file_offset}, length {payload_length})"
            f" lies outside the {len(image)}-byte file"
        )
    return header


def payload(image: bytes, header: SetupHeader) -> bytes:
    """The compressed kernel, including its 4-byte uncompressed-length trailer."""
    start = header.payload_file_offset
    return image[start : start + header.payload_length]


def detect_compressor(data: bytes) -> str:
    for magic, name in _MAGICS:
        if data.startswith(magic):
            return name
    raise ImageBuildError(f"unknown kernel payload compression (magic {data[:6].hex()})")


def _lz4_legacy(data: bytes) -> bytes:
    """Decode the LZ4 "legacy" framing the kernel uses: magic, then (le32 size, block)*."""
    try:
        import lz4.block
    except ImportError:
        raise ImageBuildError("the kernel payload is LZ4: install the 'lz4' package (pip)")
    out: list[bytes] = []
    pos = 4
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if size == LZ4_LEGACY_MAGIC:  # concatenated streams repeat the magic
            continue
        if pos + size > len(data):
            raise ImageBuildError("truncated LZ4 block in the kernel payload")
        try:
            out.append(lz4.block.decompress(data[pos : pos + size], LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as exc:
            raise ImageBuildError(f"corrupt LZ4 block in the kernel payload: {exc}")
        pos += size
    return b"".join(out)


def decompress_payload(data: bytes) -> tuple[str, bytes]:
    """Decompress a kernel payload; returns (compressor name, uncompressed bytes)."""
    kind = detect_compressor(data)
    expected = struct.unpack_from("<I", data, len(data) - 4)[0]
    body = data[:-4]
    try:
        if kind == "lz4":
            raw = _lz4_legacy(body)
        elif kind == "xz":
            raw = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(body)
        elif kind == "lzma":
            raw = lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(body)
        elif kind == "gzip":
            raw = zlib.decompressobj(wbits=31).decompress(body)
        elif kind == "bzip2":
            raw = bz2.BZ2Decompressor().decompress(body)
        elif kind == "zstd":
            import zstandard

            raw = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        else:
            raise ImageBuildError(f"kernel payload compression {kind} is not supported")
    except (lzma.LZMAError, zlib.error, OSError, ValueError) as exc:
        raise ImageBuildError(f"cannot decompress the {kind} kernel payload: {exc}")
    if len(raw) != expected:
        raise ImageBuildError(
            f"{kind} kernel payload decompressed to {len(raw)} bytes, header says {expected}"
        )
    return kind, raw


def parse_elf64(data: bytes) -> ElfInfo:
    """Check that data starts with an ELF64 little-endian x86-64 executable; measure it."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ImageBuildError("decompressed kernel is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ImageBuildError("decompressed kernel is not a little-endian ELF64 file")
    (e_type, e_machine, _ver, e_entry, e_phoff, e_shoff, _flags, _ehsize,
     e_phentsize, e_phnum, e_shentsize, e_shnum, _shstrndx) = struct.unpack_from(
        "<HHIQQQIHHHHHH", data, 16
    )  # fmt: skip
    if e_machine != EM_X86_64:
        raise ImageBuildError(f"decompressed kernel is ELF for machine {e_machine}, not x86-64")
    if e_type != 2:
        raise ImageBuildError(f"decompressed kernel has ELF type {e_type}, not an executable")
    size = max(e_phoff + e_phnum * e_phentsize, e_shoff + e_shnum * e_shentsize)
    if size > len(data):
        raise ImageBuildError("decompressed kernel ELF headers point past its end")
    segments = []
    for i in range(e_phnum):
        p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == 1:  # PT_LOAD
            segments.append((p_offset, p_paddr, p_filesz, p_memsz))
        size = max(size, p_offset + p_filesz)
    for i in range(e_shnum):
        sh_type, _f, _a, sh_offset, sh_size = struct.unpack_from(
            "<IQQQQ", data, e_shoff + i * e_shentsize + 4
        )
        if sh_type != 8:  # SHT_NOBITS occupies no file space
            size = max(size, sh_offset + sh_size)
    if size > len(data) or not segments:
        raise ImageBuildError("decompressed kernel ELF is truncated or has no loadable segment")
    return ElfInfo(entry=e_entry, size=size, segments=segments)


@dataclass(frozen=True)
class ExtractedKernel:
    header: SetupHeader
    compressor: str
    elf: ElfInfo
    vmlinux: bytes  # the ELF alone
    trailing_bytes: int  # what followed the ELF (the relocation table), dropped


def extract_vmlinux(bzimage: Path | bytes) -> ExtractedKernel:
    """Pull the raw ELF kernel out of a bzImage."""
    image = bzimage.read_bytes() if isinstance(bzimage, Path) else bzimage
    header = parse_setup_header(image)
    kind, raw = decompress_payload(payload(image, header))
    elf = parse_elf64(raw)
    return ExtractedKernel(
        header=header,
        compressor=kind,
        elf=elf,
        vmlinux=raw[: elf.size],
        trailing_bytes=len(raw) - elf.size,
    )
