//! Many QEMU guests on one bridge: the network and processes of the `vms`
//! harness and of `tests/tests/vm_selfhost*.rs` (through `phase_tests::selfhost`),
//! and the guest pieces (kernel, static `plasmd`, boot initramfs) that
//! `tests/tests/vm_kexec.rs` uses too (through `phase_tests::vm`).
//!
//! One network namespace (named with the caller's tag, e.g. the PID) holds a
//! Linux bridge `br0` with [`BRIDGE_IP`], one tap device per guest, dnsmasq
//! answering DHCP on the bridge only, the host's `plasmd serve` with its
//! default addresses (0.0.0.0, as a user runs it), and the QEMU guests (TCG,
//! x86_64 or aarch64), each on its tap. Nothing is
//! routed out of the namespace. Every child is a [`Proc`]: it leads its own
//! process group and is killed by that group on drop; the namespace is
//! deleted on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::proc::{Options, Proc};

/// The bridge's address (the seed and the DHCP server).
pub const BRIDGE_IP: &str = "10.79.0.1";
/// The seed's HTTP port.
pub const SEED_PORT: u16 = 8080;

/// Guest architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `qemu-system-x86_64 -M q35`.
    X86_64,
    /// `qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on`.
    Aarch64,
}

impl Arch {
    /// The `phase.arch` name (and `stable/NAME` on the seed).
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The architecture named `name` (`x86_64`, `aarch64`; `arm64` too).
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "x86_64" | "amd64" => Some(Arch::X86_64),
            "aarch64" | "arm64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// The QEMU system emulator.
    pub fn qemu(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// QEMU's machine arguments. `pauth-impdef` because TCG's default
    /// pointer-authentication algorithm is slow to emulate.
    pub fn machine(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => &["-M", "q35"],
            Arch::Aarch64 => &["-M", "virt", "-cpu", "max,pauth-impdef=on"],
        }
    }

    /// The Rust target of the guest's static `plasmd`.
    pub fn triple(self) -> &'static str {
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

    /// What to install or run when [`kernel`] finds nothing.
    pub fn kernel_hint(self) -> &'static str {
        match self {
            Arch::X86_64 => {
                "no guest kernel at /boot/vmlinuz-*-cloud-amd64 with its /lib/modules tree \
                 (apt install linux-image-cloud-amd64, or set PHASE_VM_KERNEL_X86_64 and \
                 PHASE_VM_MODULES_X86_64)"
            }
            Arch::Aarch64 => {
                "no arm64 guest kernel under TARGET/vm-arm64-kernel (run scripts/vm-arm64-kernel.sh \
                 with the same CARGO_TARGET_DIR, or set PHASE_VM_KERNEL_AARCH64 and \
                 PHASE_VM_MODULES_AARCH64)"
            }
        }
    }
}

pub use crate::netns::sh;

/// The namespace with the bridge and the taps. Dropping it deletes it.
#[derive(Debug)]
pub struct Net {
    /// Namespace name.
    pub ns: String,
    /// Tap device names, one per guest.
    pub taps: Vec<String>,
}

