"""`vmigrate inspect FILE`: print any checkpoint file, from any version.

The state is decoded with the schema stored in the file itself (its
DESCRIPTORS record), not with this build's, so a file written by a newer
vmigrate still prints in full; like CRIU's crit.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from vmigrate.migrate import snapfile
from vmigrate.proto import file_pb2

PAGE = 4096


class InspectError(Exception):
    pass


def _state_class(descriptors: bytes) -> type[Message]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptors)
    pool = descriptor_pool.DescriptorPool()
    for fdp in fds.file:
        pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("vmigrate.v1.VmState"))


def _image_pages(path: Path, image: tuple[int, int]) -> int:
    """Pages of a mapped image that hold data (the rest are holes: zero)."""
    import os

    from vmigrate.vmm.memory import data_ranges

    fd = os.open(path, os.O_RDONLY)
    try:
        off, length = image
        return sum(n for _, n in data_ranges(fd, off + length, start=off)) // PAGE
    finally:
        os.close(fd)


def summarize(path: Path, show_chunks: bool = False) -> dict:
    try:
        snap, memory = snapfile.load(path, with_memory=True)
        cls = _state_class(snap.descriptors)
        state = cls.FromString(snap.state_bytes)
    except snapfile.SnapshotError as e:
        raise InspectError(str(e)) from None
    except Exception as e:
        raise InspectError(f"{path}: cannot decode its schema or state: {e}") from None
    enc = Counter()
    rounds: Counter[int] = Counter()
    chunks = []
    encodings = file_pb2.MemoryRecord.DESCRIPTOR.fields_by_name["chunks"].message_type \
        .fields_by_name["encoding"].enum_type.values_by_number
    for rec in memory:
        for c in rec.chunks:
            known = encodings.get(c.encoding)
            name = known.name if known else f"UNKNOWN_ENCODING_{c.encoding}"
            enc[name] += c.page_count
            enc[name + "_bytes"] += len(c.data)
            rounds[rec.round] += c.page_count
            if show_chunks:
                chunks.append({"round": rec.round, "gpa": hex(c.guest_phys_addr),
                               "pages": c.page_count, "encoding": name, "bytes": len(c.data)})
    st = json_format.MessageToDict(state, preserving_proto_field_name=True)
    for v in st.get("vcpus", []):
        for key in ("xsave", "lapic", "fpu"):
            if key in v:
                v[key] = f"<{len(v[key]) * 3 // 4} bytes>"
    out = {
        "file": str(path),
        "size": snap.size,
        "header": json_format.MessageToDict(snap.header, preserving_proto_field_name=True),
        "records": snap.frame_counts,
        "memory": {"pages": sum(enc[k] for k in ("ZERO", "RAW", "ZSTD")),
                   "pages_zero": enc["ZERO"], "pages_raw": enc["RAW"],
                   "pages_zstd": enc["ZSTD"], "bytes_raw": enc["RAW_bytes"],
                   "bytes_zstd": enc["ZSTD_bytes"],
                   "pages_per_round": {str(k): v for k, v in sorted(rounds.items())},
                   "page_index": len(snap.page_index) // 8},
        "trailer": json_format.MessageToDict(snap.trailer, preserving_proto_field_name=True),
        "console_bytes": len(snap.console),
        "memory_image": None if snap.image is None else {
            "offset": snap.image[0], "length": snap.image[1],
            "pages_with_data": _image_pages(path, snap.image)},
        "state": st,
    }
    if show_chunks:
        out["chunks"] = chunks
    return out


def main(path: Path, as_json: bool = False, show_chunks: bool = False) -> None:
    s = summarize(path, show_chunks)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    h = s["header"]
    st = s["state"]
    cfg = st.get("config", {})
    print(f"{s['file']}: vmigrate checkpoint, {s['size']} bytes")
    print(f"  written by      {h.get('producer', '?')}, state version "
          f"{h.get('state_version', '?')}")
    print(f"  vm              {h.get('vm', '?')}: {int(cfg.get('memory_bytes', 0)) >> 20} MiB, "
          f"{cfg.get('vcpu_count', '?')} vCPU, guest "
          f"{next((k for k in ('test_guest', 'linux') if k in cfg), '?')}")
    if h.get("parent_path"):
        print(f"  incremental on  {h['parent_path']} (id {h.get('parent_id', '')[:12]})")
    print(f"  features        {', '.join(h.get('required_features', [])) or '-'}")
    m = s["memory"]
    if s["memory_image"]:
        img = s["memory_image"]
        print(f"  memory          mapped image of {img['length'] >> 20} MiB at byte "
              f"{img['offset']}: {img['pages_with_data']} pages hold data, the rest are holes")
    else:
        print(f"  memory          {m['pages']} pages: {m['pages_zstd']} zstd "
              f"({m['bytes_zstd']} bytes), {m['pages_raw']} raw, {m['pages_zero']} zero; "
              f"rounds {m['pages_per_round']}")
    t = s["trailer"]
    print(f"  checkpoint      {t.get('rounds', 0)} rounds, guest paused "
          f"{float(t.get('pause_ms', 0)):.1f} ms, took {float(t.get('total_ms', 0)):.0f} ms")
    print(f"  records         {s['records']}")
    for v in st.get("vcpus", []):
        r = v.get("regs", {})
        sr = v.get("sregs", {})
        print(f"  vcpu {v.get('id', 0)}          rip {int(r.get('rip', 0)):#x} rsp "
              f"{int(r.get('rsp', 0)):#x} cr3 {int(sr.get('cr3', 0)):#x} "
              f"mp_state {v.get('mp_state', 0)}, {len(v.get('msrs', []))} MSRs, "
              f"{len(v.get('cpuid', []))} CPUID leaves")
    io = st.get("irqchip", {}).get("ioapic", {})
    routed = sum(1 for x in io.get("redirection", []) if not int(x) & (1 << 16))
    print(f"  irqchip         IOAPIC {routed} pins unmasked, PIC master imr "
          f"{int(st.get('irqchip', {}).get('pic_master', {}).get('imr', 0)):#x}")
    pit = st.get("pit", {}).get("channels", [{}])
    print(f"  pit             channel 0 mode {pit[0].get('mode', 0)} count "
          f"{pit[0].get('count', 0)}")
    print(f"  clock           {int(st.get('clock', {}).get('clock_ns', 0)) / 1e9:.3f} s "
          "of guest time")
    uart = st.get("devices", {}).get("serial0", {})
    print(f"  serial0         ier {uart.get('ier', 0)} mcr {uart.get('mcr', 0)}, "
          f"{len(uart.get('rx_fifo', '')) * 3 // 4} bytes waiting")
    print(f"  console         {s['console_bytes']} bytes of history")
    if show_chunks:
        for c in s["chunks"]:
            print(f"    round {c['round']} {c['gpa']} {c['pages']} pages {c['encoding']} "
                  f"{c['bytes']} bytes")
