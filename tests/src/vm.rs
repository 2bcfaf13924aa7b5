//! QEMU helpers for the boot tests: locate kernels and tools, build a static
//! `plasmd` for the guest, make the boot initramfs and a tiny target
//! initramfs, and start a guest whose serial console is read line by line.
//! What the bridge harness needs as well lives in `simulations::vmnet`.

use std::path::{Path, PathBuf};

use crate::{Proc, plasmd, workspace_root};

use simulations::vmnet;
pub use simulations::vmnet::Arch;

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    vmnet::have(program)
}

/// Whether the QEMU for `arch` is installed; if not, [`crate::unavailable`]
/// says so (failing under CI).
pub fn require_qemu(arch: Arch) -> bool {
    crate::require(have(arch.qemu()), &format!("{} not on PATH", arch.qemu()))
}

/// The cargo target directory of the running test binary.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in target/<profile>/deps")
        .to_owned()
}

/// Builds `plasmd` statically (musl, `initramfs` profile) for `arch`, with
/// the cargo feature `test-knobs` when `knobs` (only a guest given a
/// `phase.test_*` knob needs it).
pub fn static_plasmd(arch: Arch, knobs: bool) -> PathBuf {
    let (w, t) = (workspace_root(), target_dir());
    if knobs {
        vmnet::static_plasmd_with_test_knobs(arch, &w, &t)
    } else {
        vmnet::static_plasmd(arch, &w, &t)
    }
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The guest kernel and its module tree for `arch` ([`vmnet::kernel`] with
/// this test binary's target directory).
pub fn kernel(arch: Arch) -> Option<(PathBuf, PathBuf)> {
    vmnet::kernel(arch, &target_dir())
}

/// The arm64 kernel with `CONFIG_KEXEC_FILE` built by
/// `scripts/vm-arm64-kexec-file-kernel.sh`, and its (module-free) tree.
pub fn arm64_kexec_file_kernel() -> Option<(PathBuf, PathBuf)> {
    let root = target_dir().join("vm-arm64-kexec-file");
    let k = root.join("boot/vmlinuz-kexec-file");
    let m = root.join("lib/modules/kexec-file");
    (k.is_file() && m.is_dir()).then_some((k, m))
}

/// A static busybox for `arch` ([`vmnet::busybox`]).
pub fn busybox(arch: Arch) -> Option<PathBuf> {
    vmnet::busybox(arch, &target_dir())
}

/// Runs `plasmd mkinitramfs` (the host binary) for the guest, whose
/// `plasmd` has test knobs when `knobs` ([`static_plasmd`]).
pub fn boot_initramfs(arch: Arch, out: &Path, modules: &Path, knobs: bool) -> u64 {
    let static_bin = static_plasmd(arch, knobs);
    let bb = busybox(arch).expect("static busybox for the guest");
    vmnet::boot_initramfs(&plasmd(), &static_bin, modules, &bb, out)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The target's initramfs: busybox and an `/init` script that prints
/// `SAW KEXEC=Y token=<token= from its own /proc/cmdline>` and powers off.
pub fn marker_initramfs(arch: Arch) -> Vec<u8> {
    let bb = busybox(arch).expect("static busybox");
    vmnet::marker_initramfs(&bb).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Starts a TCG guest with `kernel`, `initrd` and `append`, with user
/// networking restricted to one forwarded address: guest
/// `10.0.2.100:80` reaches host `127.0.0.1:seed_port` and nothing else.
/// The serial console is the process's stdout.
pub fn start(arch: Arch, kernel: &Path, initrd: &Path, append: &str, seed_port: u16) -> Proc {
    vmnet::start_user_net(arch, kernel, initrd, append, seed_port)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The port of a seed URL `http://127.0.0.1:PORT`.
pub fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("port in seed URL")
}
