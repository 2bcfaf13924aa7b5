//! The self-hosting lab for `tests/tests/vm_selfhost.rs`: a namespace with a
//! bridge, DHCP, the host's seed on the bridge and QEMU guests on taps. The
//! network code is the `vms` harness's own (`simulations::vmnet`), so both
//! run the same thing.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use simulations::vmnet;

use vmnet::{GuestSpec, Net, Seed};

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
    /// Builds the guest binaries and starts the lab with `taps` taps, or
    /// says why it cannot (no root, QEMU, dnsmasq or kernel) through
    /// [`crate::unavailable`] (a failure under CI) and returns `None`.
    pub fn start(taps: usize) -> Option<Lab> {
        let one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
        if !require(
            vmnet::is_root(),
            "needs root to create network namespaces and taps",
        ) {
            return None;
        }
        for p in ["qemu-system-x86_64", "dnsmasq", "ip"] {
            if !require(vmnet::have(p), &format!("{p} not on PATH")) {
                return None;
            }
        }
        let found = vmnet::kernel();
        if !require(
            found.is_some(),
            "no guest kernel at /boot/vmlinuz-*-cloud-amd64 with its /lib/modules tree \
             (apt install linux-image-cloud-amd64, or set PHASE_VM_KERNEL_X86_64 and \
             PHASE_VM_MODULES_X86_64)",
        ) {
            return None;
        }
        let (kernel, modules) = found?;
        let dir = tempfile::tempdir().expect("tempdir");
        let guest =
            vmnet::static_plasmd(&crate::workspace_root(), &target_dir()).expect("static plasmd");
        let initrd = dir.path().join("boot.cpio.gz");
        vmnet::boot_initramfs(&crate::plasmd(), &guest, &modules, &initrd).expect("boot initramfs");
        let tag = std::process::id().to_string();
        let token = format!("self{tag}");
        let art = dir.path().join("artifacts");
        vmnet::write_artifacts(&art, &kernel, &initrd, &token).expect("artifacts");
        let net = Net::create(&tag, taps).expect("namespace with bridge and taps");
        let dhcp = vmnet::start_dhcp(&net, dir.path()).expect("dnsmasq");
        let seed = vmnet::start_seed(&net, &crate::plasmd(), &art, &dir.path().join("state"))
            .expect("seed");
        Some(Lab {
            pubkey: seed.pubkey.clone(),
            url: seed.url.clone(),
            seed: Some(seed),
            token,
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
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: vmnet::guest_cmdline(&self.url, pubkey.unwrap_or(&self.pubkey), extra),
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
