//! The real kexec syscalls (`memfd_create`, `kexec_file_load`, `kexec_load`,
//! `reboot`): Linux only, so the planner and [`super::DryRun`] stay portable.

use super::{Arch, Kexec, KexecPlan, Payload};
use crate::Error;

/// The real syscalls.
#[derive(Debug)]
pub struct Syscalls {
    arch: Arch,
}

impl Syscalls {
    /// For the running architecture.
    pub fn new() -> Result<Syscalls, Error> {
        let arch = Arch::current().ok_or_else(|| Error::Unsupported {
            reason: format!("kexec on {} is not supported", std::env::consts::ARCH),
        })?;
        Ok(Syscalls { arch })
    }
}

/// An empty memfd named `name` (close-on-exec): write an artifact into it
/// and hand it to [`Kexec::file_load`] as a [`Payload::File`].
pub fn memfd(name: &str) -> Result<std::fs::File, Error> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(|_| Error::Unsupported {
        reason: "memfd name has a NUL".into(),
    })?;
    // SAFETY: cname is a valid C string; the returned fd is owned by the File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io(
            "memfd_create",
            name,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just returned by memfd_create and is not owned elsewhere.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// `data` in a new memfd.
fn memfd_with(name: &str, data: &[u8]) -> Result<std::fs::File, Error> {
    use std::io::Write;
    let mut f = memfd(name)?;
    f.write_all(data)
        .map_err(|e| Error::io("write memfd", name, e))?;
    Ok(f)
}

/// A file payload as it is, bytes copied into a new memfd.
enum Fd<'a> {
    Borrowed(&'a std::fs::File),
    Owned(std::fs::File),
}

impl Fd<'_> {
    fn of<'a>(name: &str, p: Payload<'a>) -> Result<Fd<'a>, Error> {
        Ok(match p {
            Payload::File { file, .. } => Fd::Borrowed(file),
            Payload::Bytes(b) => Fd::Owned(memfd_with(name, b)?),
        })
    }

    fn raw(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Fd::Borrowed(f) => f.as_raw_fd(),
            Fd::Owned(f) => f.as_raw_fd(),
        }
    }
}

const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

#[repr(C)]
struct RawSegment {
    buf: *const libc::c_void,
    bufsz: libc::size_t,
    mem: *const libc::c_void,
    memsz: libc::size_t,
}

impl Kexec for Syscalls {
    fn file_load(
        &mut self,
        kernel: Payload<'_>,
        initrd: Option<Payload<'_>>,
        cmdline: &str,
    ) -> Result<(), Error> {
        let kfd = Fd::of("kernel", kernel)?;
        let ifd = initrd.map(|i| Fd::of("initrd", i)).transpose()?;
        let c = std::ffi::CString::new(cmdline).map_err(|_| Error::Unsupported {
            reason: "command line contains a NUL byte".into(),
        })?;
        let len = c.as_bytes_with_nul().len();
        let flags = if ifd.is_some() {
            0
        } else {
            KEXEC_FILE_NO_INITRAMFS
        };
        let ifd_raw = ifd.as_ref().map_or(-1, Fd::raw);
        let nr = self.arch.syscall_numbers().1;
        // SAFETY: fds are open, the cmdline pointer/len describe a live C string.
        let r = unsafe {
            libc::syscall(
                nr as libc::c_long,
                kfd.raw(),
                ifd_raw,
                len as libc::c_ulong,
                c.as_ptr(),
                flags,
            )
        };
        if r != 0 {
            return Err(Error::Syscall {
                call: format!(
                    "SYS_kexec_file_load({}, {}, {}, {:?}, {:#x})",
                    kfd.raw(),
                    ifd_raw,
                    len,
                    cmdline,
                    flags
                ),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn load(&mut self, plan: &KexecPlan<'_>) -> Result<(), Error> {
        let raw: Vec<RawSegment> = plan
            .segments
            .iter()
            .map(|s| RawSegment {
                buf: s.buf.as_ptr().cast(),
                bufsz: s.buf.len(),
                mem: s.mem as usize as *const libc::c_void,
                memsz: s.memsz as usize,
            })
            .collect();
        let nr = self.arch.syscall_numbers().0;
        // SAFETY: raw points at plan.segments' live buffers for the call's duration.
        let r = unsafe {
            libc::syscall(
                nr as libc::c_long,
                plan.entry as libc::c_ulong,
                raw.len() as libc::c_ulong,
                raw.as_ptr(),
                0 as libc::c_ulong,
            )
        };
        if r != 0 {
            let segs: Vec<String> = plan
                .segments
                .iter()
                .map(|s| format!("{}@{:#x}+{:#x}", s.what, s.mem, s.memsz))
                .collect();
            return Err(Error::Syscall {
                call: format!(
                    "SYS_kexec_load({:#x}, {}, [{}], 0x0)",
                    plan.entry,
                    raw.len(),
                    segs.join(", ")
                ),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn exec(&mut self) -> Error {
        // SAFETY: plain syscalls; on success reboot does not return.
        unsafe {
            libc::sync();
            libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
        }
        Error::Syscall {
            call: "reboot(LINUX_REBOOT_CMD_KEXEC)".into(),
            source: std::io::Error::last_os_error(),
        }
    }
}
