#!/usr/bin/env bash
# The whole test suite: installs what the tests need, checks format and lints, runs every
# test (unit, property and real FUSE mounts against the built-in emulator on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v pgrep >/dev/null 2>&1 || need+=(procps)
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v mount.fuse3 >/dev/null 2>&1 || need+=(fuse3)
# ring (rustls' crypto provider) compiles C and assembly: a C compiler is needed.
command -v cc >/dev/null 2>&1 || need+=(gcc)
# The system trust store the Entra client verifies against.
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
# The package suite (tests/it/package.rs): dpkg-deb, readelf and strip, man for the pages.
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
command -v readelf >/dev/null 2>&1 || need+=(binutils)
command -v man >/dev/null 2>&1 || need+=(man-db)
# systemd-analyze verifies the unit (conventions, package). Debian ships it only in the
# systemd package (about 25 MB with its libraries); installed without its recommends,
# nothing starts it.
lean=()
command -v systemd-analyze >/dev/null 2>&1 || lean+=(systemd)
if [ ${#need[@]} -gt 0 ] || [ ${#lean[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need[*]} ${lean[*]}"
    apt-get update -qq >/dev/null
    if [ ${#need[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    if [ ${#lean[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null
    fi
  else
    echo "WARNING: missing ${need[*]} ${lean[*]} and cannot install them (not root or no apt-get)" >&2
  fi
fi
if [ ! -e /dev/fuse ]; then
  echo "!!!!! WARNING: /dev/fuse is missing: the FUSE tests will say so (and fail when CI=true) !!!!!" >&2
fi

# No two files of src import each other, directly or in a loop.
python3 scripts/import-cycles.py
# Format and lints where the toolchain has them (rustup's default profile does).
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --check; else echo "WARNING: rustfmt missing: format not checked" >&2; fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --all-targets --locked -- -D warnings
else
  echo "WARNING: clippy missing: lints not checked" >&2
fi
# Python packages from PyPI the suites run, each set in a venv under ~/.cache (not in the
# clone: a fresh clone reuses it), one per set of pinned requirements, made only when that
# set is new. venv REQUIREMENTS NAME PACKAGE CHECK: prints the venv's path.
venv() {
  local req=$1 name=$2 package=$3 check=$4
  local dir="${XDG_CACHE_HOME:-$HOME/.cache}/cstokenfs/$name-$(sha256sum "$req" | cut -c1-16)"
  if ! cmp -s "$req" "$dir/.cstokenfs-requirements" 2>/dev/null || [ ! -x "$dir/bin/$check" ]; then
    echo "making $dir with $(grep -c '==' "$req") pinned packages ($package $(sed -n "s/^$package==//p" "$req"))" >&2
    rm -rf "$dir"
    if python3 -m venv "$dir" && "$dir/bin/pip" install -q --disable-pip-version-check -r "$req" >&2; then
      cp "$req" "$dir/.cstokenfs-requirements"
    else
      echo "!!!!! WARNING: cannot make $dir: the tests that need $package will say so (and fail when CI=true) !!!!!" >&2
    fi
  fi
  echo "$dir"
}
# azure-identity for the --serve-endpoint SDK tests (tests/it/endpoint_sdk.rs).
CSTOKENFS_PYVENV=$(venv tests/endpoint_sdk/requirements.txt pyvenv azure-identity python)
# kubernetes-validate for the manifests under deploy/kubernetes/ (tests/it/manifests.rs).
CSTOKENFS_K8S_VENV=$(venv tests/manifests/requirements.txt k8svenv kubernetes-validate kubernetes-validate)
# prometheus_client's parsers for the --metrics scrapes (tests/it/metrics.rs).
CSTOKENFS_PROM_VENV=$(venv tests/metrics/requirements.txt promvenv prometheus_client python)
# promtool from Debian's prometheus package, unpacked (never installed: no service starts)
# under ~/.cache; the scrapes are checked with `promtool check metrics` when it can be had.
promtool_dir="${XDG_CACHE_HOME:-$HOME/.cache}/cstokenfs/promtool"
if [ ! -x "$promtool_dir/usr/bin/promtool" ] && command -v apt-get >/dev/null 2>&1; then
  rm -rf "$promtool_dir.tmp" && mkdir -p "$promtool_dir.tmp"
  if (cd "$promtool_dir.tmp" && { apt-get download prometheus >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; }) &&
     dpkg-deb -x "$promtool_dir.tmp"/prometheus_*.deb "$promtool_dir.tmp/root"; then
    rm -rf "$promtool_dir" && mv "$promtool_dir.tmp/root" "$promtool_dir"
  else
    echo "note: Debian's prometheus package cannot be had: promtool checks are skipped" >&2
  fi
  rm -rf "$promtool_dir.tmp"
fi
if [ -x "$promtool_dir/usr/bin/promtool" ]; then export CSTOKENFS_PROMTOOL="$promtool_dir/usr/bin/promtool"; fi
# docker's credential-store client for the credential helper (tests/it/acr.rs).
CSTOKENFS_DOCKER_VENV=$(venv tests/acr/requirements.txt dockervenv docker python)
export CSTOKENFS_PYVENV CSTOKENFS_K8S_VENV CSTOKENFS_PROM_VENV CSTOKENFS_DOCKER_VENV

cargo test --all-targets --locked -- --test-threads=8

# The filesystem core's suite needs no FUSE: prove it with /dev (and so /dev/fuse) hidden.
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1; then
  it=$(cargo test --locked --test it --no-run 2>&1 | grep -o 'target/debug/deps/it-[0-9a-f]*' | tail -1)
  if [ -n "$it" ]; then
    echo "tests/it/fs.rs (the core without FUSE) with /dev/fuse hidden:"
    unshare -m sh -c "mount -t tmpfs none /dev && exec $it --test-threads=2 fs::" | grep "test result"
  fi
fi
