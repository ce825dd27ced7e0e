#!/usr/bin/env bash
# Demo: builds cstokenfs, mounts it on the built-in emulator (loopback only) in a temporary
# directory, shows what the mount offers, then unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /dev/fuse ] || ! command -v fusermount3 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
  fi
fi
[ -e /dev/fuse ] || { echo "demo: /dev/fuse is missing (in Docker: --device /dev/fuse --cap-add SYS_ADMIN)" >&2; exit 1; }

echo "== building cstokenfs (release; a cold build takes a few minutes, cargo shows its progress)"
cargo build --release --locked
bin=$PWD/target/release/cstokenfs
work=$(mktemp -d)
mnt=$work/cstoken
mkdir -p "$mnt"
cleanup() {
  pkill -TERM -f "cstokenfs mount .*$mnt" 2>/dev/null || true
  for _ in $(seq 50); do mountpoint -q "$mnt" || break; sleep 0.1; done
  mountpoint -q "$mnt" && { umount -l "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"; }
  rm -rf "$work"
}
trap cleanup EXIT

show() { printf '\n$ %s\n' "$*"; eval "$@"; }

echo "== mounting cstokenfs on the built-in emulator at $mnt"
"$bin" mount --emulator --resource management.azure.com --metrics 127.0.0.1:0 --log-file "$work/cstokenfs.log" "$mnt"
show "ls -la $mnt"
show "cut -c1-24 $mnt/management.azure.com; echo '...  (the token, first characters)'"
show "wc -c < $mnt/vault.azure.net"
show "python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d[\"access_token\"]=d[\"access_token\"][:16]+\"...\"; print(json.dumps(d, indent=2))' $mnt/.json/management.azure.com"
show "cut -c1-40 $mnt/.header/management.azure.com"
show "ls $mnt"
show "cat $mnt/.status"
show "cat $mnt/newservice.azure.com || true"
# --metrics: its address (port 0 picked one) is in .status.
metrics=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"]["address"])' "$mnt/.status")
if command -v curl >/dev/null 2>&1; then
  show "curl -s http://$metrics/readyz"
  show "curl -s http://$metrics/metrics | grep -E '^cstokenfs_(token_expiry|upstream_requests|reads)'"
fi
echo
echo "== unmounting (SIGTERM to the daemon)"
pkill -TERM -f "cstokenfs mount .*$mnt"
for _ in $(seq 50); do mountpoint -q "$mnt" || break; sleep 0.1; done
mountpoint -q "$mnt" && echo "still mounted!" || echo "unmounted"
