"""Naming the instruction a guest stopped on, for error messages.

When KVM cannot emulate an instruction (KVM_EXIT_INTERNAL_ERROR, emulation
failure) the user should read *which* instruction, not a hex dump. This is a
lookup table of the instructions guests meet on hosts whose KVM emulates
kernel code (PVM), not a decoder: anything else is shown by objdump when
binutils is installed, else as bytes. The bytes come from KVM's exit data
or, for the kernel's virtual addresses, through KVM_TRANSLATE.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

from vmigrate.vmm import kvm


class Translation(kvm.Struct):
    """struct kvm_translation (KVM_TRANSLATE): a guest-virtual address's page walk."""

    _fields_ = [("linear_address", kvm.u64), ("physical_address", kvm.u64),
                ("valid", kvm.u8), ("writeable", kvm.u8), ("usermode", kvm.u8),
                ("pad", kvm.u8 * 5)]


KVM_TRANSLATE = kvm._iowr(0x85, Translation)


def translate(vcpu_fd: int, address: int) -> int | None:
    """Guest-physical address of guest-virtual `address` in the vCPU's current
    page tables, or None if it is not mapped."""
    t = Translation()
    t.linear_address = address
    try:
        kvm.ioctl_buf(vcpu_fd, KVM_TRANSLATE, t)
    except OSError:
        return None
    return t.physical_address if t.valid else None


_PREFIXES = {0xF0, 0xF2, 0xF3, 0x66, 0x67, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65}

# (opcode bytes after 0x0f or alone) -> name, or {modrm.reg: name} for group opcodes
_TWO_BYTE_GROUPS: dict[int, dict[int, str]] = {
    0xAE: {0: "fxsave", 1: "fxrstor", 2: "ldmxcsr", 3: "stmxcsr", 4: "xsave", 5: "xrstor",
           6: "xsaveopt", 7: "clflush"},
    0xC7: {1: "cmpxchg8b", 3: "xrstors", 4: "xsavec", 5: "xsaves", 6: "rdrand", 7: "rdseed"},
}
_TWO_BYTE_MOD3 = {0xAE: {5: "lfence", 6: "mfence", 7: "sfence"},
                  0xC7: {6: "rdrand", 7: "rdseed"}}
_0F01 = {0xCA: "clac", 0xCB: "stac", 0xD0: "xgetbv", 0xD1: "xsetbv", 0xF9: "rdtscp",
         0xC1: "vmcall", 0xD9: "vmmcall", 0xF8: "swapgs", 0xEE: "rdpkru", 0xEF: "wrpkru",
         0xC8: "monitor", 0xC9: "mwait"}
_TWO_BYTE = {0x05: "syscall", 0x07: "sysret", 0x0B: "ud2", 0x30: "wrmsr", 0x31: "rdtsc",
             0x32: "rdmsr", 0xA2: "cpuid", 0x6E: "movd/movq (SSE/MMX)",
             0x7E: "movd/movq (SSE/MMX)", 0x6F: "movq/movdqa/movdqu (SSE/MMX)",
             0x7F: "movq/movdqa/movdqu (SSE/MMX)", 0x10: "movups (SSE)", 0x11: "movups (SSE)",
             0x28: "movaps (SSE)", 0x29: "movaps (SSE)", 0xEF: "pxor (SSE/MMX)",
             0x57: "xorps (SSE)", 0xD6: "movq (SSE)", 0xE7: "movntdq (SSE)"}
_ONE_BYTE = {0x9B: "fwait", 0xCC: "int3", 0xCD: "int", 0xF4: "hlt", 0xCF: "iret",
             0xFA: "cli", 0xFB: "sti", 0x0F: "?"}


def name_instruction(code: bytes) -> str:
    """A name for the instruction at the start of `code` ("" if unknown)."""
    i, lock, rex_w = 0, False, False
    while i < len(code) and code[i] in _PREFIXES:
        lock |= code[i] == 0xF0
        i += 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex_w = bool(code[i] & 0x8)
        i += 1
    if i >= len(code):
        return ""
    op = code[i]
    prefix = "lock " if lock else ""
    if op in (0xC4, 0xC5):
        return "an AVX (VEX-encoded) instruction"
    if op == 0x62:
        return "an AVX-512 (EVEX-encoded) instruction"
    if 0xD8 <= op <= 0xDF:
        return "an x87 floating-point instruction"
    if op != 0x0F:
        return _ONE_BYTE.get(op, "")
    if i + 1 >= len(code):
        return ""
    op2 = code[i + 1]
    if op2 == 0x01 and i + 2 < len(code):
        return _0F01.get(code[i + 2], "")
    if op2 in _TWO_BYTE_GROUPS and i + 2 < len(code):
        modrm = code[i + 2]
        reg, mod = (modrm >> 3) & 7, modrm >> 6
        if mod == 3 and reg in _TWO_BYTE_MOD3.get(op2, {}):
            return _TWO_BYTE_MOD3[op2][reg]
        name = _TWO_BYTE_GROUPS[op2].get(reg, "")
        if name == "cmpxchg8b" and rex_w:
            name = "cmpxchg16b"
        if name in ("xsave", "xrstor", "fxsave", "fxrstor") and rex_w:
            name += "64"
        return prefix + name if name else ""
    return _TWO_BYTE.get(op2, "")


def disassemble(code: bytes) -> str:
    """objdump's reading of the first instruction of `code`, if binutils is here."""
    objdump = shutil.which("objdump")
    if not objdump or not code:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(code)
        f.flush()
        try:
            out = subprocess.run([objdump, "-D", "-b", "binary", "-m", "i386:x86-64", f.name],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
    for line in out.splitlines():
        m = re.match(r"\s*0:\s+(?:[0-9a-f]{2} )+\s*(.+)$", line)
        if m:
            return " ".join(m.group(1).split())
    return ""


def describe(code: bytes) -> str:
    """'lock cmpxchg16b', or objdump's text, or ''."""
    return name_instruction(code) or disassemble(code)


_BYTES_IN_DETAIL = re.compile(r"instruction bytes ((?:[0-9a-f]{2} ?)+)")
_DATA_IN_DETAIL = re.compile(r"\(emulation failure\) at rip 0x[0-9a-f]+: ((?:0x[0-9a-f]+ ?)+)")


def explain_emulation_failure(detail: str) -> str:
    """Add the instruction's name to a vCPU's emulation-failure message.

    The bytes come from the message's "instruction bytes" (read at rip) or
    from KVM's exit data (flags=1: insn_size, then up to 15 bytes).
    """
    code = b""
    m = _BYTES_IN_DETAIL.search(detail)
    if m:
        code = bytes.fromhex(m.group(1).replace(" ", ""))
    else:
        d = _DATA_IN_DETAIL.search(detail)
        words = [int(w, 16) for w in d.group(1).split()] if d else []
        if len(words) >= 2 and words[0] & 1:
            raw = b"".join(w.to_bytes(8, "little") for w in words[1:3])
            code = raw[1:1 + min(raw[0], 15)]
    what = describe(code)
    if not what:
        return detail
    return f"{detail}: `{what}`, an instruction KVM on this host could not emulate"
