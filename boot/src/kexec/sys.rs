//! The real kexec syscalls (`memfd_create`, `kexec_file_load`, `kexec_load`,
//! `reboot`): Linux only, so the planner and [`super::DryRun`] stay portable.

use super::{Arch, Kexec, KexecPlan};
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

fn memfd(name: &str, data: &[u8]) -> Result<std::fs::File, Error> {
    use std::io::Write;
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
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(data)
        .map_err(|e| Error::io("write memfd", name, e))?;
    Ok(f)
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
        kernel: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
    ) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        let kfd = memfd("kernel", kernel)?;
        let ifd = initrd.map(|i| memfd("initrd", i)).transpose()?;
        let c = std::ffi::CString::new(cmdline).map_err(|_| Error::Unsupported {
            reason: "command line contains a NUL byte".into(),
        })?;
        let len = c.as_bytes_with_nul().len();
        let flags = if ifd.is_some() {
            0
        } else {
            KEXEC_FILE_NO_INITRAMFS
        };
        let ifd_raw = ifd.as_ref().map_or(-1, |f| f.as_raw_fd());
        let nr = self.arch.syscall_numbers().1;
        // SAFETY: fds are open, the cmdline pointer/len describe a live C string.
        let r = unsafe {
            libc::syscall(
                nr as libc::c_long,
                kfd.as_raw_fd(),
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
                    kfd.as_raw_fd(),
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

    fn load(&mut self, plan: &KexecPlan) -> Result<(), Error> {
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
