"""Who may talk to an agent, and what a hostile peer can make it allocate.

Everything here runs against REAL agents (`vmigrate up`, mutual TLS on
loopback, or `vmigrate up --insecure`): a client without a certificate, with
one from another CA, or with a client-role certificate is refused where it
must be; an agent certificate is let in; plaintext exists only when the
cluster was made insecure. The page-stream endpoint refuses frames whose
sizes or counts are absurd, quickly and without growing the agent.

Also `vmigrate init` and `vmigrate cert issue` (cli/security_commands.py),
and the multi-machine set-up their --help teaches.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import zstandard

from tests.cluster import LocalCluster
from vmigrate.migrate import pagestream, pki, versions
from vmigrate.migrate.pages import PAGE, RAW, ZERO, ZSTD, Chunk
from vmigrate.proto import agent_pb2, agent_pb2_grpc
from vmigrate.proto import state_pb2 as pb

TIMEOUT = 20.0
QUICK_S = 3.0            # a hostile frame must be refused within this


# ---------------------------------------------------------------- a real agent


@dataclass
class Agent:
    address: str
    pid: int
    name: str
    ca: Path                 # the cluster's ca.crt
    client: pki.CertPaths    # client "admin", from `vmigrate up`
    peer: pki.CertPaths      # an agent certificate of the same cluster
    other_client: pki.CertPaths
    other_agent: pki.CertPaths

    def channel(self, paths: pki.CertPaths | None) -> grpc.Channel:
        """mTLS as `paths`, pinned to this agent's name (as agents and the CLI do)."""
        return pki.connect(self.address, paths, agent_name=self.name)

    def vm_rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the agent process in bytes."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]


def _short_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="vms", dir="/tmp"))


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    home = _short_home()
    c = LocalCluster(home, hosts=1)
    try:
        pki_dir = home / "cluster" / "pki"
        info = json.loads((home / "cluster" / "hosts" / "host1" / "agent.json").read_text())
        peer = pki.issue_certificate(pki_dir, "agent", "peer", home / "peer")
        other = home / "other-ca"
        pki.create_ca(other, "vmigrate-local")          # same name, another key
        yield Agent(address=info["address"], pid=int(info["pid"]), name="host1",
                    ca=pki_dir / "ca.crt",
                    client=pki.CertPaths.in_dir(pki_dir, "client", "admin"), peer=peer,
                    other_client=pki.issue_certificate(other, "client", "admin",
                                                       home / "other"),
                    other_agent=pki.issue_certificate(other, "agent", "peer",
                                                      home / "other"))
    finally:
        c.close()
        shutil.rmtree(home, ignore_errors=True)


def _code(fn: object) -> grpc.StatusCode:
    """The status a call ends with (OK if it returns)."""
    try:
        fn()  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _host_info(ch: grpc.Channel) -> grpc.StatusCode:
    stub = agent_pb2_grpc.AgentStub(ch)
    return _code(lambda: stub.GetHostInfo(agent_pb2.AgentEmpty(), timeout=TIMEOUT))


def _guest_config(name: str) -> pb.VmConfig:
    return pb.VmConfig(name=name, memory_bytes=16 << 20, vcpu_count=1,
                       test_guest=pb.TestGuestConfig(working_set_bytes=1 << 20,
                                                     heartbeat_ms=1000))


def _negotiate(stub: agent_pb2_grpc.AgentStub, mid: str, vm: str) -> agent_pb2.NegotiateReply:
    return stub.Negotiate(agent_pb2.NegotiateRequest(
        migration_id=mid, vm=vm, source_host="peer", version=versions.version_info(),
        config=_guest_config(vm), compressions=["raw", "zstd"],
        needs=[agent_pb2.StateVersionFeatures(state_version=versions.STATE_VERSION_MAX)]),
        timeout=TIMEOUT)


# ---------------------------------------------------------------- authentication


def test_client_without_certificate_is_refused(agent):
    creds = grpc.ssl_channel_credentials(root_certificates=agent.ca.read_bytes())
    opts = pki.agent_channel_options(agent.name)
    with grpc.secure_channel(agent.address, creds, options=opts) as ch:
        assert _host_info(ch) == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(agent):
    for paths in (agent.other_client, agent.other_agent):
        with pki.connect(agent.address, paths, agent_name=agent.name) as ch:
            assert _host_info(ch) == grpc.StatusCode.UNAVAILABLE
            stub = agent_pb2_grpc.AgentStub(ch)
            code = _code(lambda stub=stub: _negotiate(stub, "f" * 16, "intruder"))
            assert code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_refused_by_a_tls_agent(agent):
    with grpc.insecure_channel(agent.address) as ch:
        assert _host_info(ch) == grpc.StatusCode.UNAVAILABLE


