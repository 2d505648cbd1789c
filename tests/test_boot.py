"""The x86 Linux boot protocol as vmm/boot.py and vmm/bootparams.py lay it out.

Checked against the kernel's documented format (Documentation/arch/x86/
boot.rst and zero-page.rst, arch/x86/include/uapi/asm/bootparam.h): offsets
are written here as the documents give them, not taken from the code under
test. The last tests boot tiny hand-made "kernels" on real KVM that read the
zero page back and print what they found on the serial port.
"""

from __future__ import annotations

import itertools
import struct
import time
from pathlib import Path

import pytest

from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm import boot, bootparams, insn, kvm
from vmigrate.vmm.boot import BootError
from vmigrate.vmm.bootparams import E820Entry
from vmigrate.vmm.memory import default_layout

MIB = 1 << 20
GIB = 1 << 30
IMAGE_DIRS = [Path("/tmp/img1")]


# ---------------------------------------------------------------- fake kernels

def make_elf(code: bytes, paddr: int = 0x1000000, entry: int | None = None,
             machine: int = 62, bss: int = 0) -> bytes:
    """A minimal ELF64 executable with one PT_LOAD of `code` at `paddr`."""
    phoff, code_off = 64, 0x1000
    hdr = bytearray(64)
    hdr[:16] = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", hdr, 16, 2, machine, 1,
                     paddr if entry is None else entry, phoff, 0, 0, 64, 56, 1, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0xFFFFFFFF80000000 + paddr, paddr,
                     len(code), len(code) + bss, 0x1000)
    out = bytearray(code_off)
    out[:64] = hdr
    out[phoff:phoff + 56] = ph
    return bytes(out) + code


def make_bzimage(pm_code: bytes, version: int = 0x020F, xloadflags: int = 0x3,
                 setup_sects: int = 1, cmdline_size: int = 2047,
                 initrd_addr_max: int = 0x7FFFFFFF, pref: int = 0x1000000,
                 init_size: int = 4 * MIB) -> bytes:
    """A bzImage shell: setup sectors with a header, then the protected-mode part.

    The 64-bit entry is 0x200 into the protected-mode part, so `pm_code` is
    placed there.
    """
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x6A                                  # header ends at 0x26c
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x1EF] = 0xFF                                  # the sentinel, as header.S sets it
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, 2 * MIB)        # kernel_alignment
    setup[0x234] = 1                                     # relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref)
    struct.pack_into("<I", setup, 0x260, init_size)
    pm = bytearray(0x200) + pm_code
    return bytes(setup) + bytes(pm)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    elf = tmp_path / "vmlinux"
    elf.write_bytes(make_elf(b"\xf4" * 16))
    bz = tmp_path / "bzImage"
    bz.write_bytes(make_bzimage(b"\xf4" * 16))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"070701" + bytes(4090))
    return {"elf": elf, "bz": bz, "initrd": initrd, "dir": tmp_path}


# ---------------------------------------------------------------- zero page

def _layout(**kw: object) -> bootparams.BootLayout:
    args = {"cmdline_addr": 0x20000, "cmdline_size": 10, "initrd_addr": 0x7D55000,
            "initrd_size": 0x2AB000,
            "e820": tuple(bootparams.e820_map([(0, 128 * MIB)]))}
    args.update(kw)
    return bootparams.BootLayout(**args)  # type: ignore[arg-type]


def test_zero_page_fields_at_documented_offsets():
    zp = bootparams.zero_page(None, _layout())
    assert len(zp) == 4096
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55            # boot_flag
    assert zp[0x202:0x206] == b"HdrS"                                    # header
    assert zp[0x210] == 0xFF                                             # type_of_loader
    assert zp[0x211] & 0x01                                              # LOADED_HIGH
    assert zp[0x1EF] == 0                                                # sentinel
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000             # cmd_line_ptr
    assert struct.unpack_from("<I", zp, 0x0C8)[0] == 0                   # ext_cmd_line_ptr
    assert struct.unpack_from("<I", zp, 0x218)[0] == 0x7D55000           # ramdisk_image
    assert struct.unpack_from("<I", zp, 0x21C)[0] == 0x2AB000            # ramdisk_size
    assert struct.unpack_from("<I", zp, 0x0C0)[0] == 0                   # ext_ramdisk_image
    assert struct.unpack_from("<I", zp, 0x23C)[0] == 0                   # X86_SUBARCH_PC
    assert struct.unpack_from("<I", zp, 0x238)[0] == 2047                # cmdline_size


