//! The self-hosting lab for `tests/tests/vm_selfhost*.rs`: a namespace with a
//! bridge, DHCP, the host's seed (default flags, no `--bind`) and QEMU guests
//! (x86_64 or aarch64) on taps. The
//! network code is the `vms` harness's own (`simulations::vmnet`), so both
//! run the same thing.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use simulations::vmnet;

use vmnet::{Arch, GuestSpec, Net, Seed};

use crate::{Proc, require};

/// Generous: TCG on a busy 2-core machine, two kernel boots.
pub const BOOT: Duration = Duration::from_secs(300);

/// One lab at a time: the guests of two tests at once would starve each other.
static ONE_LAB: Mutex<()> = Mutex::new(());

/// The bridge, DHCP and the seed; guests are started from it.
/// Fields drop in order: seed and DHCP are killed before the namespace goes.
pub struct Lab {
    /// The seed, until [`Lab::stop_seed`].
    pub seed: Option<Seed>,
    /// The seed's publisher key (hex).
    pub pubkey: String,
    /// The seed's URL.
    pub url: String,
    /// The token the target prints in its marker.
    pub token: String,
    /// The guests' architecture.
    pub arch: Arch,
    dhcp: Proc,
    kernel: PathBuf,
    initrd: PathBuf,
    /// The namespace (deleted on drop, after the processes in it).
    pub net: Net,
    _dir: tempfile::TempDir,
    _one: MutexGuard<'static, ()>,
}

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in target/<profile>/deps")
        .to_owned()
}

impl Lab {
    /// [`Lab::start_arch`] for x86_64 guests.
    pub fn start(taps: usize) -> Option<Lab> {
        Lab::start_arch(Arch::X86_64, taps)
    }

    /// Builds the guest binaries for `arch` and starts the lab with `taps`
    /// taps, or says why it cannot (no root, QEMU, dnsmasq, kernel or
    /// busybox) through [`crate::unavailable`] (a failure under CI) and
    /// returns `None`.
    pub fn start_arch(arch: Arch, taps: usize) -> Option<Lab> {
        let one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
        if !require(
            vmnet::is_root(),
            "needs root to create network namespaces and taps",
        ) {
            return None;
        }
        for p in [arch.qemu(), "dnsmasq", "ip"] {
            if !require(vmnet::have(p), &format!("{p} not on PATH")) {
                return None;
            }
        }
        let found = vmnet::kernel(arch, &target_dir());
        if !require(found.is_some(), arch.kernel_hint()) {
            return None;
        }
        let (kernel, modules) = found?;
        let busybox = vmnet::busybox(arch, &target_dir());
        if !require(
            busybox.is_some(),
            &format!(
                "no static busybox for {} (x86_64: apt install busybox-static; aarch64: \
                 scripts/vm-arm64-kernel.sh with the same CARGO_TARGET_DIR)",
                arch.name()
            ),
        ) {
            return None;
        }
        let busybox = busybox?;
        let dir = tempfile::tempdir().expect("tempdir");
        // With test knobs: `a_lying_peer_is_banned...` needs `phase.test_liar`.
        let guest =
            vmnet::static_plasmd_with_test_knobs(arch, &crate::workspace_root(), &target_dir())
                .unwrap_or_else(|e| panic!("{e:#}"));
        let initrd = dir.path().join("boot.cpio.gz");
        vmnet::boot_initramfs(&crate::plasmd(), &guest, &modules, &busybox, &initrd)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let tag = std::process::id().to_string();
        let token = format!("self{tag}");
        let art = dir.path().join("artifacts");
        vmnet::write_artifacts(&art, arch, &kernel, &initrd, &token).expect("artifacts");
        let net = Net::create(&tag, taps).expect("namespace with bridge and taps");
        let dhcp = vmnet::start_dhcp(&net, dir.path()).expect("dnsmasq");
        let seed = vmnet::start_seed(&net, &crate::plasmd(), &art, &dir.path().join("state"))
            .expect("seed");
        Some(Lab {
            pubkey: seed.pubkey.clone(),
            url: seed.url.clone(),
            seed: Some(seed),
            token,
            arch,
            dhcp,
            kernel,
            initrd,
            net,
            _dir: dir,
            _one: one,
        })
    }

    /// Starts guest `name` on tap `tap` with `extra` on the first stage's
    /// cmdline (and `pubkey` pinned, default the seed's).
    pub fn guest(&self, name: &str, tap: usize, pubkey: Option<&str>, extra: &str) -> Proc {
        let spec = GuestSpec {
            name: name.to_owned(),
            arch: self.arch,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: vmnet::guest_cmdline(
                self.arch,
                &self.url,
                pubkey.unwrap_or(&self.pubkey),
                extra,
            ),
            tap,
            accel: "tcg".into(),
            echo: std::env::var_os("PHASE_VM_ECHO").is_some(),
        };
        vmnet::start_guest(&self.net, &spec).expect("start guest")
    }

    /// Stops the seed (HTTP and its swarm node).
    pub fn stop_seed(&mut self) {
        if let Some(mut s) = self.seed.take() {
            s.proc.kill();
        }
    }

    /// The DHCP server's output (for failure messages).
    pub fn dhcp_log(&self) -> String {
        self.dhcp.output()
    }
}

/// Waits for the next console line (after the one the previous call
/// returned) containing `needle`, failing loudly on a kernel panic or
/// timeout; prints and returns the line with its time.
pub fn phase(guest: &Proc, needle: &str) -> (Duration, String) {
    let line = guest
        .try_wait_for(BOOT, |l| l.contains(needle) || l.contains("Kernel panic"))
        .unwrap_or_else(|| {
            panic!(
                "{}: no {needle:?} within {BOOT:?} (after the phases already seen):\n{}",
                guest.name(),
                guest.output()
            )
        });
    assert!(
        !line.contains("Kernel panic"),
        "{}: kernel panic:\n{}",
        guest.name(),
        guest.output()
    );
    eprintln!("[{} {:>6.1}s] {line}", guest.name(), line.at.as_secs_f64());
    (line.at, line.text)
}

/// The value of `key=` in a console line.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

/// Asserts that at least 90 % of the bytes `guest` fetched came from the
/// seed's swarm node (`kind=seed`), not its HTTP rescue: the seed runs with
/// default flags, so this holds only if it advertises an address the guest
/// can reach. Returns that share.
pub fn assert_mostly_seed_swarm(guest: &Proc) -> f64 {
    let src = vmnet::sources(guest);
    let total: u64 = src.iter().map(|s| s.2).sum();
    let swarm: u64 = src.iter().filter(|s| s.1 == "seed").map(|s| s.2).sum();
    assert!(
        total > 0,
        "{}: no source lines:\n{}",
        guest.name(),
        guest.output()
    );
    let share = swarm as f64 / total as f64;
    assert!(
        share >= 0.9,
        "{}: only {swarm} of {total} bytes ({:.1} %) came from the seed's swarm node; sources: \
         {src:?}\n{}",
        guest.name(),
        share * 100.0,
        guest.output()
    );
    share
}
