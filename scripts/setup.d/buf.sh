#!/usr/bin/env bash
# buf (https://buf.build), for the breaking-change check over the .proto files
# (proto/check_breaking.py), from the npm registry into .tools/. Idempotent.
set -euo pipefail
root=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
version=1.75.0
bin="$root/.tools/node_modules/.bin/buf"
if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "$version" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "buf.sh: installing Debian package npm" >&2
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
mkdir -p "$root/.tools"
npm install --prefix "$root/.tools" --no-audit --no-fund --silent "@bufbuild/buf@$version"
"$bin" --version >/dev/null