def test_zero_page_high_addresses_use_the_ext_fields():
    zp = bootparams.zero_page(None, _layout(cmdline_addr=0x1_2345_6000,
                                            initrd_addr=0x2_0000_1000,
                                            initrd_size=0x1_0000_0000 + 5))
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x2345_6000
    assert struct.unpack_from("<I", zp, 0x0C8)[0] == 1
    assert struct.unpack_from("<I", zp, 0x218)[0] == 0x0000_1000
    assert struct.unpack_from("<I", zp, 0x0C0)[0] == 2
    assert struct.unpack_from("<I", zp, 0x21C)[0] == 5
    assert struct.unpack_from("<I", zp, 0x0C4)[0] == 1


def test_zero_page_copies_the_bzimage_setup_header(files):
    image = files["bz"].read_bytes()
    k = boot.read_kernel(files["bz"])
    assert k.setup_header == image[0x1F1:0x202 + image[0x201]]
    zp = bootparams.zero_page(k.setup_header, _layout())
    # Everything the loader does not own is the kernel's header, byte for byte.
    owned = {0x210, 0x211, *range(0x218, 0x220), *range(0x228, 0x22C), *range(0x23C, 0x240)}
    for off in range(0x1F1, 0x202 + image[0x201]):
        if off not in owned:
            assert zp[off] == image[off], hex(off)
    assert image[0x1EF] == 0xFF and zp[0x1EF] == 0       # the sentinel is not copied


def test_e820_table_format():
    e820 = bootparams.e820_map([(0, 128 * MIB)])
    zp = bootparams.zero_page(None, _layout(e820=tuple(e820)))
    assert zp[0x1E8] == len(e820)
    for i, e in enumerate(e820):
        addr, size, typ = struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i)
        assert (addr, size, typ) == (e.addr, e.size, e.type)
    assert bootparams.parse_e820(zp) == e820


def test_e820_small_guest():
    assert bootparams.e820_map([(0, 128 * MIB)]) == [
        E820Entry(0, 0x9FC00, 1),                     # conventional memory
        E820Entry(0x9FC00, 0x400, 2),                 # EBDA
        E820Entry(0xF0000, 0x10000, 2),               # BIOS area
        E820Entry(0x100000, 128 * MIB - 0x100000, 1),
    ]


def test_e820_large_guest_skips_the_mmio_hole():
    regions = [(r.guest_phys_addr, r.size) for r in default_layout(5 * GIB)]
    e820 = bootparams.e820_map(regions)
    ram = [e for e in e820 if e.type == 1]
    assert ram[-1] == E820Entry(4 * GIB, 2 * GIB, 1)
    assert ram[-2].end == 3 * GIB
    assert not any(e.addr < 4 * GIB < e.end or 3 * GIB <= e.addr < 4 * GIB for e in e820)
    assert sum(e.size for e in ram) == 5 * GIB - (0x100000 - 0x9FC00)
    assert all(a.end <= b.addr for a, b in itertools.pairwise(e820))


def test_initrd_goes_high_page_aligned_below_its_limits():
    addr = bootparams.place_initrd(0x2AB123, 128 * MIB, 0x7FFFFFFF, 64 * MIB)
    assert addr % 4096 == 0 and addr + 0x2AB123 <= 128 * MIB
    assert 128 * MIB - (addr + 0x2AB123) < 4096            # as high as it goes
    # initrd_addr_max is the last byte it may occupy
    addr = bootparams.place_initrd(MIB, 4 * GIB, 0x37FFFFFF, 64 * MIB)
    assert addr + MIB <= 0x38000000 and 0x38000000 - (addr + MIB) < 4096
    with pytest.raises(ValueError):
        bootparams.place_initrd(70 * MIB, 128 * MIB, 0x7FFFFFFF, 64 * MIB)


def test_identity_page_tables():
    tables = dict(bootparams.identity_page_tables())
    pml4 = tables[bootparams.PML4_ADDR]
    pdpt_addr = struct.unpack_from("<Q", pml4, 0)[0] & ~0xFFF
    pdpt = tables[pdpt_addr]
    for g in range(4):
        pd = tables[struct.unpack_from("<Q", pdpt, 8 * g)[0] & ~0xFFF]
        for i in (0, 1, 511):
            entry = struct.unpack_from("<Q", pd, 8 * i)[0]
            assert entry & 0x83 == 0x83                       # present, writable, 2 MiB page
            assert entry & ~0xFFF == g * GIB + i * 2 * MIB
    assert bootparams.page_tables_end() <= bootparams.CMDLINE_ADDR