def test_cluster_client_certificate_may_use_the_cli_methods(agent):
    with agent.channel(agent.client) as ch:
        assert _host_info(ch) == grpc.StatusCode.OK
        stub = agent_pb2_grpc.AgentStub(ch)
        assert _code(lambda: stub.ListVms(agent_pb2.AgentEmpty(), timeout=TIMEOUT)) == \
            grpc.StatusCode.OK


# ---------------------------------------------------------------- authorization


def test_client_certificate_cannot_push_a_migration(agent):
    """Negotiate, Prepare, Switchover, Abort and PageStream/Push are agent-only."""
    with agent.channel(agent.client) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        calls = {
            "Negotiate": lambda: _negotiate(stub, "a" * 16, "sneaky"),
            "Prepare": lambda: stub.Prepare(agent_pb2.PrepareRequest(
                migration_id="a" * 16, config=_guest_config("sneaky")), timeout=TIMEOUT),
            "Switchover": lambda: stub.Switchover(agent_pb2.SwitchoverRequest(
                migration_id="a" * 16), timeout=TIMEOUT),
            "Abort": lambda: stub.Abort(agent_pb2.AbortRequest(migration_id="a" * 16),
                                        timeout=TIMEOUT),
            "PageStream/Push": lambda: pagestream.push_callable(ch)(
                iter([pagestream.encode("a" * 16, 0, [])]), timeout=TIMEOUT),
        }
        for method, call in calls.items():
            try:
                call()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.PERMISSION_DENIED, (method, e.code())
                assert "requires role agent" in (e.details() or ""), (method, e.details())
            else:
                pytest.fail(f"a client certificate could call {method}")
        # and nothing was started for it
        assert "sneaky" not in [v.name for v in stub.ListVms(agent_pb2.AgentEmpty(),
                                                              timeout=TIMEOUT).vms]


def test_agent_certificate_can_push_a_migration(agent):
    """The same calls with an agent certificate get past authorization: a real
    negotiate, prepare (a VMM is made ready), page frames applied, abort."""
    mid = "b" * 16
    with agent.channel(agent.peer) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        reply = _negotiate(stub, mid, "welcome")
        assert reply.accepted, reply.reason
        stub.Prepare(agent_pb2.PrepareRequest(migration_id=mid, config=_guest_config("welcome")),
                     timeout=TIMEOUT)
        frame = pagestream.encode(mid, 0, [Chunk(0x100000, 2, RAW, 0, b"\x11" * (2 * PAGE)),
                                           Chunk(0x200000, 1, ZERO)])
        ack = pagestream.push_callable(ch)(iter([frame]), timeout=TIMEOUT)
        assert ack.pages == 3
        # Switchover is let in too; it refuses on content (no such migration)
        code = _code(lambda: stub.Switchover(agent_pb2.SwitchoverRequest(
            migration_id="c" * 16), timeout=TIMEOUT))
        assert code == grpc.StatusCode.NOT_FOUND
        stub.Abort(agent_pb2.AbortRequest(migration_id=mid, reason="test"), timeout=TIMEOUT)
    with agent.channel(agent.client) as ch:
        names = [v.name for v in agent_pb2_grpc.AgentStub(ch).ListVms(
            agent_pb2.AgentEmpty(), timeout=TIMEOUT).vms]
    assert "welcome" not in names


# ---------------------------------------------------------------- plaintext