impl Net {
    /// Creates namespace `phasevm-TAG` with `br0` and `taps` tap devices.
    pub fn create(tag: &str, taps: usize) -> anyhow::Result<Net> {
        let ns = format!("phasevm-{tag}");
        sh(&["ip", "netns", "add", &ns])?;
        let net = Net {
            ns: ns.clone(),
            taps: (0..taps).map(|i| format!("tap{i}")).collect(),
        };
        let ip = |args: &[&str]| -> anyhow::Result<String> {
            let mut v = vec!["ip", "-n", ns.as_str()];
            v.extend_from_slice(args);
            sh(&v)
        };
        ip(&["link", "set", "lo", "up"])?;
        // No snooping: without a querier it could starve mDNS between guests.
        ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", "br0"])?;
        ip(&["link", "set", "br0", "up"])?;
        for t in &net.taps {
            ip(&["tuntap", "add", "dev", t, "mode", "tap"])?;
            ip(&["link", "set", t, "master", "br0"])?;
            ip(&["link", "set", t, "up"])?;
        }
        ip(&["route", "add", "224.0.0.0/4", "dev", "br0"])?;
        Ok(net)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// dnsmasq answering DHCP on `br0` only (no DNS), leases under `dir`.
pub fn start_dhcp(net: &Net, dir: &Path) -> anyhow::Result<Proc> {
    let mut c = net.command("dnsmasq");
    c.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--interface=br0",
        "--bind-interfaces",
        "--except-interface=lo",
        "--dhcp-range=10.79.0.10,10.79.0.250,255.255.255.0,1h",
        "--no-resolv",
        "--no-hosts",
        "--port=0",
        "--user=root",
        "--log-facility=-",
        "--log-dhcp",
    ])
    .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
    .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()));
    Proc::spawn("dnsmasq", c)
}

/// The host's seed: `plasmd serve` inside the namespace, default addresses.
pub struct Seed {
    /// The process.
    pub proc: Proc,
    /// `http://BRIDGE_IP:SEED_PORT`.
    pub url: String,
    /// The publisher key (hex).
    pub pubkey: String,
}

/// Starts `plasmd serve -a artifacts -p SEED_PORT` in the namespace with no
/// `--bind` and no `--p2p-port`, as a user runs it: guests must reach its
/// swarm through the addresses it advertises.
pub fn start_seed(
    net: &Net,
    plasmd: &Path,
    artifacts: &Path,
    state: &Path,
) -> anyhow::Result<Seed> {
    let mut c = net.command(plasmd);
    c.arg("serve")
        .arg("-a")
        .arg(artifacts)
        .args(["-p", &SEED_PORT.to_string(), "--state"])
        .arg(state);
    let proc = Proc::spawn("seed", c)?;
    let pk = proc.expect(Duration::from_secs(120), "public key", |l| {
        l.contains("public key ")
    })?;
    let pubkey = pk
        .split("public key ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("no key in the seed's banner")?
        .to_owned();
    proc.expect(Duration::from_secs(120), "serving http://", |l| {
        l.contains("serving http://")
    })?;
    Ok(Seed {
        proc,
        url: format!("http://{BRIDGE_IP}:{SEED_PORT}"),
        pubkey,
    })
}

/// One guest to start.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// A name for messages and tables.
    pub name: String,
    /// Guest architecture.
    pub arch: Arch,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Boot initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub append: String,
    /// Index of the tap (and of the MAC address).
    pub tap: usize,
    /// QEMU accelerator (`tcg`; `kvm` only where it was shown to run).
    pub accel: String,
    /// Echo console lines on stderr.
    pub echo: bool,
}

/// Starts a guest on tap `spec.tap` in the namespace; its serial
/// console is the child's stdout.
pub fn start_guest(net: &Net, spec: &GuestSpec) -> anyhow::Result<Proc> {
    let tap = net
        .taps
        .get(spec.tap)
        .with_context(|| format!("no tap {} (made {})", spec.tap, net.taps.len()))?;
    let mut c = net.command(spec.arch.qemu());
    c.args(["-accel", &spec.accel])
        .args(spec.arch.machine())
        .args(["-smp", "1", "-m", "1024"])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&spec.kernel)
        .arg("-initrd")
        .arg(&spec.initrd)
        .args(["-append", &spec.append])
        .arg("-netdev")
        .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,mac=52:54:00:79:00:{:02x},romfile=",
            spec.tap + 16
        ));
    Proc::spawn_with(&spec.name, c, &Options::default().with_echo(spec.echo))
}