def test_boot_gdt_has_flat_boot_cs_and_ds():
    gdt = bootparams.boot_gdt()
    cs = struct.unpack_from("<Q", gdt, 0x10)[0]
    ds = struct.unpack_from("<Q", gdt, 0x18)[0]
    assert (cs >> 53) & 1 == 1 and (cs >> 47) & 1 == 1       # L (64-bit), present
    assert (cs >> 40) & 0x8                                   # code
    assert (ds >> 40) & 0x2 and not (ds >> 40) & 0x8          # writable data
    sregs = kvm.Sregs()
    regs = boot.entry_registers(0x1000000, sregs)
    assert regs.rip == 0x1000000 and regs.rsi == bootparams.ZERO_PAGE_ADDR
    assert sregs.cs.selector == 0x10 and sregs.cs.l == 1
    assert all(getattr(sregs, s).selector == 0x18 for s in ("ds", "es", "ss"))
    assert sregs.cr0 & 0x80000001 == 0x80000001 and sregs.cr4 & 0x20
    assert sregs.efer & 0x500 == 0x500


# ---------------------------------------------------------------- kernels and limits

def test_read_elf_and_bzimage(files):
    elf = boot.read_kernel(files["elf"])
    assert (elf.kind, elf.entry, elf.setup_header) == ("vmlinux", 0x1000000, None)
    assert elf.cmdline_max == 2047
    bz = boot.read_kernel(files["bz"])
    assert bz.kind == "bzImage"
    assert bz.entry == 0x1000000 + 0x200                     # pref_address + 64-bit entry
    assert bz.segments[0].file_offset == 2 * 512             # (setup_sects + 1) sectors
    assert bz.end >= 0x1000000 + 4 * MIB                      # init_size is reserved
    assert bz.cmdline_max == 2047


@pytest.mark.parametrize("image_dir", IMAGE_DIRS)
def test_real_debian_kernel_headers(image_dir: Path):
    if not (image_dir / "bzImage").exists():
        pytest.skip(f"no built image in {image_dir}")
    bz = boot.read_kernel(image_dir / "bzImage")
    assert bz.version.startswith("6.") and bz.entry == 0x1000200
    elf = boot.read_kernel(image_dir / "vmlinux")
    assert elf.entry == 0x1000000 and elf.end > elf.entry


def test_bad_kernels_get_one_line(files, tmp_path: Path):
    cases = {
        tmp_path / "missing": "no such file",
        tmp_path: "is a directory",
    }
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 1000)
    cases[text] = "not a Linux kernel"
    arm = tmp_path / "arm.elf"
    arm.write_bytes(make_elf(b"\0" * 16, machine=183))
    cases[arm] = "not an x86-64 executable"
    bad_entry = tmp_path / "entry.elf"
    bad_entry.write_bytes(make_elf(b"\0" * 16, entry=0x5000))
    cases[bad_entry] = "entry point"
    k32 = tmp_path / "bz32"
    k32.write_bytes(make_bzimage(b"\0", xloadflags=0))
    cases[k32] = "32-bit kernel"
    old = tmp_path / "bzold"
    old.write_bytes(make_bzimage(b"\0", version=0x0206))
    cases[old] = "older than 2.12"
    truncated = tmp_path / "trunc.elf"
    truncated.write_bytes(make_elf(b"\xf4" * 4096)[:5000])
    cases[truncated] = "truncated"
    for path, words in cases.items():
        with pytest.raises(BootError) as e:
            boot.linux_config(str(path), None, "console=ttyS0")
        msg = str(e.value)
        assert words in msg and "\n" not in msg, (path, msg)


def test_bad_initrd_and_cmdline(files, tmp_path: Path):
    k = str(files["elf"])
    with pytest.raises(BootError, match=r"initramfs .*: no such file"):
        boot.linux_config(k, str(tmp_path / "nope"), None)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(BootError, match="empty file"):
        boot.linux_config(k, str(empty), None)
    with pytest.raises(BootError, match="command line is 2048 bytes; this kernel takes at most"):
        boot.linux_config(k, None, "x" * 2048)
    short = tmp_path / "short-cmdline"
    short.write_bytes(make_bzimage(b"\0", cmdline_size=255))
    with pytest.raises(BootError, match="at most 255"):
        boot.linux_config(str(short), None, "y" * 256)
    assert boot.linux_config(k, None, "x" * 2047).cmdline == "x" * 2047


