"""The previous release, installed from its committed archive (releases/)
into its own virtual environment, runs as an agent beside the current one:
guests move both ways, each restores the other's checkpoints, and what cannot
move is refused before anything moves (docs/compatibility.md)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from tests.cluster import NetnsCluster
from tests.releases import ReleaseUnavailable, previous_release, release_python, release_version
from tests.test_cli import _fails
from vmigrate.migrate import pki, versions
from vmigrate.proto import agent_pb2, agent_pb2_grpc


@pytest.fixture(scope="module")
def old():
    try:
        version = previous_release()
        python = release_python(version)
    except ReleaseUnavailable as e:
        pytest.fail(f"the previous release is needed: {e}")
    installed = release_version(python)
    assert installed == version, f"releases/ archive {version} installs {installed}"
    return version, str(python), installed


@pytest.fixture(scope="module")
def mixed(old):
    """host1 runs the previous release, host2 this one."""
    home = Path(tempfile.mkdtemp(prefix="vmx", dir="/tmp"))
    c = NetnsCluster(home, hosts=2, pythons={"host1": old[1]})
    yield c
    c.close()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def guests(mixed):
    names = []

    def run(name: str, on: str, *args: str) -> str:
        mixed.run("run", name, "--test-guest", "--on", on, "--memory", "64M",
                  "--working-set", "16M", "--dirty-rate", "8M", "--heartbeat-ms", "200", *args)
        names.append(name)
        return name
    yield run
    for n in names:
        mixed.run("stop", n, check=False)


def _clean_and_counting(cluster, name: str, after: int) -> None:
    r = cluster.wait_heartbeats(name, 3, after=after)
    assert r.clean(), (r.problems, r.gaps())
    assert r.heartbeats[0][0].n <= after


def test_hosts_show_both_versions(mixed, old):
    hosts = {h["name"]: h for h in mixed.json("hosts")}
    assert hosts["host1"]["version"]["software_version"] == old[2]
    assert hosts["host2"]["version"]["software_version"] == versions.software_version()
    assert old[2] != versions.software_version()


def test_old_to_new_and_back(mixed, guests):
    name = guests("pp", "host1")
    n = mixed.wait_heartbeats(name, 2).last(0).n
    r = mixed.json("send", "host2", name)
    assert r["state_version"] == 1            # the oldest side's version
    assert mixed.host_of(name) == "host2"
    _clean_and_counting(mixed, name, n)
    n = mixed.report(name).last(0).n
    r = mixed.json("send", "host1", name)     # new -> old: translated down
    assert r["state_version"] == 1
    assert mixed.host_of(name) == "host1"
    _clean_and_counting(mixed, name, n)


def test_a_guest_using_the_rtc_cannot_go_to_the_old_release(mixed, guests, old):
    name = guests("clock", "host2", "--rtc")
    n = mixed.wait_heartbeats(name, 2).last(0).n
    err = _fails(mixed, "send", "host1", name)
    assert "dev.rtc" in err and old[2] in err, err
    assert mixed.host_of(name) == "host2"
    _clean_and_counting(mixed, name, n)
    # ...nor into a checkpoint for it
    err = _fails(mixed, "checkpoint", name, str(mixed.home / "clock.v1"), "--target-version", "1")
    assert "dev.rtc" in err and not (mixed.home / "clock.v1").exists()


def test_each_restores_the_others_checkpoints(mixed, guests, old):
    home = mixed.home
    a = guests("fromold", "host1")
    b = guests("fromnew", "host2")
    mixed.wait_heartbeats(a, 2)
    mixed.wait_heartbeats(b, 2)
    mixed.run("checkpoint", a, str(home / "old.ckpt"))                      # by 0.1.0
    mixed.run("checkpoint", b, str(home / "new-v1.ckpt"), "--target-version", "1")
    mixed.run("checkpoint", b, str(home / "new-v2.ckpt"))
    assert mixed.json("inspect", str(home / "old.ckpt"))["header"]["producer"] == \
        f"vmigrate {old[2]}"
    mixed.run("restore", str(home / "old.ckpt"), "--name", "old-on-new", "--on", "host2")
    mixed.run("restore", str(home / "new-v1.ckpt"), "--name", "new-on-old", "--on", "host1")
    try:
        for name in ("old-on-new", "new-on-old"):
            r = mixed.wait_heartbeats(name, 3, after=mixed.report(name).last(0).n)
            assert r.clean(), (name, r.problems, r.gaps())
        assert mixed.host_of("new-on-old") == "host1"
        # a state version the old release does not read is refused in one line
        err = _fails(mixed, "restore", str(home / "new-v2.ckpt"), "--name", "x", "--on", "host1")
        assert "state version 2" in err and "upgrade vmigrate" in err, err
    finally:
        mixed.run("stop", "old-on-new", check=False)
        mixed.run("stop", "new-on-old", check=False)


def _agent_stub(mixed, host: str) -> agent_pb2_grpc.AgentStub:
    """A stub speaking as an agent (a certificate of the cluster's CA)."""
    pki_dir = Path(mixed.cfg.pki_dir)
    certs = mixed.home / "probe-cert"
    if not (certs / "agent-prober.crt").exists():
        pki.issue_certificate(pki_dir, "agent", "prober", certs)
    addr = f"{mixed.hosts[host].ip}:7070"
    ch = pki.connect(addr, pki.CertPaths.in_dir(certs, "agent", "prober"), agent_name=host)
    return agent_pb2_grpc.AgentStub(ch)


def test_negotiation_refuses_what_the_receiver_cannot_honour(mixed):
    stub = _agent_stub(mixed, "host2")
    config = agent_pb2.RunVmRequest().config
    config.name, config.memory_bytes, config.vcpu_count = "ghost", 64 << 20, 1

    def ask(needs, flags=()):
        return stub.Negotiate(agent_pb2.NegotiateRequest(
            migration_id="probe1", vm="ghost", source_host="prober", config=config,
            version=agent_pb2.VersionInfo(software_version="9.9.9", state_version_min=7,
                                          state_version_max=9),
            needs=needs, guest_cpu=agent_pb2.CpuInfo(flags=list(flags))), timeout=30)

    future = ask([agent_pb2.StateVersionFeatures(state_version=9, features=["x86.vcpu"])])
    assert not future.accepted and "no common state version" in future.reason
    feature = ask([agent_pb2.StateVersionFeatures(state_version=2,
                                                  features=["x86.vcpu", "dev.virtio-gpu"])])
    assert not feature.accepted and "dev.virtio-gpu" in feature.reason
    cpu = ask([agent_pb2.StateVersionFeatures(state_version=2, features=["x86.vcpu"])],
              flags=["sse2", "avx9000"])
    assert not cpu.accepted and "avx9000" in cpu.reason
    # nothing was started for any of them
    assert "ghost" not in {v["name"] for v in mixed.json("ps")}
    with pytest.raises(grpc.RpcError):   # and a non-agent may not even ask
        client_dir = Path(mixed.cfg.pki_dir)
        ch = pki.connect(f"{mixed.hosts['host2'].ip}:7070",
                         pki.CertPaths.in_dir(client_dir, "client", "admin"), agent_name="host2")
        agent_pb2_grpc.AgentStub(ch).Negotiate(agent_pb2.NegotiateRequest(vm="ghost"),
                                               timeout=10)
