//! PID 1 plumbing: mounts, kernel modules, DHCP.
//!
//! DHCP is busybox-static's `udhcpc` with a four-line script (see
//! `mkinitramfs.rs`): a DHCP client in Rust would also need raw sockets and
//! route/address ioctls, all to replace a well-tested 100 KB tool that the
//! initramfs carries anyway. The script writes `/run/phase-lease`, which we
//! read back.

use std::ffi::CString;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where mkinitramfs puts busybox and the udhcpc script.
pub(crate) const BUSYBOX: &str = "/bin/busybox";
pub(crate) const UDHCPC_SCRIPT: &str = "/etc/udhcpc.script";
const LEASE: &str = "/run/phase-lease";
/// How long the first Ethernet link may take to appear after its module loads.
const LINK_WAIT: Duration = Duration::from_secs(15);

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let (Ok(s), Ok(t), Ok(f)) = (
        CString::new(src),
        CString::new(target),
        CString::new(fstype),
    ) else {
        return;
    };
    // SAFETY: valid C strings; no data argument.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // EBUSY: already mounted. ENODEV for securityfs: no LSM, no lockdown file.
        let expected = e.raw_os_error() == Some(libc::EBUSY)
            || (fstype == "securityfs" && e.raw_os_error() == Some(libc::ENODEV));
        if !expected {
            println!("plasmd: warning: mount {fstype} on {target}: {e}");
        }
    }
}

/// Mounts proc, sysfs, devtmpfs and a tmpfs on /run.
pub(crate) fn mount_basics() {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("tmpfs", "/run", "tmpfs");
    // Lockdown state lives in securityfs; absent when the LSM is not built.
    mount("securityfs", "/sys/kernel/security", "securityfs");
}

/// Loads every `*.ko` in `dir` in name order (mkinitramfs numbers them in
/// dependency order). Already-loaded modules are fine. Returns the count.
pub(crate) fn load_modules(dir: &Path) -> anyhow::Result<usize> {
    let mut files: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "ko"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    files.sort();
    let mut n = 0;
    for f in files {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&f).with_context(|| format!("opening {}", f.display()))?;
        let params = c"";
        // SAFETY: fd is open; params is a valid C string.
        let r =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                bail!("finit_module({}): {e}", f.display());
            }
        }
        n += 1;
    }
    Ok(n)
}

/// The first Ethernet interface (ARPHRD_ETHER), waiting for it to appear.
fn first_ethernet() -> anyhow::Result<String> {
    let deadline = Instant::now() + LINK_WAIT;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "lo")
                    .filter(|n| {
                        std::fs::read_to_string(format!("/sys/class/net/{n}/type"))
                            .is_ok_and(|t| t.trim() == "1")
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        if let Some(n) = names.into_iter().next() {
            return Ok(n);
        }
        if Instant::now() > deadline {
            bail!(
                "no Ethernet interface appeared within {LINK_WAIT:?} (is the virtio_net module in the initramfs?)"
            );
        }
        // sysfs has no event to wait on without netlink; poll briefly.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An address from DHCP.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) iface: String,
    pub(crate) ip: String,
    pub(crate) router: String,
}

/// Brings up the first Ethernet link with udhcpc.
pub(crate) fn dhcp() -> anyhow::Result<Lease> {
    let iface = first_ethernet()?;
    let _ = std::fs::remove_file(LEASE);
    let out = Command::new(BUSYBOX)
        .args(["udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "2", "-i"])
        .arg(&iface)
        .args(["-s", UDHCPC_SCRIPT])
        .output()
        .with_context(|| format!("running {BUSYBOX} udhcpc (is busybox in the initramfs?)"))?;
    if !out.status.success() {
        bail!(
            "udhcpc on {iface} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let lease = std::fs::read_to_string(LEASE)
        .with_context(|| format!("udhcpc succeeded but wrote no {LEASE}"))?;
    let field = |k: &str| {
        lease
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or("")
            .to_owned()
    };
    Ok(Lease {
        iface,
        ip: field("ip="),
        router: field("router="),
    })
}