def test_initrd_too_large_for_guest_memory(files, tmp_path: Path):
    big = tmp_path / "big.cpio"
    with open(big, "wb") as f:
        f.truncate(100 * MIB)
    k = str(files["elf"])
    # The kernel ends a little above 16 MiB: 100 MiB fits in 128 MiB, not in 64 MiB.
    assert boot.linux_config(k, str(big), None, memory_bytes=128 * MIB).initrd
    with pytest.raises(BootError) as e:
        boot.linux_config(k, str(big), None, memory_bytes=64 * MIB)
    assert "initramfs of 100.0 MiB does not fit in guest memory (64 MiB)" in str(e.value)


def test_kernel_too_large_for_guest_memory(files):
    with pytest.raises(BootError, match="the kernel needs 17 MiB of low memory, the guest has 16"):
        boot.linux_config(str(files["elf"]), None, None, memory_bytes=16 * MIB)


def test_config_defaults(files):
    cfg = boot.linux_config(str(files["elf"]), str(files["initrd"]), None)
    assert cfg.kernel == str(files["elf"]) and cfg.initrd == str(files["initrd"])
    assert cfg.cmdline.startswith("console=ttyS0 ")
    assert boot.linux_config(str(files["elf"]), None, " a  b ").cmdline == "a b"
    with pytest.raises(BootError, match="no kernel given"):
        boot.linux_config(None, None, None)


