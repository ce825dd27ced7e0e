#!/usr/bin/env bash
# Packages the release binary: scripts/package.sh OUTDIR writes into OUTDIR
#   cstokenfs_<version>_<arch>.deb                   (dpkg-deb from a staged tree)
#   cstokenfs-<version>-x86_64-linux-gnu.tar.gz      (binary, man pages, completions, unit,
#                                                     README, LICENSE)
#   SHA256SUMS                                       (both, for sha256sum -c)
# It builds with `cargo build --release --locked` unless CSTOKENFS_BIN names a binary already
# built from this tree (the test suite passes one, so it need not build a release). The
# binary must link only glibc (libc.so.6, ld-linux, libgcc_s.so.1) and need no symbol
# version newer than GLIBC_FLOOR: the README's promise (Debian 12, Ubuntu 22.04, RHEL 9).
# Needs: dpkg-deb, binutils (readelf, strip), gzip, tar, sha256sum. musl builds are not
# packaged (build them yourself, see the README).
set -euo pipefail

GLIBC_FLOOR=2.34

die() { echo "package.sh: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: scripts/package.sh OUTDIR"
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
for tool in dpkg-deb readelf strip gzip tar sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (apt-get install dpkg binutils gzip tar coreutils)"
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -1)
[ -n "$version" ] || die "no version in Cargo.toml"
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
[ "$arch" = amd64 ] || die "only amd64 (x86_64-linux-gnu) is packaged, not $arch"

if [ -n "${CSTOKENFS_BIN:-}" ]; then
  bin=$CSTOKENFS_BIN
  echo "package.sh: packaging $bin (CSTOKENFS_BIN), not building" >&2
else
  (cd "$root" && cargo build --release --locked)
  bin=$root/target/release/cstokenfs
fi
[ -x "$bin" ] || die "$bin is not an executable"

# What the binary needs of the system: only glibc's libraries, no symbol past the floor.
needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
for lib in $needed; do
  case "$lib" in
    libc.so.6|ld-linux-x86-64.so.2|libgcc_s.so.1) ;;
    *) die "$bin needs $lib: only glibc's libraries (libc.so.6, libgcc_s.so.1) are expected" ;;
  esac
