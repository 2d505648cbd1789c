"""The page stream: how guest memory crosses the network during a migration.

Pages do not travel inside protobuf messages (that would copy every byte
into and out of a message on each side); they travel as frames on a
raw-bytes gRPC method, /vmigrate.v1.PageStream/Push (client streaming, the
reply is a MemoryAck). One frame:

    "VMPG" | version u16 (1) | flags u16 (0) | header length u32 |
    PageFrameHeader (protobuf, proto/agent.proto) | chunk data, back to back

The header lists each chunk's guest-physical address, page count, encoding,
xxh3_64 and data length; the receiver checks every length against the frame
before it slices anything, then hands each chunk (a view into the frame) to
the same Decoder that checkpoint restores use. docs/protocol.md has the rest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import grpc
import xxhash

from vmigrate.migrate.pages import RAW, Chunk
from vmigrate.proto import agent_pb2

METHOD = "/vmigrate.v1.PageStream/Push"
MAGIC = b"VMPG"
VERSION = 1
PREFIX = struct.Struct("<4sHHI")
MAX_HEADER = 1 << 20
MAX_FRAME = 64 << 20


class BadFrame(Exception):
    pass


def encode(migration_id: str, round_: int, chunks: list[Chunk]) -> bytes:
    """One frame. RAW chunks are views of live guest memory: they are copied
    once into the frame and checksummed from that copy."""
    data = b"".join([c.data for c in chunks if len(c.data)])
    view = memoryview(data)
    heads = []
    pos = 0
    for c in chunks:
        n = len(c.data)
        checksum = xxhash.xxh3_64_intdigest(view[pos:pos + n]) if c.encoding == RAW \
            else c.checksum
        heads.append(agent_pb2.ChunkHeader(guest_phys_addr=c.gpa, page_count=c.pages,
                                           encoding=c.encoding, checksum=checksum,
                                           data_length=n))
        pos += n
    view.release()
    head = agent_pb2.PageFrameHeader(migration_id=migration_id, round=round_,
                                     chunks=heads).SerializeToString()
    return b"".join([PREFIX.pack(MAGIC, VERSION, 0, len(head)), head, data])


def decode(frame: bytes) -> tuple[agent_pb2.PageFrameHeader, list[Chunk]]:
    """The frame's header and its chunks (views into `frame`); raises BadFrame."""
    if len(frame) < PREFIX.size or len(frame) > MAX_FRAME:
        raise BadFrame(f"a page frame of {len(frame)} bytes")
    magic, version, flags, head_len = PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise BadFrame("not a page frame (wrong magic)")
    if version != VERSION or flags:
        raise BadFrame(f"page frame version {version} flags {flags:#x} not understood")
    if head_len > MAX_HEADER or PREFIX.size + head_len > len(frame):
        raise BadFrame(f"page frame header of {head_len} bytes does not fit the frame")
    header = agent_pb2.PageFrameHeader()
    try:
        header.ParseFromString(frame[PREFIX.size:PREFIX.size + head_len])
    except Exception:
        raise BadFrame("page frame header does not decode") from None
    view = memoryview(frame)
    pos = PREFIX.size + head_len
    chunks = []
    for h in header.chunks:
        end = pos + h.data_length
        if end > len(frame):
            raise BadFrame("page frame is shorter than its chunks say")
        chunks.append(Chunk(h.guest_phys_addr, h.page_count, h.encoding, h.checksum,
                            view[pos:end]))
        pos = end
    if pos != len(frame):
        raise BadFrame("page frame carries bytes no chunk accounts for")
    return header, chunks


def _identity(b: bytes) -> bytes:
    return b


def push_callable(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    return channel.stream_unary(METHOD, request_serializer=_identity,
                                response_deserializer=agent_pb2.MemoryAck.FromString)


def handler(receive: Callable[[Iterator[bytes], grpc.ServicerContext], agent_pb2.MemoryAck]
            ) -> grpc.GenericRpcHandler:
    """The server side: register with server.add_generic_rpc_handlers()."""
    rpc = grpc.stream_unary_rpc_method_handler(
        receive, request_deserializer=_identity,
        response_serializer=agent_pb2.MemoryAck.SerializeToString)
    return grpc.method_handlers_generic_handler("vmigrate.v1.PageStream", {"Push": rpc})
