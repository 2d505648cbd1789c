"""Starting and stopping agents on this machine: the local cluster of
`vmigrate up` and the on-demand single-host agent."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from vmigrate.cli.context import (
    CLUSTER_FILE,
    LOCAL_HOST,
    CliError,
    ClusterConfig,
    cluster_dir,
    connect_agent,
    local_dir,
    stub_for,
)
from vmigrate.migrate import store
from vmigrate.proto import agent_pb2
from vmigrate.vmm.client import pid_alive

AGENT_START_TIMEOUT_S = 60.0
IDLE_EXIT_S = 60.0


def agent_argv(name: str, listen: str, state_dir: Path, store_url: str,
               tls_dir: Path | None, idle_exit: float = 0.0,
               python: str | None = None) -> list[str]:
    """The command line of an agent (`python`: another installation's, e.g. an
    older release during a rolling upgrade; default: this one)."""
    # -P: never the current directory on sys.path (a checkout there would shadow
    # the installation this agent is meant to run)
    argv = [python or sys.executable, "-P", "-m", "vmigrate.cli.agent_main", "--name", name,
            "--listen", listen, "--state-dir", str(state_dir), "--store", store_url]
    argv += ["--tls-dir", str(tls_dir)] if tls_dir else ["--insecure"]
    if idle_exit:
        argv += ["--idle-exit", str(idle_exit)]
    return argv


def start_agent(argv: list[str], state_dir: Path, netns_argv: list[str] | None = None,
                env: dict[str, str] | None = None) -> dict:
    """Start an agent as a daemon and wait until it serves; returns its agent.json."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    info_path = state_dir / "agent.json"
    with contextlib.suppress(FileNotFoundError):
        info_path.unlink()
    log = open(state_dir / "agent.log", "ab")  # noqa: SIM115
    full = (netns_argv or []) + argv
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, close_fds=True, env=env, cwd="/")
    log.close()
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(f"agent failed to start: {_last_log_line(state_dir / 'agent.log')}")
        try:
            info = json.loads(info_path.read_text())
            if info.get("pid") == proc.pid:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise CliError(f"agent did not start within {AGENT_START_TIMEOUT_S:.0f} s "
                   f"(see {state_dir / 'agent.log'})")


def _last_log_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def agent_info(state_dir: Path) -> dict | None:
    """agent.json of a running agent, or None."""
    try:
        info = json.loads((state_dir / "agent.json").read_text())
    except (OSError, ValueError):
        return None
    return info if pid_alive(int(info.get("pid", 0))) else None


def stop_agent(state_dir: Path, address: str, cfg: ClusterConfig | None, host: str,
               stop_vms: bool = True, timeout: float = 20.0) -> None:
    info = agent_info(state_dir)
    if info is None:
        return
    with contextlib.suppress(grpc.RpcError, CliError):
        ch = connect_agent(cfg, address, host)
        stub_for(ch).ShutdownAgent(agent_pb2.ShutdownAgentRequest(stop_vms=stop_vms),
                                   timeout=timeout)
        ch.close()
    pid = int(info["pid"])
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- local cluster


def cluster_up(hosts: int, store_url: str | None, insecure: bool) -> ClusterConfig:
    from vmigrate.migrate import pki

    cdir = cluster_dir()
    cdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = cdir / CLUSTER_FILE
    if path.exists():
        cfg = ClusterConfig.load(path)
        if store_url and store_url != cfg.store_url:
            raise CliError(f"a cluster with store {cfg.store_url} is already set up here: "
                           "'vmigrate down' first")
        if insecure != cfg.insecure:
            raise CliError("the cluster here was set up " +
                           ("without" if not cfg.insecure else "with") +
                           " --insecure: 'vmigrate down' first to change that")
    else:
        cfg = ClusterConfig(store_url=store_url or f"sqlite:///{cdir / 'cluster.db'}",
                            insecure=insecure)
    pki_dir = cdir / "pki"
    if not insecure:
        if not (pki_dir / "ca.crt").exists():
            pki.create_ca(pki_dir, "vmigrate-local")
        if not (pki_dir / "client-admin.crt").exists():
            pki.issue_certificate(pki_dir, "client", "admin", pki_dir)
        cfg.pki_dir = str(pki_dir)
    names = [f"host{i}" for i in range(1, hosts + 1)]
    for name in names:
        state_dir = cdir / "hosts" / name
        if agent_info(state_dir) is not None:
            continue
        tls = None
        if not insecure:
            tls = state_dir / "tls"
            if not (tls / f"agent-{name}.crt").exists():
                pki.issue_certificate(pki_dir, "agent", name, tls,
                                      hosts=["127.0.0.1", "localhost"])
        start_agent(agent_argv(name, "127.0.0.1:0", state_dir, cfg.store_url, tls), state_dir)
        if name not in cfg.hosts:
            cfg.hosts.append(name)
    cfg.save(path)
    return cfg


def cluster_down(cfg: ClusterConfig, st: store.ClusterStore | None) -> list[str]:
    stopped = []
    cdir = cluster_dir()
    for name in cfg.hosts:
        state_dir = cdir / "hosts" / name
        address = ""
        info = agent_info(state_dir)
        if info is not None:
            address = info.get("address", "")
            stop_agent(state_dir, address, cfg, name)
            stopped.append(name)
        if st is not None:
            with contextlib.suppress(store.StoreError):
                st.deregister_host(name)
    kill_leftover_vmms(cdir / "hosts")
    if cfg.store_url.startswith("sqlite:"):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(cfg.store_url.removeprefix("sqlite://") + suffix).unlink()
    with contextlib.suppress(FileNotFoundError):
        (cdir / CLUSTER_FILE).unlink()
    shutil.rmtree(cdir / "hosts", ignore_errors=True)
    return stopped


def kill_leftover_vmms(root: Path) -> list[int]:
    """VMM processes whose agent is gone for good (killed, never restarted)."""
    from vmigrate.vmm.client import kill_vmm, read_pid

    killed = []
    for pid_file in root.glob("*/vms/*/vmm.pid"):
        pid = read_pid(pid_file.parent)
        if pid and pid_alive(pid):
            kill_vmm(pid)
            killed.append(pid)
    return killed


# ---------------------------------------------------------------- on-demand agent


def local_store_url() -> str:
    return f"sqlite:///{local_dir() / 'cluster.db'}"


def local_address() -> str:
    return f"unix:{local_dir() / 'agent.sock'}"


def ensure_local_agent() -> str:
    """The address of this machine's on-demand agent, starting it if needed."""
    d = local_dir()
    info = agent_info(d)
    if info is not None:
        return local_address()
    # An agent on its way out (idle exit) has already removed agent.json but
    # still holds the socket and the store: let it finish first.
    try:
        pid = int((d / "agent.pid").read_text())
    except (OSError, ValueError):
        pid = 0
    deadline = time.monotonic() + 10
    while pid and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    start_agent(agent_argv(LOCAL_HOST, local_address(), d, local_store_url(), None,
                           idle_exit=IDLE_EXIT_S), d)
    return local_address()