def test_agent_needs_tls_or_an_explicit_insecure_flag(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vmigrate.cli.agent_main", "--name", "x",
                        "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "--tls-dir" in p.stderr and "--insecure" in p.stderr, p.stderr


def test_plaintext_only_in_a_cluster_made_insecure():
    home = _short_home()
    c = LocalCluster(home, hosts=1, insecure=True)
    try:
        info = json.loads((home / "cluster" / "hosts" / "host1" / "agent.json").read_text())
        with grpc.insecure_channel(info["address"]) as ch:
            assert _host_info(ch) == grpc.StatusCode.OK
        assert c.json("hosts")[0]["name"] == "host1"
        # the CLI refuses to turn it into a TLS cluster behind the user's back
        p = c.run("up", "--hosts", "1", check=False)
        assert p.returncode != 0 and "--insecure" in p.stderr
    finally:
        c.close()
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- hostile page frames


@pytest.fixture
def prepared(agent) -> Iterator[tuple[grpc.Channel, str]]:
    """A migration negotiated and prepared on the agent by a peer agent."""
    mid = os.urandom(8).hex()
    ch = agent.channel(agent.peer)
    stub = agent_pb2_grpc.AgentStub(ch)
    reply = _negotiate(stub, mid, "target")
    assert reply.accepted, reply.reason
    stub.Prepare(agent_pb2.PrepareRequest(migration_id=mid, config=_guest_config("target")),
                 timeout=TIMEOUT)
    try:
        yield ch, mid
    finally:
        try:
            stub.Abort(agent_pb2.AbortRequest(migration_id=mid, reason="test"), timeout=TIMEOUT)
        except grpc.RpcError:
            pass
        ch.close()


def _frame(mid: str, heads: list[agent_pb2.ChunkHeader], data: bytes = b"",
           head_len: int | None = None) -> bytes:
    head = agent_pb2.PageFrameHeader(migration_id=mid, round=1, chunks=heads)
    raw = head.SerializeToString()
    n = len(raw) if head_len is None else head_len
    return pagestream.PREFIX.pack(pagestream.MAGIC, pagestream.VERSION, 0, n) + raw + data


def _refused(ch: grpc.Channel, frames: list[bytes], text: str) -> float:
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        pagestream.push_callable(ch)(iter(frames), timeout=TIMEOUT)
    took = time.monotonic() - t0
    assert err.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND,
                                grpc.StatusCode.RESOURCE_EXHAUSTED), err.value
    assert text in (err.value.details() or ""), err.value.details()
    assert took < QUICK_S, f"took {took:.1f}s to refuse"
    return took


def test_frame_claiming_a_4gib_header_or_chunk_is_refused_quickly(agent):
    """Lengths are checked against the frame before anything is sliced or
    allocated, whatever migration the frame names."""
    _, hwm0 = agent.vm_rss()
    with agent.channel(agent.peer) as ch:
        _refused(ch, [_frame("d" * 16, [], head_len=0xFFFFFFFF)], "does not fit")
        big = agent_pb2.ChunkHeader(guest_phys_addr=0, page_count=1 << 20, encoding=RAW,
                                    data_length=0xFFFFFFFF)
        _refused(ch, [_frame("d" * 16, [big], b"\0" * PAGE)], "shorter than its chunks")
        _refused(ch, [b"VMPG" + b"\xff" * 8], "not understood")
        _refused(ch, [b"GET / HTTP/1.1\r\n\r\n"], "wrong magic")
    _, hwm1 = agent.vm_rss()
    assert hwm1 - hwm0 < 32 << 20, f"the agent's peak RSS grew by {(hwm1 - hwm0) >> 20} MiB"


def test_chunk_claiming_a_billion_pages_is_refused_quickly(agent, prepared):
    ch, mid = prepared
    heads = [agent_pb2.ChunkHeader(guest_phys_addr=0, page_count=10**9, encoding=ZERO)]
    _refused(ch, [_frame(mid, heads)], "claims 1000000000 pages")


def test_chunk_of_4gib_of_pages_is_refused_quickly(agent, prepared):
    ch, mid = prepared
    heads = [agent_pb2.ChunkHeader(guest_phys_addr=0, page_count=1 << 20, encoding=RAW,
                                   data_length=PAGE)]
    _refused(ch, [_frame(mid, heads, b"\0" * PAGE)], "claims 1048576 pages")


def test_compressed_chunk_inflating_past_its_pages_is_refused(agent, prepared):
    """A ~5 KB zstd frame of 150 MiB of zeros passes the "no larger than its
    pages + 1 KiB" check of a one-page chunk; decompression must still stop at
    the chunk's 4 KiB, before the agent allocates the 150 MiB it claims."""
    ch, mid = prepared
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (150 << 20))
    assert len(bomb) <= PAGE + 1024
    heads = [agent_pb2.ChunkHeader(guest_phys_addr=0, page_count=1, encoding=ZSTD,
                                   checksum=1, data_length=len(bomb))]
    _, hwm0 = agent.vm_rss()
    _refused(ch, [_frame(mid, heads, bomb)], "")
    _, hwm1 = agent.vm_rss()
    grew = (hwm1 - hwm0) >> 20
    assert grew < 32, f"a 5 KB chunk made the agent's peak RSS grow by {grew} MiB"


def test_compressed_chunk_that_lies_about_its_size_is_refused(agent, prepared):
    ch, mid = prepared
    small = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (1 << 20))
    assert len(small) < PAGE
    heads = [agent_pb2.ChunkHeader(guest_phys_addr=0, page_count=1, encoding=ZSTD,
                                   checksum=1, data_length=len(small))]
    _refused(ch, [_frame(mid, heads, small)], "does not decompress")