def test_default_image_missing_says_how_to_build(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VMIGRATE_IMAGE_DIR", str(tmp_path / "none"))
    with pytest.raises(BootError, match="vmigrate image build"):
        boot.linux_config(None, None, None, default_image=True)


def test_linux_cpuid_hides_what_an_emulating_host_cannot_run():
    e = kvm.CpuidEntry2()
    e.function, e.ecx = 1, 0xFFFFFFFF
    masked = boot.linux_cpuid([e], emulated_kernel=True)[0]
    assert not masked.ecx & (1 << 13)                           # CX16 (cmpxchg16b)
    assert boot.linux_cpuid([e], emulated_kernel=False)[0].ecx == 0xFFFFFFFF


# ---------------------------------------------------------------- naming instructions

@pytest.mark.parametrize(("code", "name"), [
    ("f0 48 0f c7 4d 20", "lock cmpxchg16b"),
    ("f0 0f c7 0e", "lock cmpxchg8b"),
    ("48 0f ae 2f", "xrstor64"),
    ("0f ae 17", "ldmxcsr"),
    ("0f 01 ca", "clac"),
    ("0f 01 cb", "stac"),
    ("9b", "fwait"),
    ("cc", "int3"),
    ("66 0f 6e c0", "movd/movq (SSE/MMX)"),
    ("0f ae e8", "lfence"),
    ("c5 f9 6f 06", "an AVX (VEX-encoded) instruction"),
])
def test_instruction_names(code: str, name: str):
    assert insn.name_instruction(bytes.fromhex(code)) == name


def test_emulation_failure_message_names_the_instruction():
    # As the VMM first reported it for the Debian kernel on a PVM host.
    detail = ("vCPU 0: KVM internal error (emulation failure) at rip 0xffffffff81317850: "
              "0x1 0x74204dc70f48f00f 0x894d0824448b4c66 0x1000 0x0")
    out = insn.explain_emulation_failure(detail)
    assert out.startswith(detail) and "`lock cmpxchg16b`" in out
    with_bytes = detail + " (instruction bytes 48 0f ae 2f 31 c0)"
    assert "`xrstor64`" in insn.explain_emulation_failure(with_bytes)
    assert insn.explain_emulation_failure("vCPU 0: triple fault") == "vCPU 0: triple fault"


# ---------------------------------------------------------------- on real KVM

# 64-bit code that reports what it was handed, one byte each on COM1, then halts:
#   cmdline[0], type_of_loader, initrd[0], e820_entries, and 'K' if rsi == 0x7000.
PROBE_KERNEL = bytes.fromhex(
    "baf8030000"          # mov edx, 0x3f8
    "8b8628020000"        # mov eax, [rsi+0x228]     cmd_line_ptr
    "8a00"                # mov al, [rax]
    "ee"                  # out dx, al
    "8a8610020000"        # mov al, [rsi+0x210]      type_of_loader
    "ee"                  # out dx, al
    "8b8618020000"        # mov eax, [rsi+0x218]     ramdisk_image
    "8a00"                # mov al, [rax]
    "ee"                  # out dx, al
    "8a86e8010000"        # mov al, [rsi+0x1e8]      e820_entries
    "ee"                  # out dx, al
    "b04b"                # mov al, 'K'
    "4881fe00700000"      # cmp rsi, 0x7000
    "7402"                # je +2
    "b04e"                # mov al, 'N'
    "ee"                  # out dx, al
    "f4"                  # hlt
    "ebfd"                # jmp hlt
)


def _boot_probe(kernel: Path, initrd: Path, cmdline: str, memory: int = 64 * MIB,
                vcpus: int = 1) -> tuple[bytes, object]:
    from vmigrate.vmm.console import Console
    from vmigrate.vmm.machine import Machine, install_kick_handler

    install_kick_handler()
    cfg = boot.linux_config(str(kernel), str(initrd), cmdline)
    console = Console()
    m = Machine(pb.VmConfig(name="probe-kernel", memory_bytes=memory, vcpu_count=vcpus,
                            linux=cfg), console=console)
    try:
        m.boot_with(boot.linux_loader(cfg))
        deadline = time.monotonic() + 20
        while console.end < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        return console.read(0)[0], m.state
    finally:
        m.close()


@pytest.mark.parametrize("kind", ["elf", "bz"])
def test_loader_hands_the_kernel_its_zero_page(files, kind: str):
    path = files["dir"] / f"probe-{kind}"
    path.write_bytes(make_elf(PROBE_KERNEL) if kind == "elf" else make_bzimage(PROBE_KERNEL))
    out, _state = _boot_probe(path, files["initrd"], "Zconsole=ttyS0")
    assert out == b"Z\xff0" + bytes([4]) + b"K"


def test_loader_refuses_smp_linux(files):
    path = files["dir"] / "probe-elf"
    path.write_bytes(make_elf(PROBE_KERNEL))
    with pytest.raises(BootError, match="1 vCPU"):
        _boot_probe(path, files["initrd"], "x", vcpus=2)


def test_loader_checks_memory_at_boot(files, tmp_path: Path):
    path = tmp_path / "probe-elf"
    path.write_bytes(make_elf(PROBE_KERNEL))
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(60 * MIB)
    with pytest.raises(BootError, match="does not fit in guest memory"):
        _boot_probe(path, big, "x", memory=64 * MIB)


@pytest.mark.skipif(not boot.host_emulates_guest_kernel(),
                    reason="only a host that emulates guest kernel code (PVM) refuses clac")
def test_unrunnable_instruction_stops_with_its_name(files, tmp_path: Path):
    from vmigrate.vmm.console import Console
    from vmigrate.vmm.machine import Machine, MachineState, install_kick_handler

    install_kick_handler()
    path = tmp_path / "clac.elf"
    path.write_bytes(make_elf(bytes.fromhex("0f01ca f4 ebfd")))
    cfg = boot.linux_config(str(path), None, "x")
    m = Machine(pb.VmConfig(name="clac", memory_bytes=32 * MIB, vcpu_count=1, linux=cfg),
                console=Console())
    try:
        m.boot_with(boot.linux_loader(cfg))
        deadline = time.monotonic() + 10
        while m.state == MachineState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.state == MachineState.CRASHED
        assert "`clac`" in m.detail and "0x1000000" in m.detail
    finally:
        m.close()


def test_guest_reboot_through_the_i8042_stops_the_vm_cleanly(tmp_path: Path):
    """Linux's `reboot` (reboot=k) pulses the reset line with 0xfe on port 0x64."""
    from vmigrate.vmm.console import Console
    from vmigrate.vmm.machine import Machine, MachineState, install_kick_handler

    install_kick_handler()
    path = tmp_path / "reboot.elf"
    path.write_bytes(make_elf(bytes.fromhex("b0fe e664 f4 ebfd")))   # mov al,0xfe; out 0x64,al
    cfg = boot.linux_config(str(path), None, "reboot=k")
    m = Machine(pb.VmConfig(name="reboot", memory_bytes=32 * MIB, vcpu_count=1, linux=cfg),
                console=Console())
    try:
        m.boot_with(boot.linux_loader(cfg))
        deadline = time.monotonic() + 10
        while m.state == MachineState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.state == MachineState.STOPPED and "reset" in m.detail
    finally:
        m.close()


def test_default_image_config():
    from vmigrate.vmm.image import default_image_dir

    if not (default_image_dir() / "manifest.json").exists():
        pytest.skip("the default image is not built ('vmigrate image build')")
    cfg = boot.linux_config(None, None, None, default_image=True, memory_bytes=256 * MIB)
    assert cfg.kernel.endswith("/vmlinux") and cfg.initrd.endswith("initramfs.cpio")
    words = cfg.cmdline.split()
    assert "vmigrate.ws=64M" in words and "vmigrate.rate=4M" in words
    assert len(words) == len(set(words)) and "quiet" not in words
    with pytest.raises(BootError, match="does not fit in guest memory"):
        boot.linux_config(None, None, None, default_image=True, memory_bytes=64 * MIB)
