#!/usr/bin/env bash
# Run every check CI runs: lint, generated code up to date, and the test suite
# (real KVM guests, real gRPC, real etcd, network namespaces). Needs root.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh >/dev/null
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
python proto/generate.py --check
python proto/check_breaking.py
python vmm/testguest/build.py --check
exec pytest "$@"