def test_header_listing_the_most_chunks_it_can_is_refused_quickly(agent, prepared):
    """A 1 MiB header is the most a frame may carry: ~300,000 empty chunk
    entries. It must be refused without the agent growing by much."""
    ch, mid = prepared
    n = (pagestream.MAX_HEADER - 64) // 3
    head = agent_pb2.PageFrameHeader(migration_id=mid, round=1,
                                     chunks=[agent_pb2.ChunkHeader(page_count=1)] * n)
    raw = head.SerializeToString()
    while len(raw) > pagestream.MAX_HEADER:
        n -= 1000
        del head.chunks[n:]
        raw = head.SerializeToString()
    _, hwm0 = agent.vm_rss()
    frame = pagestream.PREFIX.pack(pagestream.MAGIC, pagestream.VERSION, 0, len(raw)) + raw
    took = _refused(ch, [frame], "")
    _, hwm1 = agent.vm_rss()
    grew = (hwm1 - hwm0) >> 20
    print(f"\n{n} chunk entries refused in {took:.2f}s; agent peak RSS +{grew} MiB")
    assert grew < 256, f"a 1 MiB header made the agent grow by {grew} MiB"


def test_message_over_the_transport_limit_is_refused(agent):
    from vmigrate.migrate.agent import MAX_MESSAGE

    with agent.channel(agent.peer) as ch:
        frame = _frame("e" * 16, []) + b"\0" * (MAX_MESSAGE + PAGE)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            pagestream.push_callable(ch)(iter([frame]), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert time.monotonic() - t0 < QUICK_S * 3


def test_agent_survives_the_hostile_frames(agent):
    with agent.channel(agent.client) as ch:
        assert _host_info(ch) == grpc.StatusCode.OK
        names = [v.name for v in agent_pb2_grpc.AgentStub(ch).ListVms(
            agent_pb2.AgentEmpty(), timeout=TIMEOUT).vms]
    assert "target" not in names


# ---------------------------------------------------------------- vmigrate init / cert issue


def _cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "VMIGRATE_HOME": str(home), "GRPC_VERBOSITY": "NONE"}
    p = subprocess.run([sys.executable, "-m", "vmigrate.cli.main", *args], env=env,
                       capture_output=True, text=True, timeout=120, cwd="/")
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmigrate: "), p.stderr
    return lines[0]


def test_init_creates_the_ca_and_an_admin_client(short_tmp):
    home = short_tmp / "home"
    r = json.loads(_cli(home, "init", "--cluster", "prod", "--json").stdout)
    pki_dir = home / "cluster" / "pki"
    assert r["ca_dir"] == str(pki_dir) and r["cluster"] == "prod"
    assert stat.S_IMODE((pki_dir / "ca.key").stat().st_mode) == 0o600
    info = pki.verify_cert_paths(pki.CertPaths.in_dir(pki_dir, "client", "admin"),
                                 role="client")
    assert info.cluster == "prod" and info.name == "admin"
    err = _one_line_error(_cli(home, "init", check=False))
    assert "already exists" in err
    text = _cli(home, "init", "--dir", str(short_tmp / "d2")).stdout
    assert "cert issue --role agent" in text


def test_cert_issue_for_agents_and_clients(short_tmp):
    home = short_tmp / "home"
    _cli(home, "init", "--dir", str(short_tmp / "ca"))
    ca = ["--ca", str(short_tmp / "ca")]
    out = short_tmp / "h7"
    r = json.loads(_cli(home, "cert", "issue", "--role", "agent", "host7", "--host",
                        "10.1.2.3", "--host", "host7.example.com", "--out", str(out), *ca,
                        "--json").stdout)
    assert r["dir"] == str(out) and sorted(r["hosts"]) == ["10.1.2.3", "host7.example.com"]
    paths = pki.CertPaths.in_dir(out, "agent", "host7")
    info = pki.verify_cert_paths(paths, role="agent")
    assert (info.role, info.name) == ("agent", "host7")
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert paths.ca_cert.read_bytes() == (short_tmp / "ca" / "ca.crt").read_bytes()
    # the default directory, and a client certificate
    r = json.loads(_cli(home, "cert", "issue", "--role", "client", "alice", *ca,
                        "--json").stdout)
    assert r["dir"] == str(home / "cluster" / "certs" / "client-alice")
    pki.verify_cert_paths(pki.CertPaths.in_dir(Path(r["dir"]), "client", "alice"),
                          role="client")
    # existing files are kept unless --force (renewal)
    assert "refusing to overwrite" in _one_line_error(_cli(
        home, "cert", "issue", "--role", "agent", "host7", "--out", str(out), *ca,
        check=False))
    _cli(home, "cert", "issue", "--role", "agent", "host7", "--out", str(out), *ca, "--force")
    # plain text output says what to do with it
    text = _cli(home, "cert", "issue", "--role", "agent", "host8", "--host", "10.1.2.4",
                *ca).stdout
    assert "vmigrated --name host8 --listen 10.1.2.4:7070 --tls-dir" in text


