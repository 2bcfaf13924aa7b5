//! QEMU helpers for the boot tests: locate kernels and tools, build a static
//! `plasmd` for the guest, make the boot initramfs and a tiny target
//! initramfs, and start a guest whose serial console is read line by line.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Proc, plasmd, workspace_root};

/// Guest architectures the boot tests cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `qemu-system-x86_64 -accel tcg`.
    X86_64,
    /// `qemu-system-aarch64 -M virt -cpu max`.
    Aarch64,
}

impl Arch {
    /// The `phase.arch` name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
    fn qemu(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }
    fn triple(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }
    /// The serial console device name in the guest.
    pub fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    simulations::vmnet::have(program)
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

/// Builds `plasmd` statically (musl, `initramfs` profile) for `arch`.
pub fn static_plasmd(arch: Arch) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = target_dir();
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "--locked",
            "-p",
            "plasmd",
            "--profile",
            "initramfs",
            "--target",
        ])
        .arg(arch.triple())
        .env("CARGO_TARGET_DIR", &target);
    match arch {
        Arch::X86_64 => {
            let cc = if have("musl-gcc") { "musl-gcc" } else { "gcc" };
            cmd.env("CC_x86_64_unknown_linux_musl", cc);
        }
        Arch::Aarch64 => {
            cmd.env("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc")
                .env(
                    "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
                    "aarch64-linux-gnu-gcc",
                );
        }
    }
    let status = cmd.status().expect("run cargo build (static plasmd)");
    assert!(
        status.success(),
        "static plasmd build for {} failed",
        arch.name()
    );
    target.join(arch.triple()).join("initramfs").join("plasmd")
}

/// The guest kernel and its module tree for `arch`, from `$PHASE_VM_KERNEL_<ARCH>` and
/// `$PHASE_VM_MODULES_<ARCH>`, else the installed Debian cloud kernel (x86_64) or
/// the arm64 package unpacked by `scripts/vm-arm64-kernel.sh` (aarch64).
pub fn kernel(arch: Arch) -> Option<(PathBuf, PathBuf)> {
    let up = arch.name().to_uppercase();
    if let (Some(k), Some(m)) = (
        std::env::var_os(format!("PHASE_VM_KERNEL_{up}")),
        std::env::var_os(format!("PHASE_VM_MODULES_{up}")),
    ) {
        return Some((k.into(), m.into()));
    }
    let (boot, modules) = match arch {
        Arch::X86_64 => (PathBuf::from("/boot"), PathBuf::from("/lib/modules")),
        Arch::Aarch64 => {
            let root = target_dir().join("vm-arm64-kernel");
            (root.join("boot"), root.join("lib/modules"))
        }
    };
    let suffix = match arch {
        Arch::X86_64 => "-cloud-amd64",
        Arch::Aarch64 => "-arm64",
    };
    simulations::vmnet::find_kernel(&boot, &modules, suffix)
}

/// The arm64 kernel with `CONFIG_KEXEC_FILE` built by
/// `scripts/vm-arm64-kexec-file-kernel.sh`, and its (module-free) tree.
pub fn arm64_kexec_file_kernel() -> Option<(PathBuf, PathBuf)> {
    let root = target_dir().join("vm-arm64-kexec-file");
    let k = root.join("boot/vmlinuz-kexec-file");
    let m = root.join("lib/modules/kexec-file");
    (k.is_file() && m.is_dir()).then_some((k, m))
}

/// A static busybox for `arch`: the host's for x86_64, the unpacked arm64
/// package's for aarch64.
pub fn busybox(arch: Arch) -> Option<PathBuf> {
    let p = match arch {
        Arch::X86_64 => PathBuf::from("/bin/busybox"),
        Arch::Aarch64 => target_dir().join("vm-arm64-kernel/bin/busybox"),
    };
    p.is_file().then_some(p)
}

/// Runs `plasmd mkinitramfs` (the host binary) for the guest.
pub fn boot_initramfs(arch: Arch, out: &Path, modules: &Path) -> u64 {
    let static_bin = static_plasmd(arch);
    let bb = busybox(arch).expect("static busybox for the guest");
    let o = Command::new(plasmd())
        .arg("mkinitramfs")
        .arg("--out")
        .arg(out)
        .arg("--kernel-modules")
        .arg(modules)
        .arg("--plasmd")
        .arg(&static_bin)
        .arg("--udhcpc")
        .arg(&bb)
        .output()
        .expect("run plasmd mkinitramfs");
    assert!(
        o.status.success(),
        "mkinitramfs failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&o.stdout).trim());
    std::fs::metadata(out).expect("initramfs written").len()
}

/// The target's initramfs: busybox and an `/init` script that prints
/// `SAW KEXEC=Y token=<token= from its own /proc/cmdline>` and powers off.
pub fn marker_initramfs(arch: Arch) -> Vec<u8> {
    let bb = std::fs::read(busybox(arch).expect("static busybox")).expect("read busybox");
    let init = "#!/bin/busybox sh\n\
        /bin/busybox mount -t proc proc /proc\n\
        t=$(/bin/busybox sed -n 's/.*token=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
        echo \"SAW KEXEC=Y token=$t\"\n\
        /bin/busybox poweroff -f\n";
    let mut w = phase_boot::cpio::Writer::new(Vec::new());
    for d in ["bin", "dev", "proc"] {
        w.dir(d, 0o755).expect("cpio");
    }
    w.char_dev("dev/console", 0o600, 5, 1).expect("cpio");
    w.file("bin/busybox", 0o755, &bb).expect("cpio");
    w.file("init", 0o755, init.as_bytes()).expect("cpio");
    w.finish().expect("cpio")
}

/// Starts a TCG guest with `kernel`, `initrd` and `append`, with user
/// networking restricted to one forwarded address: guest
/// `10.0.2.100:80` reaches host `127.0.0.1:seed_port` and nothing else.
/// The serial console is the process's stdout.
pub fn start(arch: Arch, kernel: &Path, initrd: &Path, append: &str, seed_port: u16) -> Proc {
    let mut cmd = Command::new(arch.qemu());
    match arch {
        Arch::X86_64 => {
            cmd.args(["-accel", "tcg", "-M", "q35"]);
        }
        Arch::Aarch64 => {
            cmd.args(["-accel", "tcg", "-M", "virt", "-cpu", "max,pauth-impdef=on"]);
        }
    }
    cmd.args([
        "-smp",
        "1",
        "-m",
        "1024",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
    ])
    .args(["-serial", "stdio", "-monitor", "none"])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", append])
    .arg("-netdev")
    .arg(format!(
        "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 {seed_port}"
    ))
    .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
    Proc::spawn(&format!("{} guest", arch.qemu()), cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The port of a seed URL `http://127.0.0.1:PORT`.
pub fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("port in seed URL")
}
