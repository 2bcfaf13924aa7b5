//! The boot side of Phase swarm boot: what to do with verified artifacts.
//!
//! - [`cmdline`]: the `phase.*` kernel parameters, split with the kernel's
//!   quoting rules; unknown `phase.*` keys are warnings.
//! - [`kexec`]: a pure planner, a [`kexec::Kexec`] trait with the real
//!   syscalls and a recording dry run, and [`kexec::load`], which tries
//!   `kexec_file_load` first and `kexec_load` (arm64: patched DTB plus an
//!   entry trampoline) only when the kernel lacks the file interface.
//! - [`dtb`]: a small flattened-device-tree editor for `/chosen`.
//! - [`cpio`]: a newc writer for initramfs images.
//!
//! Everything here is pure except the few functions named for their edge
//! ([`cmdline::read`], [`kexec::Preflight::read`], [`kexec::Syscalls`]).
//! This crate does no networking; `node/` wires it to the fetch.
//!
//! ```
//! use phase_boot::cmdline::PhaseConfig;
//! use phase_boot::kexec::{self, Arch, DryRun, LoadContext, Preflight};
//!
//! let (cfg, warnings) =
//!     PhaseConfig::parse("console=ttyS0 phase.provider=http://10.0.2.100 phase.chanel=x")?;
//! assert_eq!(cfg.channel, "stable");
//! assert_eq!(warnings.len(), 1); // phase.chanel: a typo warns, it does not stop the boot
//!
//! // Decide and load against a kernel that has no kexec_file_load (ENOSYS):
//! // the x86_64 fallback needs the firmware memory map; without one this is
//! // a clear error, not a guess.
//! let mut k = DryRun { file_load_errno: libc::ENOSYS, ..DryRun::default() };
//! let pre = Preflight { load_disabled: Some(false), lockdown: None, efi: false };
//! let ctx = LoadContext { arch: Arch::X86_64, preflight: &pre, arm64: None, x86_64: None };
//! let err = kexec::load(&mut k, &ctx, b"bzImage", None, "console=ttyS0").unwrap_err();
//! assert!(err.to_string().contains("ENOSYS"));
//! # Ok::<(), phase_boot::Error>(())
//! ```

pub mod cmdline;
pub mod cpio;
pub mod dtb;
pub mod kexec;

use std::path::PathBuf;

/// Everything that can go wrong on the boot side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A known `phase.*` parameter has a value we cannot use.
    #[error("kernel parameter {key}={value:?}: {reason}")]
    Cmdline {
        /// The parameter name as written.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `kernel.kexec_load_disabled=1`: both syscalls will fail with EPERM.
    #[error(
        "kexec is disabled by this kernel (kernel.kexec_load_disabled=1): both kexec_file_load and \
         kexec_load fail with EPERM, and the switch cannot be turned off until reboot; remove \
         whatever sets it (a sysctl.conf entry, or the initramfs), or boot the target directly \
         (PXE/firmware) instead of through kexec"
    )]
    KexecDisabled,
    /// Lockdown forbids the unsigned `kexec_load` fallback.
    #[error(
        "kernel lockdown is {mode:?}: kexec_load is refused and kexec_file_load failed ({first}); \
         sign the target kernel for this machine's keyring, or boot with lockdown=none"
    )]
    LockedDown {
        /// The lockdown mode.
        mode: String,
        /// Why `kexec_file_load` failed.
        first: Box<Error>,
    },
    /// x86_64: `kexec_load` (tried first) and then `kexec_file_load` both failed.
    #[error("kexec_load failed ({load}), and then kexec_file_load failed ({file_load})")]
    BothFailed {
        /// Why `kexec_load` failed.
        load: Box<Error>,
        /// Why `kexec_file_load` failed.
        file_load: Box<Error>,
    },
    /// A syscall failed; `call` shows it with its arguments.
    #[error("{call} = {}: {source}", kexec::errno_name(source.raw_os_error().unwrap_or(0)))]
    Syscall {
        /// The call and its arguments, u-root style.
        call: String,
        /// The errno.
        source: std::io::Error,
    },
    /// The kernel image is not what the path needs.
    #[error("kernel image: {reason}")]
    Image {
        /// What is wrong.
        reason: String,
    },
    /// A device tree blob is malformed or too big.
    #[error("device tree: {reason}")]
    Dtb {
        /// What is wrong.
        reason: String,
    },
    /// No System RAM range holds the planned segments.
    #[error("no System RAM range of {ranges} holds the {need} bytes kexec_load needs")]
    NoRoom {
        /// Bytes needed from a 2 MiB aligned base.
        need: u64,
        /// How many ranges were considered.
        ranges: usize,
    },
    /// The firmware memory map (`/sys/firmware/memmap`) is unreadable or unusable.
    #[error("memory map: {reason}")]
    MemoryMap {
        /// What is wrong.
        reason: String,
    },
    /// This combination cannot be booted by this code.
    #[error("kexec not possible: {reason}")]
    Unsupported {
        /// Why.
        reason: String,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// The errno of a failed syscall.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Syscall { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
