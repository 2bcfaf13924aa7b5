#!/usr/bin/env bash
# Unpacks Debian's arm64 kernel (and a static arm64 busybox) for the arm64
# QEMU boot test, without installing anything for arm64:
#   TARGET_DIR/vm-arm64-kernel/{boot/vmlinuz-*-arm64, lib/modules/*, bin/busybox}
# and, for bootspeed's arm64 baseline, Debian's arm64 kexec-tools with the
# shared libraries it may load, in a sysroot of their own:
#   TARGET_DIR/vm-arm64-kernel/kexec-sysroot/{sbin/kexec, lib/..., usr/lib/...}
# The test finds it there (TARGET_DIR defaults to $CARGO_TARGET_DIR or ./target).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${CARGO_TARGET_DIR:-$PWD/target}/vm-arm64-kernel"
if ls "$out"/boot/vmlinuz-*-arm64 >/dev/null 2>&1 && [ -x "$out/bin/busybox" ] &&
  [ -x "$out/kexec-sysroot/sbin/kexec" ]; then
  echo "already unpacked in $out"; exit 0
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  apt-get update -qq
fi
# The arm64 build of the same kernel version the amd64 cloud kernel has, else the newest.
ver="$(apt-cache depends linux-image-arm64:arm64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
ver="${ver%:arm64}"
[ -n "$ver" ] || { echo "no linux-image-*-arm64 package found" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download "$ver:arm64" busybox-static:arm64 >/dev/null)
mkdir -p "$out"
for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$out"; done
# kexec-tools and every library package in its dependency closure (its
# Xen support pulls in libxen*); bootspeed copies only what readelf says
# the binary needs.
mkdir "$tmp/kexec"
libs="$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances --no-pre-depends kexec-tools:arm64 2>/dev/null |
  grep -E '^(lib[^ ]*|zlib1g):arm64$' | sort -u)"
# shellcheck disable=SC2086
(cd "$tmp/kexec" && apt-get download kexec-tools:arm64 $libs >/dev/null)
mkdir -p "$out/kexec-sysroot"
for d in "$tmp"/kexec/*.deb; do dpkg-deb -x "$d" "$out/kexec-sysroot"; done
ls "$out"/boot/vmlinuz-* "$out/bin/busybox" "$out/kexec-sysroot/sbin/kexec"
