"""Printing for the CLI: tables, JSON, and progress of long operations."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

from vmigrate.cli.sizes import human_bytes, human_rate
from vmigrate.proto import agent_pb2


def to_dict(msg: Message) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def print_json(data: object) -> None:
    if isinstance(data, Message):
        data = to_dict(data)
    print(json.dumps(data, indent=2, sort_keys=False))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _describe(p: agent_pb2.Progress) -> str:
    parts = [p.phase]
    if p.phase == "precopy":
        parts.append(f"round {p.round}")
    if p.bytes_done:
        parts.append(f"{human_bytes(p.bytes_done)} done")
    if p.bytes_remaining:
        parts.append(f"{human_bytes(p.bytes_remaining)} left")
    if p.throughput_bytes_per_s:
        parts.append(human_rate(p.throughput_bytes_per_s))
    if p.dirty_bytes_per_s:
        parts.append(f"dirty {human_rate(p.dirty_bytes_per_s)}")
    if p.expected_downtime_ms:
        parts.append(f"downtime ~{p.expected_downtime_ms:.0f} ms")
    if p.throttle_percent:
        parts.append(f"throttle {p.throttle_percent}%")
    if p.message:
        parts.append(p.message)
    return ", ".join(parts)


def follow_progress(stream: Iterator[agent_pb2.Progress], title: str,
                    quiet: bool) -> agent_pb2.Progress:
    """Show progress as a live bar on a terminal (nothing when output is not a
    terminal, so scripts see only results and errors); return the last message."""
    last = agent_pb2.Progress()
    if quiet or not sys.stderr.isatty():
        for p in stream:
            last = p
        return last
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=None, title=title)
        for p in stream:
            last = p
            total = p.bytes_done + p.bytes_remaining
            bar.update(task, description=_describe(p), total=total or None,
                       completed=p.bytes_done)
    return last