/// Starts a TCG guest with `kernel`, `initrd` and `append`, with user
/// networking restricted to one forwarded address: guest `10.0.2.100:80`
/// reaches host `127.0.0.1:seed_port` and nothing else. The serial console
/// is the child's stdout. `vm_kexec` and `bootspeed` boot with exactly these
/// flags.
pub fn start_user_net(
    arch: Arch,
    kernel: &Path,
    initrd: &Path,
    append: &str,
    seed_port: u16,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(arch.qemu());
    cmd.args(["-accel", "tcg"]).args(arch.machine());
    cmd.args(["-smp", "1", "-m", "1024"])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
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
    Proc::spawn(&format!("{} guest", arch.qemu()), cmd)
}

/// A target initramfs (uncompressed cpio): `busybox` and an `/init` that
/// prints `SAW KEXEC=Y token=<token= from its own /proc/cmdline>` and
/// powers off.
pub fn marker_initramfs(busybox: &Path) -> anyhow::Result<Vec<u8>> {
    let bb = std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let init = "#!/bin/busybox sh\n\
        /bin/busybox mount -t proc proc /proc\n\
        t=$(/bin/busybox sed -n 's/.*token=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
        echo \"SAW KEXEC=Y token=$t\"\n\
        /bin/busybox poweroff -f\n";
    let mut w = phase_boot::cpio::Writer::new(Vec::new());
    for d in ["bin", "dev", "proc"] {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, &bb)?;
    w.file("init", 0o755, init.as_bytes())?;
    Ok(w.finish()?)
}

/// The guest kernel and its module tree for `arch`: `$PHASE_VM_KERNEL_<ARCH>`
/// and `$PHASE_VM_MODULES_<ARCH>`, else the newest installed Debian cloud
/// kernel (x86_64) or the arm64 package that `scripts/vm-arm64-kernel.sh`
/// unpacked under `target_dir/vm-arm64-kernel` (aarch64).
pub fn kernel(arch: Arch, target_dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let up = arch.name().to_uppercase();
    if let (Some(k), Some(m)) = (
        std::env::var_os(format!("PHASE_VM_KERNEL_{up}")),
        std::env::var_os(format!("PHASE_VM_MODULES_{up}")),
    ) {
        return Some((k.into(), m.into()));
    }
    match arch {
        Arch::X86_64 => find_kernel(
            Path::new("/boot"),
            Path::new("/lib/modules"),
            "-cloud-amd64",
        ),
        Arch::Aarch64 => {
            let root = target_dir.join("vm-arm64-kernel");
            find_kernel(&root.join("boot"), &root.join("lib/modules"), "-arm64")
        }
    }
}

/// A static busybox for the guest: the host's for x86_64, the unpacked arm64
/// package's (`scripts/vm-arm64-kernel.sh`) for aarch64.
pub fn busybox(arch: Arch, target_dir: &Path) -> Option<PathBuf> {
    let p = match arch {
        Arch::X86_64 => PathBuf::from("/bin/busybox"),
        Arch::Aarch64 => target_dir.join("vm-arm64-kernel/bin/busybox"),
    };
    p.is_file().then_some(p)
}

/// The newest `BOOT/vmlinuz-*SUFFIX` whose module tree `MODULES/VERSION` exists.
pub fn find_kernel(boot: &Path, modules: &Path, suffix: &str) -> Option<(PathBuf, PathBuf)> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(boot)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with(suffix))
        })
        .collect();
    found.sort();
    let k = found.pop()?;
    let ver = k
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")?
        .to_owned();
    let m = modules.join(ver);
    m.is_dir().then_some((k, m))
}

/// Builds the static (musl, `initramfs` profile) `plasmd` for `arch` in
/// `target_dir`, without test knobs (as a user's initramfs has it), or takes
/// `$PLASMD_STATIC` (x86_64) or `$PLASMD_STATIC_AARCH64` when set. aarch64
/// uses Debian's aarch64-linux-gnu-gcc as C compiler and linker (ring and
/// mimalloc have C).
pub fn static_plasmd(arch: Arch, workspace: &Path, target_dir: &Path) -> anyhow::Result<PathBuf> {
    build_static_plasmd(arch, workspace, target_dir, false)
}

