#!/usr/bin/env bash
# Set up everything vmigrate needs on a fresh Debian machine, idempotently:
# Debian packages, the project's virtual environment (.venv) and the project
# itself installed into it in editable mode. Safe to run again at any time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. Debian packages (only those missing).
wanted=$(sed -e 's/#.*//' -e '/^\s*$/d' scripts/apt-packages.txt | awk '{print $1}')
missing=()
for pkg in $wanted; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The virtual environment and the project.
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.vmigrate-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing vmigrate and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

# 3. Optional components (guest kernel image, etcd, ...) have their own scripts.
for extra in scripts/setup.d/*.sh; do
  [ -e "$extra" ] || continue
  say "running $extra"
  bash "$extra" "$root"
done

# 4. KVM must be usable: say so clearly now rather than in the middle of a test.
if [ ! -e /dev/kvm ]; then
  echo "warning: /dev/kvm does not exist: load the kvm module (modprobe kvm_intel or kvm_amd)" >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "warning: no read/write access to /dev/kvm: add yourself to the 'kvm' group" >&2
fi
say "setup done: activate with 'source .venv/bin/activate' or call .venv/bin/vmigrate"
