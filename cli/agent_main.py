"""vmigrated: the node agent. See `vmigrated --help`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EPILOG = """\
The agent runs this host's guests (one VMM process each, surviving agent
restarts) and moves them: live migration to and from other agents, checkpoint
and restore. It registers itself in the cluster store and keeps a lease there
while it runs.

examples:
  vmigrated --name host1 --listen 10.0.0.1:7070 --state-dir /var/lib/vmigrate/host1 \\
            --store etcd://10.0.0.9:2379 --tls-dir /etc/vmigrate/tls
  vmigrated --name dev --listen 127.0.0.1:7070 --state-dir /tmp/dev --insecure

Most people never start it by hand: `vmigrate up` starts a local cluster.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vmigrated", description="vmigrate node agent",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="this host's name in the cluster")
    ap.add_argument("--listen", required=True,
                    help="HOST:PORT to serve on (port 0: any), or unix:/path")
    ap.add_argument("--state-dir", required=True, type=Path,
                    help="where this agent keeps its guests' files")
    ap.add_argument("--store", help="cluster store URL: sqlite:///path.db or etcd://host:port "
                                    "(default: sqlite in the state directory)")
    ap.add_argument("--advertise", default="", help="address other hosts use to reach this "
                                                    "agent (default: the listen address)")
    ap.add_argument("--tls-dir", type=Path,
                    help="directory with this agent's certificate (agent-NAME.crt/.key, ca.crt)")
    ap.add_argument("--insecure", action="store_true",
                    help="serve plaintext without authentication (local testing only)")
    ap.add_argument("--idle-exit", type=float, default=0.0, metavar="S",
                    help="exit after S seconds without guests (on-demand agents)")
    ap.add_argument("--standby-vmms", type=int, default=1, metavar="N",
                    help="VMM processes to keep started ahead of need, so a new or "
                         "arriving guest gets one in milliseconds (default 1; 0: none)")
    ap.add_argument("--log-level", default="INFO")
    opts = ap.parse_args(argv)
    logging.basicConfig(level=opts.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if opts.tls_dir is None and not opts.insecure:
        ap.error("give --tls-dir (mutual TLS) or --insecure (plaintext, testing only)")
    from vmigrate.migrate import agent, store
    from vmigrate.migrate.errors import AgentError
    from vmigrate.vmm.machine import install_kick_handler
    from vmigrate.vmm.malloc_tuning import start_heap_trimmer, tune_malloc

    tune_malloc(arenas=1)
    start_heap_trimmer()
    install_kick_handler()
    cfg = agent.AgentConfig(
        name=opts.name, listen=opts.listen, state_dir=opts.state_dir.resolve(),
        store_url=opts.store or f"sqlite:///{opts.state_dir.resolve() / 'cluster.db'}",
        advertise=opts.advertise, tls_dir=opts.tls_dir, insecure=opts.insecure,
        idle_exit_s=opts.idle_exit, standby_vmms=max(0, opts.standby_vmms))
    try:
        agent.serve(cfg)
    except (store.StoreError, AgentError, OSError, RuntimeError) as e:
        print(f"vmigrated: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
