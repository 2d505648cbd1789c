"""Where the CLI finds the cluster, and how it talks to agents.

Everything lives under VMIGRATE_HOME (default /var/lib/vmigrate as root,
~/.local/state/vmigrate otherwise):

    cluster/cluster.json   a cluster made by `vmigrate up` (store URL, TLS)
    cluster/pki/           its CA and certificates
    cluster/hosts/NAME/    state directories of the local cluster's agents
    local/                 the on-demand single-host agent, when no cluster exists
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from vmigrate.migrate import store
from vmigrate.proto import agent_pb2_grpc

CLUSTER_FILE = "cluster.json"
LOCAL_HOST = "local"


class CliError(Exception):
    """Shown to the user as one line; exit status 1."""


def home() -> Path:
    env = os.environ.get("VMIGRATE_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/vmigrate")
    return Path.home() / ".local" / "state" / "vmigrate"


@dataclass
class ClusterConfig:
    store_url: str
    insecure: bool = False
    pki_dir: str = ""
    client_name: str = "admin"
    hosts: list[str] = field(default_factory=list)     # agents `vmigrate up` started here
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> ClusterConfig:
        try:
            data = json.loads(path.read_text())
            cfg = cls(store_url=data["store"], insecure=bool(data.get("insecure")),
                      pki_dir=data.get("pki", ""), client_name=data.get("client", "admin"),
                      hosts=list(data.get("hosts", [])))
        except (OSError, ValueError, KeyError) as e:
            raise CliError(f"cannot read the cluster configuration {path}: {e}") from None
        cfg.path = path
        return cfg

    def save(self, path: Path) -> None:
        data = {"store": self.store_url, "insecure": self.insecure, "pki": self.pki_dir,
                "client": self.client_name, "hosts": self.hosts}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)


def cluster_dir() -> Path:
    return home() / "cluster"


def local_dir() -> Path:
    return home() / "local"


def load_cluster() -> ClusterConfig | None:
    path = cluster_dir() / CLUSTER_FILE
    return ClusterConfig.load(path) if path.exists() else None


def open_cluster_store(cfg: ClusterConfig) -> store.ClusterStore:
    try:
        return store.open_store(cfg.store_url)
    except store.StoreError as e:
        raise CliError(f"cannot open the cluster store {cfg.store_url}: {e}") from None


def connect_agent(cfg: ClusterConfig | None, address: str, host: str) -> grpc.Channel:
    """A channel to an agent: mTLS as the cluster's client, plaintext only
    where the cluster was explicitly made insecure, or the local unix socket."""
    from vmigrate.migrate import pki
    from vmigrate.migrate.channels import CHANNEL_OPTIONS

    if address.startswith("unix:"):
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if cfg is None or cfg.insecure:
        return pki.connect(address, None, insecure_plaintext=True, options=CHANNEL_OPTIONS)
    paths = pki.CertPaths.in_dir(Path(cfg.pki_dir), "client", cfg.client_name)
    try:
        return pki.connect(address, paths, agent_name=host, options=CHANNEL_OPTIONS)
    except pki.PkiError as e:
        raise CliError(str(e)) from None


def stub_for(channel: grpc.Channel) -> agent_pb2_grpc.AgentStub:
    return agent_pb2_grpc.AgentStub(channel)