@pytest.mark.parametrize(("args", "says"), [
    (["--role", "client", "bob", "--host", "10.0.0.1"], "no hosts"),
    (["--role", "agent", "Bad_Name"], "invalid agent name"),
    (["--role", "agent", "h1", "--host", "*.example.com"], "invalid host"),
    (["--role", "agent", "h1", "--days", "0"], "--days"),
    (["--role", "agent", "h1", "--days", "99999"], "outlive the CA"),
])
def test_cert_issue_refuses_bad_input_in_one_line(short_tmp, args, says):
    home = short_tmp / "home"
    _cli(home, "init")
    assert says in _one_line_error(_cli(home, "cert", "issue", *args, check=False))


def test_cert_issue_without_a_ca_says_how_to_make_one(short_tmp):
    err = _one_line_error(_cli(short_tmp / "home", "cert", "issue", "--role", "agent", "h1",
                               check=False))
    assert "not found" in err and "vmigrate init" in err


def test_help_teaches_the_multi_machine_setup(short_tmp):
    text = _cli(short_tmp, "init", "--help").stdout
    for needle in ("ca.key", "vmigrate cert issue --role agent", "--tls-dir", "vmigrated",
                   "scp", "may push a migration"):
        assert needle in text, needle
    text = _cli(short_tmp, "cert", "--help").stdout
    for needle in ("--role agent", "--role client", "--force", "--tls-dir"):
        assert needle in text, needle


def test_an_agent_set_up_as_on_another_machine(short_tmp):
    """What `vmigrate init --help` teaches: init with the agents' store, `cert
    issue` for an agent, the directory handed to `vmigrated --tls-dir`. The CLI
    then finds the agent through the store and reaches it with its admin
    certificate, pinned to the agent's name; a certificate from another CA
    does not get in."""
    home = short_tmp / "home"
    store_url = f"sqlite:///{short_tmp / 'shared.db'}"
    _cli(home, "init", "--cluster", "lab", "--store", store_url)
    tls = short_tmp / "shipped"
    _cli(home, "cert", "issue", "--role", "agent", "far", "--host", "127.0.0.1", "--out",
         str(tls))
    state = short_tmp / "state"
    log = open(short_tmp / "agent.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "vmigrate.cli.agent_main", "--name", "far",
                             "--listen", "127.0.0.1:0", "--state-dir", str(state), "--tls-dir",
                             str(tls), "--store", store_url, "--standby-vmms", "0"],
                            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not (state / "agent.json").exists():
            assert proc.poll() is None, (short_tmp / "agent.log").read_text()
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.1)
        hosts = json.loads(_cli(home, "hosts", "--json").stdout)
        assert [(h["name"], h["alive"]) for h in hosts] == [("far", True)]
        assert hosts[0]["version"]["software_version"], hosts
        assert json.loads(_cli(home, "ps", "--json").stdout) == []
        address = json.loads((state / "agent.json").read_text())["address"]
        admin = pki.CertPaths.in_dir(home / "cluster" / "pki", "client", "admin")
        with pki.connect(address, admin, agent_name="other") as ch:     # the wrong agent
            assert _host_info(ch) == grpc.StatusCode.UNAVAILABLE
        stranger = short_tmp / "stranger"
        pki.create_ca(stranger / "ca", "lab")
        paths = pki.issue_certificate(stranger / "ca", "client", "admin", stranger)
        with pki.connect(address, paths, agent_name="far") as ch:
            assert _host_info(ch) == grpc.StatusCode.UNAVAILABLE
        # and init refuses to point this vmigrate at a second cluster
        assert "already set up" in _one_line_error(_cli(
            home, "init", "--dir", str(short_tmp / "ca2"), "--store", store_url, check=False))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_vmigrate_up_reuses_the_ca_of_init(short_tmp):
    home = short_tmp / "home"
    _cli(home, "init", "--cluster", "mine")
    c = LocalCluster(home, hosts=1)
    try:
        tls = home / "cluster" / "hosts" / "host1" / "tls"
        info = pki.verify_cert_paths(pki.CertPaths.in_dir(tls, "agent", "host1"), role="agent")
        assert info.cluster == "mine"
        assert c.json("hosts")[0]["name"] == "host1"
    finally:
        c.close()
