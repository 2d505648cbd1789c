"""`vmigrate init` and `vmigrate cert issue`: the cluster CA and the certificates
of agents on other machines and of CLI users (built on migrate/pki.py).

`register(cmd)` adds the commands to the parser (cmd(name, fn, help, epilog) ->
ArgumentParser, as in cli/main.py). Everything said to the user is one line;
the --help texts teach the multi-machine set-up, because that is where people
get certificates wrong.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vmigrate.cli import output
from vmigrate.cli.context import CLUSTER_FILE, CliError, ClusterConfig, cluster_dir

if TYPE_CHECKING:
    from vmigrate.cli.main import Session

ADMIN = "admin"

INIT_HELP = "create the cluster's certificate authority (CA) and your client certificate"
INIT_EPILOG = """\
Agents (vmigrated) and the vmigrate command talk mutual TLS: each presents a
certificate signed by the cluster CA and refuses peers without one. Only
agent certificates may push a migration into an agent; client certificates
(people, scripts) may do everything else.

`vmigrate init` writes into DIR (default $VMIGRATE_HOME/cluster/pki, where
`vmigrate up` and the vmigrate command look):
  ca.crt                      the CA certificate: public, goes to every host
  ca.key                      the CA's private key (mode 0600): keep it on this
                              admin machine only, back it up, never copy it
  client-admin.crt/.key       your client certificate, for this vmigrate command
With --store URL it also points this vmigrate command at the cluster whose
agents share that store ($VMIGRATE_HOME/cluster/cluster.json).

agents on several machines:
  0. on the admin machine, with the store the agents will use:
       vmigrate init --cluster prod --store etcd://10.0.0.9:2379
  1. here, on the machine that holds ca.key, one certificate per agent; NAME is
     the agent's --name, --host the addresses and DNS names it is reached by:
       vmigrate cert issue --role agent host1 --host 10.0.0.1 --host host1.example.com
  2. copy the directory it prints (ca.crt, agent-host1.crt, agent-host1.key) to
     that machine, e.g. as /etc/vmigrate/tls (keep the key mode 0600):
       scp -rp $VMIGRATE_HOME/cluster/certs/agent-host1 root@10.0.0.1:/etc/vmigrate/tls
  3. there, start the agent with it:
       vmigrated --name host1 --listen 10.0.0.1:7070 --tls-dir /etc/vmigrate/tls \\
                 --state-dir /var/lib/vmigrate --store etcd://10.0.0.9:2379
  4. `vmigrate hosts` here lists every agent that runs; `vmigrate run`, `send`...
     work across them.
  5. for another person or a script: vmigrate cert issue --role client alice

One machine only? `vmigrate up` does all of this by itself.
"""

ISSUE_HELP = "issue a certificate for an agent or for a CLI user"
ISSUE_EPILOG = """\
Signs a certificate with the cluster CA (see `vmigrate init --help`) and
writes ROLE-NAME.crt, ROLE-NAME.key (mode 0600) and a copy of ca.crt into
one directory, ready to be copied to where it is used as a whole.

  --role agent   for vmigrated on a host: NAME must be the agent's --name
                 (vmigrate's own connections check that name, whatever the
                 address); --host adds the IP addresses and DNS names it is
                 reached by, for tools that check those. Start the agent with
                 `vmigrated --name NAME --tls-dir DIR ...` on that machine.
  --role client  for a person or a script using the vmigrate command: no
                 --host. The vmigrate command uses client-NAME.* from its
                 cluster's pki directory ("pki" and "client" in
                 $VMIGRATE_HOME/cluster/cluster.json).

examples:
  vmigrate cert issue --role agent host3 --host 10.0.0.3
  vmigrate cert issue --role agent host3 --host 10.0.0.3 --force   # renew
  vmigrate cert issue --role client alice --out /tmp/alice-certs

