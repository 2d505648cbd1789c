#!/usr/bin/env bash
# The etcd backend of the cluster store (migrate/store_etcd.py) and its tests:
#  - the etcd server binary comes from Debian's etcd-server package (listed in
#    scripts/apt-packages.txt, installed by scripts/setup.sh before this runs);
#  - the client library etcd3gw (OpenStack's client for etcd's v3 JSON gateway)
#    goes into the project's .venv.
# Idempotent. $1 is the repository root.
set -euo pipefail
root=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
py="$root/.venv/bin/python"

if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
  echo "etcd.sh: installing Debian package etcd-server" >&2
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi

if ! "$py" -c 'import etcd3gw' 2>/dev/null; then
  echo "etcd.sh: installing etcd3gw into .venv" >&2
  "$py" -m pip install -q 'etcd3gw>=2.7,<3'
fi
