"""The CLI on a single machine (the on-demand local agent): lifecycle of a
test guest and one clear line for every kind of bad input."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster import VMIGRATE, ClusterBase
from vmigrate.vmm import kvm


class Local(ClusterBase):
    def __init__(self, home: Path) -> None:
        self.home = home


@pytest.fixture
def local(short_tmp):
    c = Local(short_tmp)
    yield c
    c.run("down", check=False)


def _memfds_named(name: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with_target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if with_target.startswith(f"/memfd:vmigrate:{name} "):
                    found.append(f"{pid}/{fd}")
        except OSError:
            continue
    return found


def test_run_logs_stop_leaves_nothing_behind(local):
    name = f"life{os.getpid()}"
    info = local.json("run", name, "--test-guest", "--heartbeat-ms", "200")
    assert info["state"] == "running" and info["host"] == "local"
    pid = info["pid"]
    r = local.wait_heartbeats(name, 3)
    assert r.clean()
    assert _memfds_named(name), "guest memory should be a memfd"
    vm_dir = local.home / "local" / "vms" / name
    assert (vm_dir / "vmm.sock").exists()
    ps = local.json("ps")
    assert [v["name"] for v in ps] == [name]
    local.run("pause", name)
    assert local.json("ps")[0]["state"] == "paused"
    local.run("resume", name)
    local.run("stop", name)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the VMM process is still there"
    assert not _memfds_named(name)
    assert not vm_dir.exists()
    assert local.json("ps") == []


def test_logs_follow_streams_new_output(local):
    local.run("run", "vm1", "--test-guest", "--heartbeat-ms", "100")
    p = subprocess.Popen([*VMIGRATE, "logs", "vm1", "--follow"], env=local.env(),
                         stdout=subprocess.PIPE, text=True)
    try:
        lines = [p.stdout.readline() for _ in range(8)]
        assert sum(line.startswith("HB ") for line in lines) >= 5
    finally:
        p.kill()
        p.wait()


def _fails(local, *args) -> str:
    p = local.run(*args, check=False)
    assert p.returncode != 0, f"vmigrate {args} should fail"
    err = p.stderr.strip()
    assert err.startswith("vmigrate: "), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_gets_one_clear_line(local):
    assert "cannot parse --memory" in _fails(local, "run", "vm1", "--test-guest",
                                             "--memory", "12X")
    assert "cannot parse --dirty-rate" in _fails(local, "run", "vm1", "--test-guest",
                                                 "--dirty-rate", "fast")
    assert "more than this host can give" in _fails(local, "run", "big", "--test-guest",
                                                    "--memory", "2000G", "--working-set", "1M")
    assert "invalid VM name" in _fails(local, "run", "Bad Name", "--test-guest")
    assert "no VM named 'ghost'" in _fails(local, "logs", "ghost")
    assert "no VM named 'ghost'" in _fails(local, "stop", "ghost")
    assert "which guest to run" in _fails(local, "run", "vm1")
    local.run("run", "vm1", "--test-guest")
    assert "already exists" in _fails(local, "run", "vm1", "--test-guest")
    assert "unknown host" in _fails(local, "send", "host9", "vm1")
    assert "working set" in _fails(local, "run", "vm2", "--test-guest", "--memory", "16M",
                                   "--working-set", "64M")
    # the first guest was never disturbed
    assert local.report("vm1").clean()


def _run_in_private_dev(home: Path, setup: str, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a mount namespace whose /dev/kvm is changed by `setup`
    (a shell snippet), without root's power to ignore file permissions."""
    env = {**os.environ, "VMIGRATE_HOME": str(home), "GRPC_VERBOSITY": "NONE"}
    cli = " ".join(f"'{x}'" for x in [*VMIGRATE, *args])
    script = (f"set -e; {setup}; exec setpriv --bounding-set=-dac_override,-dac_read_search "
              f"--inh-caps=-dac_override,-dac_read_search {cli}")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("setup", "message"), [
    # /dev/kvm exists but its mode lets nobody open it
    ("mknod -m 000 {d}/kvm c 10 232 && mount --bind {d}/kvm /dev/kvm",
     "no permission to open /dev/kvm"),
    # no /dev/kvm at all: a private /dev with only the basics
    ("mkdir {d}/dev && for n in null zero urandom random; do cp -a /dev/$n {d}/dev/; done && "
     "mount --bind {d}/dev /dev", "/dev/kvm does not exist"),
])
def test_kvm_absent_or_not_accessible_is_one_line(short_tmp, setup, message):
    home = short_tmp / "home"
    home.mkdir()
    p = _run_in_private_dev(home, setup.format(d=short_tmp), "run", "vm1", "--test-guest")
    try:
        assert p.returncode == 1, p.stderr
        assert message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    finally:
        _run_in_private_dev(home, "true", "down")


def test_kvm_missing_or_wrong_device_is_one_line(short_tmp):
    with pytest.raises(kvm.KvmUnavailable, match="does not exist"):
        kvm.Kvm(str(short_tmp / "kvm"))
    with pytest.raises(kvm.KvmError):
        kvm.Kvm("/dev/null")


def test_help_teaches(local):
    top = local.run("--help").stdout
    for word in ("up", "run", "send", "checkpoint", "restore", "inspect", "getting started"):
        assert word in top
    run_help = local.run("run", "--help").stdout
    assert "--working-set" in run_help and "examples:" in run_help
