"""Booting Linux: the x86 boot protocol's 64-bit entry, done by the VMM.

``linux_config()`` checks a kernel, initramfs and command line before any VMM
starts (one clear line per kind of bad input); ``linux_loader()`` returns
the function ``Machine.boot_with`` calls to lay the guest out:

- the kernel: a raw ``vmlinux`` ELF's PT_LOAD segments at their physical
  addresses, entered at the ELF entry (startup_64), or a bzImage's
  protected-mode part at its pref_address, entered at its 64-bit entry
  (+0x200), which first runs the kernel's own decompressor;
- the zero page (vmm/bootparams.py): the setup header (copied from a bzImage,
  synthesized for an ELF), the e820 map from the machine's RAM regions, the
  command line and initramfs pointers, type_of_loader 0xff;
- the initramfs as high as initrd_addr_max and RAM allow;
- an identity map of the first 4 GiB, a GDT with __BOOT_CS/__BOOT_DS, and
  vCPU 0 in long mode at the entry point with rsi = zero page.

Linux guests run with one vCPU: bringing up an AP means Linux's INIT/SIPI
real-mode trampoline and MP/ACPI tables this VMM does not write (see
docs/linux-guests.md).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm import bootparams as bp
from vmigrate.vmm import kvm

if TYPE_CHECKING:
    from vmigrate.vmm.image import GuestImage
    from vmigrate.vmm.machine import Machine

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
EM_X86_64 = 62
BZIMAGE_ENTRY_64 = 0x200          # 64-bit entry, from the protected-mode part's start
MAX_LINUX_VCPUS = 1

# The console, and what a VMM without firmware, PCI or ACPI means for the
# kernel: don't look for what is not there (each probe is slow, emulated code
# here), reboot through the i8042 reset line, power off on panic. See
# docs/linux-guests.md for what each word saved, measured.
BASE_CMDLINE = ("console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 "
                "pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd "
                "no_timer_check tsc=reliable cryptomgr.notests")


class BootError(ValueError):
    """A kernel, initramfs or command line cannot boot; one line for the user.

    A ValueError, so the VMM's Boot call reports it as a failed precondition.
    """


# ---------------------------------------------------------------- kernel files


@dataclass(frozen=True)
class Segment:
    """A piece of the kernel file that goes to a guest-physical address."""

    file_offset: int
    addr: int
    file_size: int
    mem_size: int


@dataclass(frozen=True)
class KernelImage:
    """What loading a kernel file needs, read from its headers only."""

    path: Path
    kind: str                       # "vmlinux" (ELF) or "bzImage"
    entry: int                      # guest-physical address of the 64-bit entry
    segments: tuple[Segment, ...]
    end: int                        # first byte above all the kernel may use while booting
    setup_header: bytes | None      # bzImage only: bytes 0x1f1..end of header
    initrd_addr_max: int
    cmdline_max: int                # longest command line, without its NUL
    version: str = ""


def _read_head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise BootError(f"kernel {path}: no such file") from None
    except IsADirectoryError:
        raise BootError(f"kernel {path}: is a directory, not a kernel") from None
    except PermissionError:
        raise BootError(f"kernel {path}: permission denied") from None
    except OSError as e:
        raise BootError(f"kernel {path}: cannot read it ({e.strerror})") from None


def read_kernel(path: str | Path) -> KernelImage:
    """Identify a kernel file (raw ELF vmlinux or bzImage) from its headers."""
    path = Path(path)
    head = _read_head(path, 64 * 1024)
    size = path.stat().st_size
    if head[:4] == ELF_MAGIC:
        return _read_elf(path, head, size)
    if len(head) >= 0x268 and head[bp.HDR_MAGIC:bp.HDR_MAGIC + 4] == bp.HDRS:
        return _read_bzimage(path, head, size)
    raise BootError(f"kernel {path}: not a Linux kernel (neither an ELF vmlinux nor a bzImage)")


def _read_elf(path: Path, head: bytes, size: int) -> KernelImage:
    if len(head) < 64 or head[4] != 2 or head[5] != 1:
        raise BootError(f"kernel {path}: not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    e_entry, e_phoff = struct.unpack_from("<QQ", head, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
    if e_machine != EM_X86_64 or e_type != 2:
        raise BootError(f"kernel {path}: an ELF file, but not an x86-64 executable")
    if e_phoff + e_phnum * e_phentsize > len(head):
        with open(path, "rb") as f:
            head = f.read(e_phoff + e_phnum * e_phentsize)
    segs = []
    for i in range(e_phnum):
        p_type, _flags, off, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", head, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if off + filesz > size:
            raise BootError(f"kernel {path}: truncated (a segment ends past the file)")
        segs.append(Segment(off, paddr, filesz, memsz))
    if not segs:
        raise BootError(f"kernel {path}: ELF file with nothing to load")
    if not any(s.addr <= e_entry < s.addr + s.mem_size for s in segs):
        raise BootError(f"kernel {path}: its entry point {e_entry:#x} is not in a loaded "
                        "segment (not a vmlinux with physical load addresses?)")
    end = max(s.addr + s.mem_size for s in segs)
    return KernelImage(path=path, kind="vmlinux", entry=e_entry, segments=tuple(segs),
                       end=_align_up(end, bp.PAGE), setup_header=None,
                       initrd_addr_max=bp.PROTOCOL_203_INITRD_ADDR_MAX,
                       cmdline_max=bp.X86_COMMAND_LINE_SIZE - 1)


def _read_bzimage(path: Path, head: bytes, size: int) -> KernelImage:
    version = struct.unpack_from("<H", head, bp.HDR_VERSION)[0]
    if struct.unpack_from("<H", head, bp.HDR_BOOT_FLAG)[0] != bp.BOOT_FLAG:
        raise BootError(f"kernel {path}: bzImage without its 0xAA55 boot flag")
    if version < 0x020C:
        raise BootError(f"kernel {path}: boot protocol {version >> 8}.{version & 0xFF} "
                        "is older than 2.12 (no 64-bit entry)")
    xloadflags = struct.unpack_from("<H", head, bp.HDR_XLOADFLAGS)[0]
    if not xloadflags & bp.XLF_KERNEL_64:
        raise BootError(f"kernel {path}: a 32-bit kernel (no 64-bit entry point)")
    setup_sects = head[bp.HDR_SETUP_SECTS] or 4
    pm_offset = (setup_sects + 1) * 512
    if pm_offset >= size:
        raise BootError(f"kernel {path}: truncated bzImage")
    relocatable = bool(head[bp.HDR_RELOCATABLE])
    pref = struct.unpack_from("<Q", head, bp.HDR_PREF_ADDRESS)[0]
    align = struct.unpack_from("<I", head, bp.HDR_KERNEL_ALIGNMENT)[0] or 2 * bp.MIB
    init_size = struct.unpack_from("<I", head, bp.HDR_INIT_SIZE)[0]
    load = _align_up(pref, align) if relocatable and pref >= bp.HIGH_MEMORY else bp.HIGH_MEMORY
    # The decompressor works in [max(load, pref), +init_size).
    end = max(load, pref) + max(init_size, size - pm_offset)
    kver = ""
    kver_ptr = struct.unpack_from("<H", head, 0x20E)[0]
    if kver_ptr and kver_ptr + 0x200 < len(head):
        raw = head[kver_ptr + 0x200:kver_ptr + 0x200 + 256]
        kver = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return KernelImage(
        path=path, kind="bzImage", entry=load + BZIMAGE_ENTRY_64,
        segments=(Segment(pm_offset, load, size - pm_offset, size - pm_offset),),
        end=_align_up(end, bp.PAGE),
        setup_header=bytes(head[bp.HDR_START:bp.setup_header_end(head)]),
        initrd_addr_max=struct.unpack_from("<I", head, bp.HDR_INITRD_ADDR_MAX)[0],
        cmdline_max=struct.unpack_from("<I", head, bp.HDR_CMDLINE_SIZE)[0], version=kver)


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


# ---------------------------------------------------------------- config


def default_cmdline(extra: str = "") -> str:
    """The command line for a Linux guest of this VMM (console, boot speed)."""
    return f"{BASE_CMDLINE} {extra}".strip()


def _check_initrd(initrd: str) -> int:
    try:
        st = os.stat(initrd)
        with open(initrd, "rb"):
            pass
    except FileNotFoundError:
        raise BootError(f"initramfs {initrd}: no such file") from None
    except PermissionError:
        raise BootError(f"initramfs {initrd}: permission denied") from None
    except OSError as e:
        raise BootError(f"initramfs {initrd}: cannot read it ({e.strerror})") from None
    if not os.path.isfile(initrd):
        raise BootError(f"initramfs {initrd}: not a regular file")
    if st.st_size == 0:
        raise BootError(f"initramfs {initrd}: empty file")
    return st.st_size


def plan_layout(kernel: KernelImage, initrd_size: int, cmdline: str,
                regions: list[tuple[int, int]]) -> bp.BootLayout:
    """Where the command line and initramfs go in RAM `regions`, checked.

    Raises BootError naming the limit that is exceeded.
    """
    encoded = cmdline.encode()
    if len(encoded) > kernel.cmdline_max:
        raise BootError(f"kernel command line is {len(encoded)} bytes; this kernel takes at "
                        f"most {kernel.cmdline_max}")
    if b"\0" in encoded:
        raise BootError("kernel command line contains a NUL byte")
    low = next(((a, s) for a, s in regions if a == 0), None)
    if low is None:
        raise BootError("guest memory does not start at address 0")
    ram_end = low[1]
    total = sum(s for _, s in regions)
    if kernel.end > ram_end:
        raise BootError(f"the kernel needs {-(-kernel.end >> 20)} MiB of low memory, the guest has "
                        f"{total >> 20} MiB")
    initrd_addr = 0
    if initrd_size:
        try:
            initrd_addr = bp.place_initrd(initrd_size, ram_end, kernel.initrd_addr_max,
                                          kernel.end)
        except ValueError:
            room = max(0, min(ram_end, kernel.initrd_addr_max + 1) - kernel.end)
            raise BootError(
                f"initramfs of {_mib(initrd_size)} does not fit in guest memory "
                f"({total >> 20} MiB): {_mib(room)} are free above the kernel") from None
    return bp.BootLayout(cmdline_addr=bp.CMDLINE_ADDR, cmdline_size=len(encoded),
                         initrd_addr=initrd_addr, initrd_size=initrd_size,
                         e820=tuple(bp.e820_map(regions)))


def _mib(n: int) -> str:
    return f"{n / bp.MIB:.1f} MiB"


def linux_config(kernel: str | None, initrd: str | None, cmdline: str | None,
                 default_image: bool = False, memory_bytes: int = 0) -> pb.LinuxGuestConfig:
    """Check a Linux guest's files and make its config.

    With `default_image` and no `kernel`, the default image ('vmigrate image
    build') is used: its raw vmlinux, its initramfs and a command line that
    starts its workload (a quarter of RAM at 4 MiB/s). A missing `cmdline`
    means the default one; a given one is used as it is. With `memory_bytes`
    (pass it: the CLI knows --memory), the layout is checked against that
    much RAM too, else only at boot.
    """
    if kernel is None:
        if not default_image:
            raise BootError("no kernel given")
        image = default_image_files()
        kernel, initrd = str(image.vmlinux), initrd or str(image.initramfs)
        if cmdline is None:
            from vmigrate.vmm.image import kernel_cmdline

            # The workload rewrites a quarter of RAM at 4 MiB/s (64 MiB if RAM is unknown).
            ws = max(4 * bp.MIB, memory_bytes // 4) if memory_bytes else 64 * bp.MIB
            # Boot messages stay on (no "quiet"): on a slow host they are the progress.
            base = BASE_CMDLINE.split()
            workload = [w for w in kernel_cmdline(ws, 4 * bp.MIB).split()
                        if w not in base and w != "quiet"]
            cmdline = default_cmdline(" ".join(workload))
    if cmdline is None:
        cmdline = default_cmdline()
    k = read_kernel(kernel)
    initrd_size = _check_initrd(initrd) if initrd else 0
    if memory_bytes:
        from vmigrate.vmm.memory import default_layout

        regions = [(r.guest_phys_addr, r.size) for r in default_layout(memory_bytes)]
        plan_layout(k, initrd_size, cmdline, regions)
    else:
        plan_layout(k, 0, cmdline, [(0, 4 * bp.GIB)])   # the command line, at least
    return pb.LinuxGuestConfig(kernel=str(Path(kernel).absolute()),
                               initrd=str(Path(initrd).absolute()) if initrd else "",
                               cmdline=" ".join(cmdline.split()))


def default_image_files() -> GuestImage:
    """The default guest image, or a BootError saying how to build it."""
    from vmigrate.vmm.image import ImageBuildError, default_image_dir
    from vmigrate.vmm.image.builder import GuestImage

    directory = default_image_dir()
    try:
        image = GuestImage.from_manifest(directory)
    except (OSError, ValueError, KeyError) as e:
        raise BootError(f"no default Linux image in {directory} ({type(e).__name__}): "
                        "build it with 'vmigrate image build'") from None
    except ImageBuildError as e:
        raise BootError(str(e)) from None
    for f in (image.vmlinux, image.initramfs):
        if not f.is_file():
            raise BootError(f"the default Linux image is incomplete ({f} is missing): "
                            "rebuild it with 'vmigrate image build'")
    return image


# ---------------------------------------------------------------- CPU


# CPUID bits whose instructions KVM cannot run for guest *kernel* code on a
# host that emulates it (PVM), so Linux must not see them: it would pick the
# instruction and stop the VM with an emulation failure.
#   CX16: `lock cmpxchg16b`, which SLUB uses for its lockless freelists.
EMULATED_KERNEL_CPUID_MASK: dict[tuple[int, str], int] = {
    (1, "ecx"): 1 << 13,
}
# Features such a host shows the guest kernel from the *host's* CPUID whatever
# KVM_SET_CPUID2 says (they are not in KVM_GET_SUPPORTED_CPUID), so only the
# kernel's own switches turn them off:
#   noxsave: XSAVE/XRSTOR (the FPU code uses FXSAVE/FXRSTOR instead);
#   nosmap:  SMAP, whose stac/clac guard every user-memory access.
EMULATED_KERNEL_CMDLINE = "noxsave nosmap"
PVM_MODULE = Path("/sys/module/kvm_pvm")


def host_emulates_guest_kernel() -> bool:
    """True on a PVM host: its KVM runs guest CPL0 code in an instruction emulator."""
    return PVM_MODULE.exists()


def linux_cpuid(entries: list[kvm.CpuidEntry2], emulated_kernel: bool) -> list[kvm.CpuidEntry2]:
    """The CPUID a Linux guest gets: the template's, less what the host cannot run."""
    out = []
    for e in entries:
        c = kvm.CpuidEntry2.from_buffer_copy(bytes(e))
        if emulated_kernel:
            for (leaf, reg), mask in EMULATED_KERNEL_CPUID_MASK.items():
                if c.function == leaf:
                    setattr(c, reg, getattr(c, reg) & ~mask)
        out.append(c)
    return out


# ---------------------------------------------------------------- loading


def linux_loader(cfg: pb.LinuxGuestConfig) -> Callable[[Machine], None]:
    """The boot function for `cfg`: checks, writes guest memory, sets vCPU 0."""

    def load(machine: Machine) -> None:
        if len(machine.vcpus) > MAX_LINUX_VCPUS:
            raise BootError(f"Linux guests run with {MAX_LINUX_VCPUS} vCPU here, not "
                            f"{len(machine.vcpus)} (the VMM starts no secondary CPUs)")
        kernel = read_kernel(cfg.kernel)
        initrd = Path(cfg.initrd).read_bytes() if cfg.initrd else b""
        emulated = host_emulates_guest_kernel()
        cmdline = host_cmdline(cfg.cmdline, emulated)
        regions = [(r.guest_phys_addr, r.size) for r in machine.memory.regions]
        layout = plan_layout(kernel, len(initrd), cmdline, regions)
        if bp.page_tables_end() > bp.CMDLINE_ADDR:
            raise AssertionError("boot page tables overlap the command line")
        write = machine.memory.write
        with open(kernel.path, "rb") as f:
            for s in kernel.segments:
                f.seek(s.file_offset)
                data = f.read(s.file_size)
                if len(data) != s.file_size:
                    raise BootError(f"kernel {kernel.path}: truncated while loading")
                write(s.addr, data)
                if s.mem_size > s.file_size:
                    write(s.addr + s.file_size, bytes(s.mem_size - s.file_size))
        if initrd:
            write(layout.initrd_addr, initrd)
        write(bp.CMDLINE_ADDR, cmdline.encode() + b"\0")
        write(bp.ZERO_PAGE_ADDR, bp.zero_page(kernel.setup_header, layout))
        write(bp.GDT_ADDR, bp.boot_gdt())
        for addr, table in bp.identity_page_tables():
            write(addr, table)
        vcpu = machine.vcpus[0]
        vcpu.set_cpuid(linux_cpuid(vcpu.cpuid, emulated))
        sregs = vcpu.get_sregs()
        regs = entry_registers(kernel.entry, sregs)
        vcpu.set_initial(regs, sregs)
        # What the guest really got; saved with the VM, shown by `inspect`.
        machine.config.linux.cmdline = cmdline

    return load


def host_cmdline(cmdline: str, emulated_kernel: bool) -> str:
    """`cmdline` plus the words this host needs (none on an ordinary KVM host)."""
    if not emulated_kernel:
        return cmdline
    words = cmdline.split()
    extra = [w for w in EMULATED_KERNEL_CMDLINE.split() if w not in words]
    return " ".join([*words, *extra])


def _flat(selector: int, code: bool) -> kvm.Segment:
    s = kvm.Segment()
    s.base, s.limit, s.selector = 0, 0xFFFFFFFF, selector
    s.type = 0xB if code else 0x3           # execute/read, accessed; read/write, accessed
    s.present, s.dpl, s.s, s.g = 1, 0, 1, 1
    s.l, s.db = (1, 0) if code else (0, 1)
    return s


def entry_registers(entry: int, sregs: kvm.Sregs) -> kvm.Regs:
    """vCPU state of the 64-bit boot protocol; `sregs` is updated in place."""
    sregs.cs = _flat(bp.BOOT_CS, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _flat(bp.BOOT_DS, code=False))
    sregs.gdt.base, sregs.gdt.limit = bp.GDT_ADDR, len(bp.boot_gdt()) - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = 0x80000033          # PG | NE | ET | MP | PE
    sregs.cr3 = bp.PML4_ADDR
    sregs.cr4 = 0x20                # PAE
    sregs.efer = 0x500              # LMA | LME
    regs = kvm.Regs()
    regs.rip = entry
    regs.rsi = bp.ZERO_PAGE_ADDR
    regs.rsp = bp.BOOT_STACK_TOP
    regs.rflags = 0x2
    return regs