/// [`static_plasmd`] with plasmd's cargo feature `test-knobs`, for a guest
/// whose test passes a `phase.test_*` knob (`$PLASMD_STATIC_TEST_KNOBS`,
/// `$PLASMD_STATIC_AARCH64_TEST_KNOBS` when set).
pub fn static_plasmd_with_test_knobs(
    arch: Arch,
    workspace: &Path,
    target_dir: &Path,
) -> anyhow::Result<PathBuf> {
    build_static_plasmd(arch, workspace, target_dir, true)
}

/// Both builds write `TRIPLE/initramfs/plasmd`: each is copied out to a name
/// of its own under this lock, so a guest never gets the other build.
static STATIC_BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn build_static_plasmd(
    arch: Arch,
    workspace: &Path,
    target_dir: &Path,
    knobs: bool,
) -> anyhow::Result<PathBuf> {
    let given = match (arch, knobs) {
        (Arch::X86_64, false) => "PLASMD_STATIC",
        (Arch::Aarch64, false) => "PLASMD_STATIC_AARCH64",
        (Arch::X86_64, true) => "PLASMD_STATIC_TEST_KNOBS",
        (Arch::Aarch64, true) => "PLASMD_STATIC_AARCH64_TEST_KNOBS",
    };
    if let Some(p) = std::env::var_os(given) {
        return Ok(p.into());
    }
    let _one = STATIC_BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let triple = arch.triple();
    let mut c = Command::new(cargo);
    c.current_dir(workspace)
        .args([
            "build",
            "--locked",
            "-p",
            "plasmd",
            "--profile",
            "initramfs",
        ])
        .args(["--target", triple])
        .env("CARGO_TARGET_DIR", target_dir);
    if knobs {
        c.args(["--features", "test-knobs"]);
    }
    match arch {
        Arch::X86_64 => {
            let cc = if have("musl-gcc") { "musl-gcc" } else { "gcc" };
            c.env("CC_x86_64_unknown_linux_musl", cc);
        }
        Arch::Aarch64 => {
            c.env("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc")
                .env(
                    "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
                    "aarch64-linux-gnu-gcc",
                );
        }
    }
    let status = c
        .status()
        .with_context(|| format!("running cargo build for the static {triple} plasmd"))?;
    if !status.success() {
        bail!(
            "the static {triple} plasmd build failed ({status}); aarch64 needs \
             `rustup target add aarch64-unknown-linux-musl` and gcc-aarch64-linux-gnu, \
             or set ${given}"
        );
    }
    let dir = target_dir.join(triple).join("initramfs");
    let built = dir.join("plasmd");
    let out = dir.join(if knobs {
        "plasmd-test-knobs"
    } else {
        "plasmd-no-knobs"
    });
    // Copied, then renamed over: a guest initramfs being written from the
    // previous copy keeps reading whole bytes.
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::copy(&built, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &out))
        .with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
    Ok(out)
}

