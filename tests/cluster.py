"""A vmigrate cluster for tests, driven through the real CLI.

`LocalCluster` is what a user gets from `vmigrate up` (agents on loopback);
`NetnsCluster` puts each agent in its own network namespace with its own
address, so migrations cross a real (veth) network that tests can cut, slow
or make lossy.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vmigrate.vmm.testguest import report

VMIGRATE = [sys.executable, "-m", "vmigrate.cli.main"]


class CliFailed(AssertionError):
    pass


class ClusterBase:
    home: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "VMIGRATE_HOME": str(self.home), "GRPC_VERBOSITY": "NONE"}

    def run(self, *args: str, check: bool = True, timeout: float = 300,
            input_: str | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([*VMIGRATE, *args], env=self.env(), capture_output=True, text=True,
                           timeout=timeout, input=input_)
        if check and p.returncode != 0:
            raise CliFailed(f"vmigrate {' '.join(args)} failed ({p.returncode}): "
                            f"{p.stderr.strip()}")
        return p

    def json(self, *args: str, timeout: float = 300) -> object:
        p = self.run(*args, "--json", timeout=timeout)
        return json.loads(p.stdout)

    def logs(self, name: str) -> str:
        return self.run("logs", name).stdout

    def report(self, name: str) -> report.Report:
        return report.parse(self.logs(name))

    def host_of(self, name: str) -> str:
        for vm in self.json("ps"):
            if vm["name"] == name:
                return vm["host"]
        raise AssertionError(f"{name} is not in 'vmigrate ps'")

    def wait_heartbeats(self, name: str, count: int, after: int = 0, cpus: int = 1,
                        timeout: float = 30) -> report.Report:
        deadline = time.monotonic() + timeout
        while True:
            r = self.report(name)
            if all((hb := r.last(c)) is not None and hb.n >= after + count
                   for c in range(cpus)):
                return r
            if r.problems:
                raise AssertionError(f"{name} reported {r.problems[:3]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {count} heartbeats after {after} in "
                                     f"{timeout}s; tail: {self.logs(name)[-300:]!r}")
            time.sleep(0.2)


class LocalCluster(ClusterBase):
    def __init__(self, home: Path, hosts: int = 2, insecure: bool = False,
                 store: str | None = None) -> None:
        self.home = home
        args = ["up", "--hosts", str(hosts)]
        if insecure:
            args.append("--insecure")
        if store:
            args += ["--store", store]
        self.run(*args, timeout=120)

    def close(self) -> None:
        self.run("down", check=False, timeout=120)


class NetnsCluster(ClusterBase):
    """Agents host1..hostN, each in its own network namespace with its own
    address, sharing a SQLite (or given) store; the CLI talks to them over the
    namespaces' bridge with mutual TLS, exactly as `vmigrate up` sets it up."""

    def __init__(self, home: Path, hosts: int = 2, store: str | None = None,
                 pythons: dict[str, str] | None = None) -> None:
        """`pythons` runs some hosts' agents from another installation (an
        older release, tests/releases.py)."""
        from tests.netns import Network
        from vmigrate.cli.cluster import agent_argv, start_agent
        from vmigrate.cli.context import ClusterConfig
        from vmigrate.migrate import pki

        self.home = home
        self.net = Network()
        self.net.start()
        cdir = home / "cluster"
        cdir.mkdir(parents=True)
        pki_dir = cdir / "pki"
        pki.create_ca(pki_dir, "test")
        pki.issue_certificate(pki_dir, "client", "admin", pki_dir)
        self.cfg = ClusterConfig(store_url=store or f"sqlite:///{cdir / 'cluster.db'}",
                                 pki_dir=str(pki_dir))
        self.hosts = {}
        self.pythons = dict(pythons or {})
        try:
            for i in range(1, hosts + 1):
                name = f"host{i}"
                h = self.net.add_host(name)
                state_dir = cdir / "hosts" / name
                tls = state_dir / "tls"
                pki.issue_certificate(pki_dir, "agent", name, tls, hosts=[h.ip])
                self.hosts[name] = h
                self._argv = agent_argv
                start_agent(agent_argv(name, f"{h.ip}:7070", state_dir, self.cfg.store_url, tls,
                                       python=self.pythons.get(name)),
                            state_dir, netns_argv=h.netns_argv([]))
                self.cfg.hosts.append(name)
            self.cfg.save(cdir / "cluster.json")
        except BaseException:
            self.close()
            raise

    def restart_agent(self, name: str, hold: str = "", python: str | None = None) -> None:
        """Start host `name`'s agent again (after a kill or stop), optionally with
        VMIGRATE_HOLD hold points (migrate/faults.py) or another installation."""
        from vmigrate.cli.cluster import agent_argv, start_agent

        h = self.hosts[name]
        if python is not None:
            self.pythons[name] = python
        state_dir = self.home / "cluster" / "hosts" / name
        env = {**os.environ, "VMIGRATE_HOLD": hold} if hold else None
        start_agent(agent_argv(name, f"{h.ip}:7070", state_dir, self.cfg.store_url,
                               state_dir / "tls", python=self.pythons.get(name)),
                    state_dir, netns_argv=h.netns_argv([]), env=env)

    def stop_agent(self, name: str, kill: bool = False) -> None:
        """Stop (SIGTERM) or kill (SIGKILL) host `name`'s agent; its guests' VMMs live on."""
        import signal

        pid = self.agent_pid(name)
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1][0] == "Z":
                    break
            time.sleep(0.05)

    def agent_pid(self, name: str) -> int:
        return int(json.loads((self.home / "cluster" / "hosts" / name / "agent.json")
                              .read_text())["pid"])

    def close(self) -> None:
        try:
            for h in self.hosts.values():
                with contextlib.suppress(Exception):
                    h.clear_faults()
            self.run("down", check=False, timeout=120)
        finally:
            self.net.close()


def guest_starter(cluster: ClusterBase, hosts: tuple[str, ...], memory: str, ws: str,
                  rate: str) -> Iterator[Callable[..., str]]:
    """The body of a `guests` fixture: yields run(name, on, memory=, ws=, rate=)
    starting a test guest; afterwards stops them all and undrains `hosts`."""
    names: list[str] = []

    def run(name: str, on: str, memory: str = memory, ws: str = ws, rate: str = rate) -> str:
        cluster.run("run", name, "--test-guest", "--on", on, "--memory", memory,
                    "--working-set", ws, "--dirty-rate", rate, "--heartbeat-ms", "200")
        names.append(name)
        return name
    yield run
    for n in names:
        cluster.run("stop", n, check=False)
    for h in hosts:
        cluster.run("undrain", h, check=False)
