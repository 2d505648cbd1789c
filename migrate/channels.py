"""gRPC channels between agents, and what failed calls mean to a user."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from vmigrate.migrate.errors import AgentError

if TYPE_CHECKING:
    from vmigrate.migrate.agent import AgentConfig

MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def agent_channel(cfg: AgentConfig, address: str, peer_name: str) -> grpc.Channel:
    """A channel to another agent: mTLS pinned to that agent's certificate, or
    plaintext when this agent runs with --insecure."""
    from vmigrate.migrate import pki

    if cfg.tls_dir is None:
        return pki.connect(address, None, insecure_plaintext=True, options=CHANNEL_OPTIONS)
    paths = pki.CertPaths.in_dir(cfg.tls_dir, "agent", cfg.name)
    return pki.connect(address, paths, agent_name=peer_name, options=CHANNEL_OPTIONS)


def rpc_error(what: str, e: grpc.RpcError) -> AgentError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        return AgentError(f"{what}: peer unreachable ({details})", code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return AgentError(f"{what}: no answer in time", code)
    return AgentError(f"{what}: {details}", code)