/// `plasmd mkinitramfs` (host binary `plasmd`) with the static `guest` binary,
/// the kernel's `modules` and a static `busybox` of the guest's architecture
/// (its udhcpc), written to `out`.
pub fn boot_initramfs(
    plasmd: &Path,
    guest: &Path,
    modules: &Path,
    busybox: &Path,
    out: &Path,
) -> anyhow::Result<u64> {
    let o = Command::new(plasmd)
        .arg("mkinitramfs")
        .arg("--out")
        .arg(out)
        .arg("--kernel-modules")
        .arg(modules)
        .arg("--plasmd")
        .arg(guest)
        .arg("--udhcpc")
        .arg(busybox)
        .output()
        .context("running plasmd mkinitramfs")?;
    if !o.status.success() {
        bail!(
            "plasmd mkinitramfs failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(std::fs::metadata(out)?.len())
}

/// Writes `dir/stable/ARCH/{kernel,initramfs,cmdline}` for the seed: the
/// guest kernel and the boot initramfs itself as the target, so the target's
/// init is `plasmd`, which finds the carried store and serves it.
pub fn write_artifacts(
    dir: &Path,
    arch: Arch,
    kernel: &Path,
    initramfs: &Path,
    token: &str,
) -> anyhow::Result<()> {
    let a = dir.join("stable").join(arch.name());
    std::fs::create_dir_all(&a)?;
    std::fs::copy(kernel, a.join("kernel")).context("copying the kernel")?;
    std::fs::copy(initramfs, a.join("initramfs")).context("copying the initramfs")?;
    std::fs::write(
        a.join("cmdline"),
        format!(
            "console={} loglevel=4 panic=-1 token={token}\n",
            arch.console()
        ),
    )?;
    Ok(())
}

/// The first-stage cmdline for an `arch` guest of `seed_url` pinning `pubkey`.
pub fn guest_cmdline(arch: Arch, seed_url: &str, pubkey: &str, extra: &str) -> String {
    format!(
        "console={} loglevel=4 panic=-1 phase.provider={seed_url} phase.pubkey={pubkey} \
         phase.arch={} {extra}",
        arch.console(),
        arch.name()
    )
    .trim_end()
    .to_owned()
}

/// What one guest's console says about its boot.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Guest name.
    pub name: String,
    /// From QEMU start to `plasmd: phase fetched`.
    pub fetched: Option<Duration>,
    /// From QEMU start to the target's `SAW KEXEC=Y`.
    pub marker: Option<Duration>,
    /// Bytes from the seed (its swarm node and its HTTP fallback).
    pub seed_bytes: u64,
    /// Of those, bytes from the seed's swarm node (`kind=seed`).
    pub seed_swarm_bytes: u64,
    /// Of those, bytes through the seed's HTTP rescue (`kind=http`).
    pub http_bytes: u64,
    /// The first stage's `phase kexec path=` (`kexec_file_load`, `kexec_load`).
    pub kexec_path: Option<String>,
    /// Bytes from other peers.
    pub peer_bytes: u64,
    /// Peers banned for bad chunks.
    pub banned: Vec<String>,
    /// The target's libp2p peer id, once it serves.
    pub serving_peer: Option<String>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Reads a [`Row`] from a guest's console lines.
pub fn row(guest: &Proc) -> Row {
    let mut r = Row {
        name: guest.name().to_owned(),
        ..Row::default()
    };
    for line in guest.lines() {
        let (t, l) = (line.at, line.text);
        if l.contains("plasmd: phase fetched ") && r.fetched.is_none() {
            r.fetched = Some(t);
            r.seed_bytes = field(&l, "seed_bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            r.peer_bytes = field(&l, "peer_bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        } else if l.contains("SAW KEXEC=Y") && r.marker.is_none() {
            r.marker = Some(t);
        } else if l.contains("plasmd: phase banned ") {
            r.banned.extend(field(&l, "peer").map(str::to_owned));
        } else if l.contains("plasmd: phase serving root=") {
            r.serving_peer = field(&l, "peer").map(str::to_owned);
        } else if l.contains("plasmd: phase kexec path=") && r.kexec_path.is_none() {
            r.kexec_path = field(&l, "path").map(str::to_owned);
        }
    }
    for (_, kind, bytes) in sources(guest) {
        match kind.as_str() {
            "seed" => r.seed_swarm_bytes += bytes,
            "http" => r.http_bytes += bytes,
            _ => {}
        }
    }
    r
}

/// Bytes a guest received per source peer id, from its `phase source` lines.
pub fn sources(guest: &Proc) -> Vec<(String, String, u64)> {
    guest
        .lines()
        .into_iter()
        .filter(|l| l.contains("plasmd: phase source "))
        .filter_map(|l| {
            Some((
                field(&l, "peer")?.to_owned(),
                field(&l, "kind")?.to_owned(),
                field(&l, "bytes")?.parse().ok()?,
            ))
        })
        .collect()
}

/// Whether this process runs as root (namespaces and taps need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}