done
glibc=$(readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
[ -n "$glibc" ] || die "$bin needs no GLIBC_ symbol version: not a glibc binary?"
if [ "$(printf '%s\n%s\n' "$glibc" "$GLIBC_FLOOR" | sort -V | tail -1)" != "$GLIBC_FLOOR" ]; then
  die "$bin needs GLIBC_$glibc, newer than the floor GLIBC_$GLIBC_FLOOR the README promises"
fi
echo "package.sh: $bin needs ${needed}and GLIBC_$glibc at most (floor $GLIBC_FLOOR)" >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/deb

# The tree as installed: /usr/bin, man pages (gzipped), completions where bash-completion,
# zsh and fish look for vendor files, the unit (disabled), the copyright.
install -d "$stage/usr/bin" "$stage/usr/share/man/man1" \
  "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
  "$stage/usr/share/fish/vendor_completions.d" "$stage/usr/lib/systemd/system" \
  "$stage/usr/share/doc/cstokenfs" "$stage/DEBIAN"
install -m 0755 "$bin" "$stage/usr/bin/cstokenfs"
strip --strip-unneeded "$stage/usr/bin/cstokenfs"
packaged=$stage/usr/bin/cstokenfs
# The name docker runs its credential helper by (the binary dispatches on it).
ln -s cstokenfs "$stage/usr/bin/docker-credential-cstokenfs"
"$packaged" --version >/dev/null || die "the binary does not run here"
"$packaged" man --dir "$work/man"
for page in "$work"/man/*.1; do
  gzip -9n <"$page" >"$stage/usr/share/man/man1/$(basename "$page").gz"
done
"$packaged" completions bash >"$stage/usr/share/bash-completion/completions/cstokenfs"
"$packaged" completions zsh >"$stage/usr/share/zsh/vendor-completions/_cstokenfs"
"$packaged" completions fish >"$stage/usr/share/fish/vendor_completions.d/cstokenfs.fish"
# The unit as shipped: the binary in /usr/bin, installed by the package, not enabled by it.
sed -e 's#/usr/local/bin/cstokenfs#/usr/bin/cstokenfs#g' \
  -e 's#^\# Install: cp cstokenfs.service /etc/systemd/system/ && systemctl enable --now cstokenfs#\# Installed by the cstokenfs package, disabled: systemctl enable --now cstokenfs (change the uid with systemctl edit cstokenfs)#' \
  "$root/scripts/cstokenfs.service" >"$stage/usr/lib/systemd/system/cstokenfs.service"
grep -q '^ExecStart=/usr/bin/cstokenfs ' "$stage/usr/lib/systemd/system/cstokenfs.service" \
  || die "the unit's ExecStart is not /usr/bin/cstokenfs"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: cstokenfs"
  echo
  echo "Files: *"
  echo "License: MIT"
  sed 's/^$/./; s/^/ /' "$root/LICENSE"
} >"$stage/usr/share/doc/cstokenfs/copyright"
chmod -R u=rwX,go=rX "$stage"
chmod 0755 "$stage/usr/bin/cstokenfs"

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: cstokenfs
Version: $version
Architecture: $arch
Maintainer: ${CSTOKENFS_MAINTAINER:-cstokenfs maintainers <cstokenfs@localhost>}
Installed-Size: $size
Depends: libc6 (>= $GLIBC_FLOOR), libgcc-s1, fuse3
Section: utils
Priority: optional
Description: Azure access tokens as files: a read-only FUSE filesystem
 cat /run/cstoken/management.azure.com prints a fresh access token from Azure
 Cloud Shell, IMDS, App Service, Azure Arc, the Azure CLI or Microsoft Entra:
 each token is fetched once, cached, refreshed before it expires and never
 served expired. Also: sink (the same files on a tmpfs, without FUSE), get (one
 token on standard output) and the Kubernetes CSI node plugin (csi). The
 systemd unit is installed disabled: systemctl enable --now cstokenfs.
EOF

deb=cstokenfs_${version}_${arch}.deb
tarball=cstokenfs-${version}-x86_64-linux-gnu.tar.gz
rm -f "$out/$deb" "$out/$tarball" "$out/SHA256SUMS"
dpkg-deb --root-owner-group --build "$stage" "$out/$deb" >/dev/null

# The tarball: the same files, laid out to copy under /usr/local (see the README).
top=cstokenfs-${version}-x86_64-linux-gnu
tree=$work/tar/$top
install -d "$tree/man/man1" "$tree/completions"
cp "$stage/usr/bin/cstokenfs" "$tree/cstokenfs"
ln -s cstokenfs "$tree/docker-credential-cstokenfs"
cp "$work"/man/*.1 "$tree/man/man1/"
cp "$stage/usr/share/bash-completion/completions/cstokenfs" "$tree/completions/cstokenfs.bash"
cp "$stage/usr/share/zsh/vendor-completions/_cstokenfs" "$tree/completions/_cstokenfs"
cp "$stage/usr/share/fish/vendor_completions.d/cstokenfs.fish" "$tree/completions/cstokenfs.fish"
cp "$root/scripts/cstokenfs.service" "$tree/cstokenfs.service"
cp "$root/README.md" "$root/LICENSE" "$tree/"
tar -C "$work/tar" --owner=0 --group=0 --numeric-owner --sort=name -czf "$out/$tarball" "$top"

(cd "$out" && sha256sum "$deb" "$tarball" >SHA256SUMS)
echo "package.sh: wrote $out/$deb, $out/$tarball and $out/SHA256SUMS" >&2
