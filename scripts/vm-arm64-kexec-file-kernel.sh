#!/usr/bin/env bash
# Builds a small arm64 kernel WITH CONFIG_KEXEC_FILE from Debian's linux-source
# (Debian's own arm64 kernels lack it), for the optional arm64 kexec_file_load
# boot test (`cargo test --release --test vm_kexec -- --ignored aarch64_kexec_file`):
#   TARGET_DIR/vm-arm64-kexec-file/{boot/vmlinuz-kexec-file, lib/modules/kexec-file/}
# Needs: linux-source-6.1 flex bison bc gcc-aarch64-linux-gnu (apt). Takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${CARGO_TARGET_DIR:-$PWD/target}/vm-arm64-kexec-file"
build="${KBUILD_DIR:-/var/tmp/phase-kexec-file-kernel}"
if [ -f "$out/boot/vmlinuz-kexec-file" ]; then echo "already built: $out"; exit 0; fi
tarball="$(ls /usr/src/linux-source-*.tar.xz | sort -V | tail -1)"
mkdir -p "$build"
if [ ! -f "$build/Makefile" ]; then
  tar -xf "$tarball" -C "$build" --strip-components=1
fi
cd "$build"
export ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-
make -s tinyconfig
on=(
  PRINTK TTY SERIAL_AMBA_PL011 SERIAL_AMBA_PL011_CONSOLE
  BLK_DEV_INITRD RD_GZIP DEVTMPFS PROC_FS PROC_SYSCTL SYSFS TMPFS SHMEM MEMFD_CREATE
  BINFMT_ELF BINFMT_SCRIPT MULTIUSER FUTEX EPOLL EVENTFD SIGNALFD TIMERFD POSIX_TIMERS
  FILE_LOCKING ADVISE_SYSCALLS
  KEXEC KEXEC_FILE
  NET INET PACKET UNIX
  PCI PCI_HOST_GENERIC VIRTIO_MENU VIRTIO VIRTIO_PCI NETDEVICES NET_CORE VIRTIO_NET
)
for o in "${on[@]}"; do scripts/config --enable "$o"; done
make -s olddefconfig
for o in KEXEC_FILE VIRTIO_NET SERIAL_AMBA_PL011_CONSOLE PCI_HOST_GENERIC FUTEX PACKET; do
  grep -q "^CONFIG_$o=y" .config || { echo "CONFIG_$o did not stick" >&2; exit 1; }
done
make -s -j"$(nproc)" Image
mkdir -p "$out/boot" "$out/lib/modules/kexec-file/kernel"
cp arch/arm64/boot/Image "$out/boot/vmlinuz-kexec-file"
# Everything is built in: tell mkinitramfs so it packs no modules.
printf 'kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/net/virtio_net.ko\n' \
  > "$out/lib/modules/kexec-file/modules.builtin"
ls -la "$out/boot/vmlinuz-kexec-file"
