#!/usr/bin/env bash
# The whole test suite: installs what the tests need, checks format and lints, runs every
# test (unit, property and real FUSE mounts against the built-in emulator on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v pgrep >/dev/null 2>&1 || need+=(procps)
command -v mount.fuse3 >/dev/null 2>&1 || need+=(fuse3)
# ring (rustls' crypto provider) compiles C and assembly: a C compiler is needed.
command -v cc >/dev/null 2>&1 || need+=(gcc)
# The system trust store the Entra client verifies against.
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "WARNING: missing ${need[*]} and cannot install them (not root or no apt-get)" >&2
  fi
fi
if [ ! -e /dev/fuse ]; then
  echo "!!!!! WARNING: /dev/fuse is missing: the FUSE tests will say so (and fail when CI=true) !!!!!" >&2
fi

# Format and lints where the toolchain has them (rustup's default profile does).
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --check; else echo "WARNING: rustfmt missing: format not checked" >&2; fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --all-targets --locked -- -D warnings
else
  echo "WARNING: clippy missing: lints not checked" >&2
fi
cargo test --all-targets --locked -- --test-threads=8