Certificates last --days (default 365); issue again with --force to renew.
"""


def default_ca_dir() -> Path:
    """Where `vmigrate up` keeps (and reuses) the cluster CA."""
    return cluster_dir() / "pki"


def default_out_dir(role: str, name: str) -> Path:
    return cluster_dir() / "certs" / f"{role}-{name}"


def _pki_error(e: Exception, ca_dir: Path) -> CliError:
    from vmigrate.migrate import pki

    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, pki.PkiFileMissingError) and "CA" in msg:
        msg += f"; create one with 'vmigrate init --dir {ca_dir}' (or pass --ca DIR)"
    return CliError(msg)


def cmd_init(s: Session, a: argparse.Namespace) -> int:
    """`vmigrate init [--dir DIR] [--cluster NAME]`."""
    from vmigrate.migrate import pki

    ca_dir = Path(a.dir).absolute() if a.dir else default_ca_dir()
    if ca_dir.exists() and not ca_dir.is_dir():
        raise CliError(f"{ca_dir} exists and is not a directory")
    config = cluster_dir() / CLUSTER_FILE
    if a.store:
        if not a.store.startswith(("etcd://", "sqlite:///")):
            raise CliError(f"--store takes etcd://HOST:PORT or sqlite:///PATH, not {a.store!r}")
        if config.exists():
            raise CliError(f"this vmigrate is already set up for a cluster ({config}); "
                           "'vmigrate down' first, or use another VMIGRATE_HOME")
    try:
        pki.validate_name(a.cluster, "cluster name")
        if (ca_dir / pki.CA_CERT_NAME).exists() or (ca_dir / pki.CA_KEY_NAME).exists():
            raise CliError(f"a CA already exists in {ca_dir}: every certificate it issued "
                           "depends on it; remove the directory yourself to start over, or "
                           "use --dir for another one")
        ca = pki.create_ca(ca_dir, a.cluster, days=a.days)
        client = pki.issue_certificate(ca_dir, "client", ADMIN, ca_dir)
        if a.store:
            config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            ClusterConfig(store_url=a.store, pki_dir=str(ca_dir),
                          client_name=ADMIN).save(config)
    except (pki.PkiError, OSError) as e:
        raise _pki_error(e, ca_dir) from None
    info = {"ca_dir": str(ca_dir), "cluster": a.cluster, "ca_cert": str(ca.cert),
            "ca_key": str(ca.key), "client_cert": str(client.cert),
            "client_key": str(client.key), "store": a.store or ""}
    if a.json:
        output.print_json(info)
        return 0
    print(f"cluster CA {a.cluster!r} created in {ca_dir}")
    print(f"  {ca.cert}: public, goes to every host")
    print(f"  {ca.key}: secret, keep it here (and a backup)")
    print(f"  {client.cert}: your client certificate ({ADMIN})")
    if a.store:
        print(f"  this vmigrate now talks to the agents of {a.store} ({config})")
    print("next: 'vmigrate cert issue --role agent NAME --host ADDRESS' for each agent "
          "(see 'vmigrate init --help')")
    return 0


def cmd_cert(s: Session, a: argparse.Namespace) -> int:
    """`vmigrate cert issue --role agent|client NAME [--host ...] [--out DIR]`."""
    from vmigrate.migrate import pki

    ca_dir = Path(a.ca).absolute() if a.ca else default_ca_dir()
    hosts = list(a.host or [])
    if a.role == "client" and hosts:
        raise CliError("client certificates name no hosts: drop --host (it is for agents)")
    if a.days < 1:
        raise CliError("--days must be at least 1")
    out = Path(a.out).absolute() if a.out else default_out_dir(a.role, a.name)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    try:
        paths = pki.issue_certificate(ca_dir, a.role, a.name, out, hosts, a.days,
                                      force=a.force)
        cert_info = pki.verify_cert_paths(paths, role=a.role)
    except (pki.PkiError, OSError) as e:
        raise _pki_error(e, ca_dir) from None
    info = {"role": a.role, "name": a.name, "cluster": cert_info.cluster,
            "hosts": list(cert_info.hosts), "dir": str(out), "cert": str(paths.cert),
            "key": str(paths.key), "ca_cert": str(paths.ca_cert),
            "not_after": cert_info.not_after.isoformat(),
            "fingerprint_sha256": cert_info.fingerprint_sha256}
    if a.json:
        output.print_json(info)
        return 0
    print(f"{a.role} certificate for {a.name!r} (cluster {cert_info.cluster!r}) in {out}, "
          f"valid until {cert_info.not_after:%Y-%m-%d}")
    if a.role == "agent":
        print(f"  copy {out} to {a.name} (e.g. as /etc/vmigrate/tls), then run there:")
        print(f"  vmigrated --name {a.name} --listen {_listen_hint(hosts)}:7070 "
              "--tls-dir /etc/vmigrate/tls --state-dir /var/lib/vmigrate --store URL")
    else:
        print(f"  give {out} to {a.name}: ca.crt, {paths.cert.name}, {paths.key.name}")
    return 0


def _listen_hint(hosts: list[str]) -> str:
    import ipaddress

    for h in hosts:
        try:
            ip = ipaddress.ip_address(h.strip("[]"))
        except ValueError:
            continue
        return f"[{ip}]" if ip.version == 6 else str(ip)
    return "0.0.0.0"


def register(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `vmigrate init` and `vmigrate cert issue` to the parser."""
    p = cmd("init", cmd_init, INIT_HELP, INIT_EPILOG)
    p.add_argument("--dir", metavar="DIR",
                   help="where the CA lives (default: $VMIGRATE_HOME/cluster/pki)")
    p.add_argument("--cluster", default="vmigrate", metavar="NAME",
                   help="the cluster's name, written into every certificate "
                        "(default: vmigrate)")
    p.add_argument("--days", type=int, default=3650,
                   help="how long the CA is valid (default 3650)")
    p.add_argument("--store", metavar="URL",
                   help="the cluster store the agents use (etcd://HOST:PORT): this vmigrate "
                        "then talks to them")

    p = cmd("cert", cmd_cert, ISSUE_HELP, ISSUE_EPILOG)
    p.add_argument("action", choices=["issue"], help="what to do (issue)")
    p.add_argument("name", help="the agent's --name, or the user's name")
    p.add_argument("--role", required=True, choices=["agent", "client"],
                   help="agent: a vmigrated; client: a person or script using vmigrate")
    p.add_argument("--host", action="append", metavar="IP/DNS",
                   help="an address or DNS name the agent is reached by (repeat; agents "
                        "only)")
    p.add_argument("--out", metavar="DIR", help="where to write the files (default: "
                   "$VMIGRATE_HOME/cluster/certs/ROLE-NAME)")
    p.add_argument("--ca", metavar="DIR",
                   help="the CA directory (default: $VMIGRATE_HOME/cluster/pki)")
    p.add_argument("--days", type=int, default=365, help="validity (default 365)")
    p.add_argument("--force", action="store_true",
                   help="replace existing files of that name (renewal)")
