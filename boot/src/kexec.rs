//! kexec: decide, plan, load, execute.
//!
//! - [`Preflight`] holds what the kernel says about kexec
//!   (`/proc/sys/kernel/kexec_load_disabled`, `/sys/kernel/security/lockdown`);
//!   [`Preflight::read`] is the only place that reads them.
//! - [`plan_arm64`] is pure: from an `Image`, an initrd, the running DTB, a
//!   command line, the memory map and some entropy it builds the segments of
//!   a `kexec_load` (kernel, initrd, patched DTB, entry trampoline).
//! - [`Kexec`] is the syscall boundary: [`Syscalls`] is the real one,
//!   [`DryRun`] records calls and answers with scripted errors. Its inputs
//!   are [`Payload`]s: bytes, or a file (a [`memfd`] the caller wrote the
//!   artifact into) whose descriptor `kexec_file_load` takes without a copy.
//! - [`load`] / [`load_payloads`] tie them: `kexec_file_load` first,
//!   `kexec_load` only when the kernel lacks or refuses the file interface
//!   for a format reason (ENOSYS, EINVAL, ENOEXEC, ENOTSUP), never on a
//!   policy refusal (EPERM, EKEYREJECTED, ENOKEY).

use std::io::Read;
use std::path::Path;

use crate::Error;
use crate::dtb::{self, ChosenPatch};

// The syscalls exist only on Linux; everything else here is pure and builds
// (and is tested) on any host, e.g. a Mac that seeds.
#[cfg(target_os = "linux")]
mod sys;
#[cfg(target_os = "linux")]
pub use sys::{Syscalls, memfd};
mod x86_64;
pub use x86_64::{
    BzHeader, E820_MAX, E820_RAM, E820Entry, MEMMAP_MAX, X86Inputs, bzimage_header, e820_type,
    parse_memmap_entry, plan_x86_64, read_memmap, usable_ram, x86_64_trampoline,
};

/// Page size used to align segments.
pub const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
/// The largest kernel image we decompress.
pub const MAX_IMAGE: u64 = 256 << 20;

/// Target CPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Arch {
    /// x86_64: bzImage through `kexec_file_load`.
    X86_64,
    /// arm64: `Image` through `kexec_file_load`, or `kexec_load` with a DTB.
    Aarch64,
}

impl Arch {
    /// The architecture this binary was built for.
    pub fn current() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// `(kexec_load, kexec_file_load)` syscall numbers.
    pub fn syscall_numbers(self) -> (i64, i64) {
        match self {
            Arch::X86_64 => (246, 320),
            Arch::Aarch64 => (104, 294),
        }
    }
}

/// What the running kernel says about kexec, read before loading.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Preflight {
    /// `kernel.kexec_load_disabled`; `None` if the file is absent (no CONFIG_KEXEC_CORE sysctl).
    pub load_disabled: Option<bool>,
    /// The active lockdown mode (`none`, `integrity`, `confidentiality`), if the LSM is present.
    pub lockdown: Option<String>,
    /// Whether this kernel was booted by EFI firmware (`/sys/firmware/efi` exists). Our x86_64
    /// `kexec_load` path passes no EFI tables on, so an EFI-booted x86_64 kernel prefers
    /// `kexec_file_load`, which does.
    pub efi: bool,
}

impl Preflight {
    /// Reads the two files and looks for `/sys/firmware/efi`.
    pub fn read() -> Preflight {
        Preflight {
            efi: Path::new("/sys/firmware/efi").exists(),
            ..Self::read_from(
                Path::new("/proc/sys/kernel/kexec_load_disabled"),
                Path::new("/sys/kernel/security/lockdown"),
            )
        }
    }

    /// Reads the two files from explicit paths (`efi` false).
    pub fn read_from(disabled: &Path, lockdown: &Path) -> Preflight {
        let load_disabled = std::fs::read_to_string(disabled)
            .ok()
            .map(|s| s.trim() != "0");
        let lockdown = std::fs::read_to_string(lockdown)
            .ok()
            .and_then(|s| parse_lockdown(&s));
        Preflight {
            load_disabled,
            lockdown,
            efi: false,
        }
    }

    /// Refuses early when kexec cannot work at all.
    pub fn check(&self) -> Result<(), Error> {
        if self.load_disabled == Some(true) {
            return Err(Error::KexecDisabled);
        }
        Ok(())
    }

    /// Whether lockdown forbids the unsigned `kexec_load` path.
    pub fn locked_down(&self) -> bool {
        matches!(
            self.lockdown.as_deref(),
            Some("integrity" | "confidentiality")
        )
    }
}

/// The active mode in `[brackets]` of `/sys/kernel/security/lockdown`.
pub fn parse_lockdown(s: &str) -> Option<String> {
    let start = s.find('[')? + 1;
    let end = start + s[start..].find(']')?;
    Some(s[start..end].to_owned())
}

/// One `kexec_load` segment: bytes and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// What it is (for logs and tests).
    pub what: &'static str,
    /// The bytes (`bufsz` = len).
    pub buf: Vec<u8>,
    /// Physical destination, page aligned.
    pub mem: u64,
    /// Destination size, page aligned, >= `buf.len()`.
    pub memsz: u64,
}

/// Everything `kexec_load` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KexecPlan {
    /// Physical entry point.
    pub entry: u64,
    /// Segments, non-overlapping.
    pub segments: Vec<Segment>,
}

/// A physical RAM range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The top-level `System RAM` ranges of `/proc/iomem` (must be read as root:
/// others see zeros).
pub fn parse_iomem(text: &str) -> Vec<Range> {
    text.lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let (range, name) = l.split_once(" : ")?;
            if name.trim() != "System RAM" {
                return None;
            }
            let (a, b) = range.trim().split_once('-')?;
            let start = u64::from_str_radix(a, 16).ok()?;
            let last = u64::from_str_radix(b, 16).ok()?;
            // `end` is exclusive: RAM ending at the top of the address space
            // loses its last byte rather than wrapping to 0.
            (last > start).then_some(Range {
                start,
                end: last.saturating_add(1),
            })
        })
        .collect()
}

/// `x` rounded up to a multiple of `a`, or `None` past `u64::MAX`.
fn checked_align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_next_multiple_of(a)
}

/// Decompresses a gzip'd kernel (`Image.gz`); passes anything else through.
pub fn maybe_gunzip(kernel: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, Error> {
    if kernel.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(kernel)
            .take(MAX_IMAGE + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::Image {
                reason: format!("gzip'd kernel does not decompress: {e}"),
            })?;
        if out.len() as u64 > MAX_IMAGE {
            return Err(Error::Image {
                reason: format!("decompressed kernel exceeds {MAX_IMAGE} bytes"),
            });
        }
        return Ok(out.into());
    }
    Ok(kernel.into())
}

/// The fields of an arm64 `Image` header we need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arm64Header {
    /// Offset from a 2 MiB aligned base.
    pub text_offset: u64,
    /// Bytes the kernel occupies once running (including BSS).
    pub image_size: u64,
}

/// Parses the arm64 Image header (Documentation/arch/arm64/booting.rst).
pub fn arm64_header(image: &[u8]) -> Result<Arm64Header, Error> {
    let bad = |reason: String| Error::Image { reason };
    if image.len() < 64 || image[56..60] != *b"ARM\x64" {
        return Err(bad(
            "not an arm64 Image (no ARM\\x64 magic at offset 56); pass the raw or gzip'd Image"
                .into(),
        ));
    }
    let le = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&image[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let (text_offset, image_size) = (le(8), le(16));
    // Kernels before 3.17 leave image_size 0: assume the historical layout.
    let (text_offset, image_size) = if image_size == 0 {
        let size = checked_align_up(image.len() as u64, MIB2)
            .and_then(|n| n.checked_add(MIB2))
            .ok_or_else(|| bad(format!("Image of {} bytes is too large", image.len())))?;
        (0x80000, size)
    } else {
        (text_offset, image_size)
    };
    if text_offset % PAGE != 0 {
        return Err(bad(format!(
            "Image header text_offset {text_offset:#x} is not page aligned"
        )));
    }
    if image_size < image.len() as u64 {
        return Err(bad(format!(
            "Image header says {image_size} bytes but the file has {}",
            image.len()
        )));
    }
    Ok(Arm64Header {
        text_offset,
        image_size,
    })
}

/// The arm64 entry trampoline: `x0` = DTB address, `x1..x3` = 0, jump to
/// the kernel. The kernel's own kexec code enters it with the MMU off.
pub fn arm64_trampoline(kernel: u64, dtb: u64) -> Vec<u8> {
    let insns: [u32; 6] = [
        0x5800_00c4, // ldr x4, .+24  (kernel)
        0x5800_00e0, // ldr x0, .+28  (dtb)
        0xaa1f_03e1, // mov x1, xzr
        0xaa1f_03e2, // mov x2, xzr
        0xaa1f_03e3, // mov x3, xzr
        0xd61f_0080, // br  x4
    ];
    let mut out: Vec<u8> = insns.iter().flat_map(|i| i.to_le_bytes()).collect();
    out.extend_from_slice(&kernel.to_le_bytes());
    out.extend_from_slice(&dtb.to_le_bytes());
    out
}

/// Inputs of [`plan_arm64`] besides the artifacts.
#[derive(Debug, Clone)]
pub struct Arm64Inputs<'a> {
    /// The running kernel's DTB (`/sys/firmware/fdt`).
    pub dtb: &'a [u8],
    /// System RAM ranges.
    pub memory: &'a [Range],
    /// Fresh randomness: 8 bytes for `kaslr-seed`, the rest for `rng-seed`.
    pub entropy: &'a [u8],
}

/// Plans an arm64 `kexec_load`: kernel at the lowest 2 MiB aligned RAM base
/// plus `text_offset`, then initrd, DTB and trampoline, each 2 MiB aligned so
/// no segment shares a block mapping with another.
pub fn plan_arm64(
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    inputs: &Arm64Inputs<'_>,
) -> Result<KexecPlan, Error> {
    let image = maybe_gunzip(kernel)?;
    let hdr = arm64_header(&image)?;
    let kaslr_seed = inputs
        .entropy
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    let rng_seed = inputs
        .entropy
        .get(8..)
        .filter(|r| !r.is_empty())
        .map(<[u8]>::to_vec);

    // A conservative DTB reservation: the patch adds well under 1 MiB.
    let dtb_room = dtb::MAX_DTB as u64;
    let initrd_len = initrd.map_or(0, |i| i.len() as u64);
    // text_offset and image_size come from the file: every step is checked,
    // and a layout past the top of the address space fits no RAM range.
    let need = |base: u64| -> Option<(u64, u64, u64, u64, u64)> {
        let kernel_at = base.checked_add(hdr.text_offset)?;
        let initrd_at = checked_align_up(kernel_at.checked_add(hdr.image_size)?, MIB2)?;
        let dtb_at = checked_align_up(initrd_at.checked_add(initrd_len)?, MIB2)?;
        let tramp_at = checked_align_up(dtb_at.checked_add(dtb_room)?, MIB2)?;
        let end = tramp_at.checked_add(PAGE)?;
        Some((kernel_at, initrd_at, dtb_at, tramp_at, end))
    };
    let (kernel_at, initrd_at, dtb_at, tramp_at) = inputs
        .memory
        .iter()
        .find_map(|r| {
            let base = checked_align_up(r.start, MIB2)?;
            let (k, i, d, t, end) = need(base)?;
            (end <= r.end).then_some((k, i, d, t))
        })
        .ok_or_else(|| match need(0) {
            Some(n) => Error::NoRoom {
                need: n.4,
                ranges: inputs.memory.len(),
            },
            None => Error::Image {
                reason: format!(
                    "Image header text_offset {:#x} + image_size {:#x} overflows the \
                     64-bit address space",
                    hdr.text_offset, hdr.image_size
                ),
            },
        })?;

    let initrd_range = initrd.map(|i| (initrd_at, initrd_at + i.len() as u64));
    let dtb = dtb::patch_chosen(
        inputs.dtb,
        &ChosenPatch {
            bootargs: cmdline,
            initrd: initrd_range,
            kaslr_seed,
            rng_seed,
        },
    )?;
    let seg = |what, buf: Vec<u8>, mem: u64, memsz: u64| -> Result<Segment, Error> {
        let len = buf.len() as u64;
        Ok(Segment {
            what,
            memsz: checked_align_up(memsz.max(len), PAGE).ok_or_else(|| Error::Image {
                reason: format!(
                    "{what} of {:#x} bytes overflows when rounded to a page",
                    memsz.max(len)
                ),
            })?,
            buf,
            mem,
        })
    };
    let mut segments = vec![seg(
        "kernel",
        image.into_owned(),
        kernel_at,
        hdr.image_size,
    )?];
    if let Some(i) = initrd {
        segments.push(seg("initrd", i.to_vec(), initrd_at, i.len() as u64)?);
    }
    segments.push(seg("dtb", dtb, dtb_at, 0)?);
    segments.push(seg(
        "trampoline",
        arm64_trampoline(kernel_at, dtb_at),
        tramp_at,
        PAGE,
    )?);
    Ok(KexecPlan {
        entry: tramp_at,
        segments,
    })
}

/// A kexec input: bytes in memory, or a file already holding them (a memfd
/// from [`memfd`] that the caller wrote the artifact into).
///
/// `kexec_file_load` takes a [`Payload::File`]'s descriptor as it is, so the
/// bytes are never copied again; [`Payload::Bytes`] are copied into a memfd
/// first. The `kexec_load` planners need the bytes: a file is mapped
/// ([`Payload::map`]), not read.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Bytes in memory.
    Bytes(&'a [u8]),
    /// A file holding exactly `len` bytes from offset 0.
    File {
        /// The file (its descriptor goes to `kexec_file_load`).
        file: &'a std::fs::File,
        /// Its length.
        len: u64,
    },
}

impl<'a> Payload<'a> {
    /// `file` as a payload of its current length.
    pub fn file(file: &'a std::fs::File) -> Result<Payload<'a>, Error> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("fstat", "kexec payload", e))?
            .len();
        Ok(Payload::File { file, len })
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its bytes: borrowed, or the file mapped read-only (no copy).
    pub fn map(&self) -> Result<Mapped<'a>, Error> {
        match *self {
            Payload::Bytes(b) => Ok(Mapped::Borrowed(b)),
            Payload::File { file, len } => Mapped::file(file, len),
        }
    }
}

/// The bytes of a [`Payload`], mapped or borrowed.
#[derive(Debug)]
pub enum Mapped<'a> {
    /// Borrowed from memory.
    Borrowed(&'a [u8]),
    /// A read-only private mapping of a file, unmapped on drop.
    #[cfg(unix)]
    Map {
        /// Start of the mapping.
        ptr: std::ptr::NonNull<u8>,
        /// Its length (non-zero).
        len: usize,
    },
    /// Read into memory (hosts without `mmap`).
    #[cfg(not(unix))]
    Owned(Vec<u8>),
}

impl Mapped<'_> {
    #[cfg(unix)]
    fn file(file: &std::fs::File, len: u64) -> Result<Mapped<'static>, Error> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len).map_err(|_| Error::Image {
            reason: format!("a {len}-byte payload does not fit in the address space"),
        })?;
        if len == 0 {
            return Ok(Mapped::Borrowed(&[]));
        }
        // SAFETY: a fresh read-only private mapping of an open descriptor;
        // the kernel picks the address. Our payload files are memfds this
        // process wrote and nothing writes once they are handed to kexec.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(
                "mmap",
                "kexec payload",
                std::io::Error::last_os_error(),
            ));
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Image {
            reason: "mmap returned a null mapping".into(),
        })?;
        Ok(Mapped::Map { ptr, len })
    }

    #[cfg(not(unix))]
    fn file(mut file: &std::fs::File, len: u64) -> Result<Mapped<'static>, Error> {
        let mut v = Vec::new();
        file.take(len)
            .read_to_end(&mut v)
            .map_err(|e| Error::io("read", "kexec payload", e))?;
        Ok(Mapped::Owned(v))
    }
}

impl std::ops::Deref for Mapped<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Mapped::Borrowed(b) => b,
            // SAFETY: ptr/len describe our live read-only mapping.
            #[cfg(unix)]
            Mapped::Map { ptr, len } => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) },
            #[cfg(not(unix))]
            Mapped::Owned(v) => v,
        }
    }
}

impl Drop for Mapped<'_> {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Mapped::Map { ptr, len } = self {
            // SAFETY: unmaps exactly the mapping made in `Mapped::file`.
            unsafe {
                libc::munmap(ptr.as_ptr().cast(), *len);
            }
        }
    }
}

/// The kernel interface, so the decision logic runs without a kernel.
pub trait Kexec {
    /// `kexec_file_load(kernel_fd, initrd_fd, cmdline, flags)`.
    fn file_load(
        &mut self,
        kernel: Payload<'_>,
        initrd: Option<Payload<'_>>,
        cmdline: &str,
    ) -> Result<(), Error>;
    /// `kexec_load(entry, segments, KEXEC_ARCH_DEFAULT)`.
    fn load(&mut self, plan: &KexecPlan) -> Result<(), Error>;
    /// `reboot(LINUX_REBOOT_CMD_KEXEC)`: returns only on failure.
    fn exec(&mut self) -> Error;
}

/// Which syscall loaded the image, and why that one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// `kexec_file_load` or `kexec_load`.
    pub path: &'static str,
    /// Why (for the console).
    pub reason: String,
}

/// What [`load`] needs besides the artifacts.
#[derive(Debug, Clone)]
pub struct LoadContext<'a> {
    /// Target architecture.
    pub arch: Arch,
    /// What the kernel said.
    pub preflight: &'a Preflight,
    /// For the arm64 `kexec_load` fallback; read lazily by the caller.
    pub arm64: Option<Arm64Inputs<'a>>,
    /// For the x86_64 `kexec_load` fallback (the firmware memory map).
    pub x86_64: Option<X86Inputs<'a>>,
}

fn falls_back(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOSYS | libc::EINVAL | libc::ENOEXEC | libc::EOPNOTSUPP
    )
}

/// Loads the target from bytes in memory: [`load_payloads`] with
/// [`Payload::Bytes`].
pub fn load(
    k: &mut dyn Kexec,
    ctx: &LoadContext<'_>,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<Loaded, Error> {
    load_payloads(
        k,
        ctx,
        Payload::Bytes(kernel),
        initrd.map(Payload::Bytes),
        cmdline,
    )
}

/// Whether x86_64 tries `kexec_load` before `kexec_file_load`: on a
/// BIOS-booted kernel without lockdown, when the firmware memory map is at
/// hand. `kexec_load` with our trampoline skips the in-kernel digest of every
/// segment at load and the purgatory's re-hash of them at exec (about 2 s
/// for a 14 MB kernel and an 18 MB initrd under QEMU TCG; the chunks were
/// verified by blake3 on the way in). EFI-booted kernels and locked-down ones
/// keep `kexec_file_load` first: it passes the EFI tables on, and it is the
/// only path lockdown allows.
fn x86_64_load_first(ctx: &LoadContext<'_>) -> Option<String> {
    (ctx.arch == Arch::X86_64
        && ctx.x86_64.is_some()
        && !ctx.preflight.efi
        && !ctx.preflight.locked_down())
    .then(|| {
        format!(
            "preferred on a BIOS-booted x86_64 kernel (no in-kernel digest, no purgatory); \
             kexec_load_disabled={} lockdown={}",
            fmt_opt(ctx.preflight.load_disabled.map(u8::from)),
            ctx.preflight.lockdown.as_deref().unwrap_or("absent")
        )
    })
}

/// Loads the target. x86_64 on a BIOS-booted kernel without lockdown:
/// `kexec_load` first, then `kexec_file_load` if that fails for any reason
/// (see [`x86_64_load_first`]). Otherwise `kexec_file_load` first, and
/// `kexec_load` when the kernel lacks or refuses the file interface for a
/// format reason. Files go to `kexec_file_load` as they are; the
/// `kexec_load` planners read them mapped.
pub fn load_payloads(
    k: &mut dyn Kexec,
    ctx: &LoadContext<'_>,
    kernel: Payload<'_>,
    initrd: Option<Payload<'_>>,
    cmdline: &str,
) -> Result<Loaded, Error> {
    ctx.preflight.check()?;
    let mut load_failed = None;
    if let (Some(reason), Some(inputs)) = (x86_64_load_first(ctx), ctx.x86_64.as_ref()) {
        let tried = (|| {
            let kernel = kernel.map()?;
            let initrd = initrd.map(|i| i.map()).transpose()?;
            let plan = plan_x86_64(&kernel, initrd.as_deref(), cmdline, inputs)?;
            k.load(&plan)?;
            Ok::<_, Error>(plan.entry)
        })();
        match tried {
            Ok(entry) => {
                tracing::info!(path = "kexec_load", %reason, entry, "loaded");
                return Ok(Loaded {
                    path: "kexec_load",
                    reason,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "kexec_load failed; trying kexec_file_load");
                load_failed = Some(e);
            }
        }
    }
    // arm64's kexec_file_load takes only a raw Image: a gzip'd one is
    // decompressed into memory (and copied into a memfd) first.
    let unzipped: Vec<u8>;
    let kernel_for_file = match ctx.arch {
        Arch::Aarch64 if kernel.map()?.starts_with(&[0x1f, 0x8b]) => {
            unzipped = maybe_gunzip(&kernel.map()?)?.into_owned();
            Payload::Bytes(&unzipped)
        }
        _ => kernel,
    };
    let first = match k.file_load(kernel_for_file, initrd, cmdline) {
        Ok(()) => {
            tracing::info!(path = "kexec_file_load", "loaded");
            let reason = match &load_failed {
                Some(e) => format!("kexec_load failed: {e}"),
                None => format!(
                    "preferred{}; kexec_load_disabled={} lockdown={}",
                    if ctx.arch == Arch::X86_64 && ctx.preflight.efi {
                        " (EFI-booted)"
                    } else {
                        ""
                    },
                    fmt_opt(ctx.preflight.load_disabled.map(u8::from)),
                    ctx.preflight.lockdown.as_deref().unwrap_or("absent")
                ),
            };
            return Ok(Loaded {
                path: "kexec_file_load",
                reason,
            });
        }
        Err(e) => e,
    };
    if let Some(load) = load_failed {
        return Err(Error::BothFailed {
            load: Box::new(load),
            file_load: Box::new(first),
        });
    }
    let errno = first.errno().unwrap_or(0);
    if !falls_back(errno) {
        tracing::warn!(error = %first, "kexec_file_load refused; not falling back");
        return Err(first);
    }
    if ctx.preflight.locked_down() {
        return Err(Error::LockedDown {
            mode: ctx.preflight.lockdown.clone().unwrap_or_default(),
            first: Box::new(first),
        });
    }
    let why = format!("kexec_file_load failed with {}", errno_name(errno));
    let kernel = kernel.map()?;
    let initrd = initrd.map(|i| i.map()).transpose()?;
    let (kernel, initrd) = (&kernel[..], initrd.as_deref());
    let plan = match ctx.arch {
        Arch::Aarch64 => {
            let inputs = ctx.arm64.as_ref().ok_or_else(|| Error::Unsupported {
                reason: format!("{why}, and no DTB/memory map was supplied for kexec_load"),
            })?;
            plan_arm64(kernel, initrd, cmdline, inputs)?
        }
        Arch::X86_64 => {
            let inputs = ctx.x86_64.as_ref().ok_or_else(|| Error::Unsupported {
                reason: format!(
                    "{why}, and no firmware memory map (/sys/firmware/memmap, \
                     CONFIG_FIRMWARE_MEMMAP) was supplied for kexec_load"
                ),
            })?;
            plan_x86_64(kernel, initrd, cmdline, inputs)?
        }
    };
    for seg in &plan.segments {
        tracing::debug!(what = seg.what, mem = seg.mem, memsz = seg.memsz, "segment");
    }
    k.load(&plan)?;
    tracing::info!(path = "kexec_load", reason = %why, entry = plan.entry, "loaded");
    Ok(Loaded {
        path: "kexec_load",
        reason: why,
    })
}

/// TEST ONLY (`phase.test_force_kexec_load=1`): answers `kexec_file_load`
/// with ENOSYS without calling it, so [`load`] takes the `kexec_load`
/// fallback on a kernel that has both; everything else goes to the inner one.
/// Only with the feature `test-knobs` (and in this crate's unit tests).
#[cfg(any(test, feature = "test-knobs"))]
pub struct ForceKexecLoad<'a>(pub &'a mut dyn Kexec);

#[cfg(any(test, feature = "test-knobs"))]
impl Kexec for ForceKexecLoad<'_> {
    fn file_load(&mut self, _: Payload<'_>, _: Option<Payload<'_>>, _: &str) -> Result<(), Error> {
        Err(Error::Syscall {
            call: "SYS_kexec_file_load (not called: phase.test_force_kexec_load=1)".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSYS),
        })
    }

    fn load(&mut self, plan: &KexecPlan) -> Result<(), Error> {
        self.0.load(plan)
    }

    fn exec(&mut self) -> Error {
        self.0.exec()
    }
}

/// TEST ONLY (`phase.test_force_kexec_file_load=1`): answers `kexec_load`
/// with ENOSYS without calling it, so an x86_64 kernel that would take
/// `kexec_load` first goes on to `kexec_file_load`. Only with the feature
/// `test-knobs` (and in this crate's unit tests).
#[cfg(any(test, feature = "test-knobs"))]
pub struct ForceKexecFileLoad<'a>(pub &'a mut dyn Kexec);

#[cfg(any(test, feature = "test-knobs"))]
impl Kexec for ForceKexecFileLoad<'_> {
    fn file_load(
        &mut self,
        kernel: Payload<'_>,
        initrd: Option<Payload<'_>>,
        cmdline: &str,
    ) -> Result<(), Error> {
        self.0.file_load(kernel, initrd, cmdline)
    }

    fn load(&mut self, _: &KexecPlan) -> Result<(), Error> {
        Err(Error::Syscall {
            call: "SYS_kexec_load (not called: phase.test_force_kexec_file_load=1)".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSYS),
        })
    }

    fn exec(&mut self) -> Error {
        self.0.exec()
    }
}

fn fmt_opt(v: Option<u8>) -> String {
    v.map_or_else(|| "absent".into(), |v| v.to_string())
}

/// The symbolic name of an errno value.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EBADF => "EBADF",
        libc::ENOMEM => "ENOMEM",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOEXEC => "ENOEXEC",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "ENOTSUP",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        // Only Linux's libc names the key errnos; only Linux returns them to kexec.
        #[cfg(target_os = "linux")]
        libc::EKEYREJECTED => "EKEYREJECTED",
        #[cfg(target_os = "linux")]
        libc::ENOKEY => "ENOKEY",
        libc::EFBIG => "EFBIG",
        libc::E2BIG => "E2BIG",
        _ => "E?",
    }
}

/// A recorded call of [`DryRun`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `kexec_file_load` with the sizes and command line.
    FileLoad {
        /// Kernel bytes.
        kernel: usize,
        /// Initrd bytes.
        initrd: Option<usize>,
        /// Command line.
        cmdline: String,
        /// Whether the kernel and the initrd (if any) came as files, whose
        /// descriptors go to the kernel without a copy.
        by_fd: bool,
    },
    /// `kexec_load` with the plan.
    Load(KexecPlan),
    /// `reboot(LINUX_REBOOT_CMD_KEXEC)`.
    Exec,
}

/// Records calls; answers `file_load`/`load` with the scripted errno (0 = success).
#[derive(Debug, Default)]
pub struct DryRun {
    /// What was called, in order.
    pub calls: Vec<Call>,
    /// errno for `file_load` (0: succeed).
    pub file_load_errno: i32,
    /// errno for `load` (0: succeed).
    pub load_errno: i32,
}

fn scripted(call: &str, errno: i32) -> Result<(), Error> {
    if errno == 0 {
        return Ok(());
    }
    Err(Error::Syscall {
        call: format!("{call} (dry run)"),
        source: std::io::Error::from_raw_os_error(errno),
    })
}

impl Kexec for DryRun {
    fn file_load(
        &mut self,
        kernel: Payload<'_>,
        initrd: Option<Payload<'_>>,
        cmdline: &str,
    ) -> Result<(), Error> {
        let is_file = |p: &Payload<'_>| matches!(p, Payload::File { .. });
        let size = |p: Payload<'_>| usize::try_from(p.len()).unwrap_or(usize::MAX);
        self.calls.push(Call::FileLoad {
            kernel: size(kernel),
            initrd: initrd.map(size),
            cmdline: cmdline.to_owned(),
            by_fd: is_file(&kernel) && initrd.as_ref().is_none_or(is_file),
        });
        scripted("SYS_kexec_file_load", self.file_load_errno)
    }

    fn load(&mut self, plan: &KexecPlan) -> Result<(), Error> {
        self.calls.push(Call::Load(plan.clone()));
        scripted("SYS_kexec_load", self.load_errno)
    }

    fn exec(&mut self) -> Error {
        self.calls.push(Call::Exec);
        Error::Syscall {
            call: "reboot(LINUX_REBOOT_CMD_KEXEC) (dry run)".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSYS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_image(len: usize, image_size: u64) -> Vec<u8> {
        let mut img = vec![0u8; len];
        img[8..16].copy_from_slice(&0u64.to_le_bytes());
        img[16..24].copy_from_slice(&image_size.to_le_bytes());
        img[56..60].copy_from_slice(b"ARM\x64");
        img
    }

    const IOMEM: &str = "\
09000000-09000fff : pl011@9000000
  09000000-09000fff : 9000000.pl011 pl011@9000000
40000000-5fffffff : System RAM
  40210000-41b0ffff : Kernel code
  48000000-483fffff : reserved
";

    fn ctx_inputs<'a>(dtb: &'a [u8], mem: &'a [Range], entropy: &'a [u8]) -> Arm64Inputs<'a> {
        Arm64Inputs {
            dtb,
            memory: mem,
            entropy,
        }
    }

    #[test]
    fn parses_iomem_and_lockdown() {
        assert_eq!(
            parse_iomem(IOMEM),
            vec![Range {
                start: 0x4000_0000,
                end: 0x6000_0000
            }]
        );
        assert_eq!(
            parse_lockdown("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(parse_lockdown("garbage"), None);
    }

    #[test]
    fn trampoline_encodes_ldr_and_br() {
        let t = arm64_trampoline(0x4020_0000, 0x4a00_0000);
        assert_eq!(t.len(), 40);
        assert_eq!(&t[24..32], &0x4020_0000u64.to_le_bytes());
        assert_eq!(&t[32..40], &0x4a00_0000u64.to_le_bytes());
        // ldr x4 literal at pc+24 and ldr x0 literal at pc(4)+28 both hit their words.
        let word = |i: usize| u32::from_le_bytes(t[i * 4..i * 4 + 4].try_into().expect("4"));
        assert_eq!((word(0) >> 5 & 0x7ffff) * 4, 24);
        assert_eq!(4 + (word(1) >> 5 & 0x7ffff) * 4, 32);
        assert_eq!(word(5), 0xd61f_0080);
    }

    #[test]
    fn plans_arm64_segments_in_ram_aligned_and_disjoint() {
        let mem = parse_iomem(IOMEM);
        let dtb = crate::dtb::tests::synthetic();
        let entropy = [7u8; 40];
        let img = fake_image(3 << 20, 5 << 20);
        let initrd = vec![1u8; 12345];
        let plan = plan_arm64(
            &img,
            Some(&initrd),
            "console=ttyAMA0 t=1",
            &ctx_inputs(&dtb, &mem, &entropy),
        )
        .expect("plan");
        let names: Vec<_> = plan.segments.iter().map(|s| s.what).collect();
        assert_eq!(names, ["kernel", "initrd", "dtb", "trampoline"]);
        let k = &plan.segments[0];
        assert_eq!(k.mem, 0x4000_0000);
        assert_eq!(k.memsz, 5 << 20);
        let mut prev_end = 0;
        for s in &plan.segments {
            assert_eq!(s.mem % PAGE, 0, "{}", s.what);
            assert_eq!(s.memsz % PAGE, 0, "{}", s.what);
            assert!(s.buf.len() as u64 <= s.memsz);
            assert!(s.mem >= prev_end, "{} overlaps", s.what);
            assert!(s.mem + s.memsz <= 0x6000_0000);
            prev_end = s.mem + s.memsz;
        }
        assert_eq!(plan.entry, plan.segments[3].mem);
        let d = crate::dtb::Fdt::parse(&plan.segments[2].buf).expect("dtb");
        let c = d.node("/chosen").expect("chosen");
        let ir = plan.segments[1].mem;
        assert_eq!(c.prop("linux,initrd-start"), Some(&ir.to_be_bytes()[..]));
        assert_eq!(
            c.prop("linux,initrd-end"),
            Some(&(ir + initrd.len() as u64).to_be_bytes()[..])
        );
        assert_eq!(c.prop("kaslr-seed"), Some(&[7u8; 8][..]));
        assert_eq!(c.prop("rng-seed"), Some(&[7u8; 32][..]));
        assert_eq!(
            plan.segments[3].buf,
            arm64_trampoline(0x4000_0000, plan.segments[2].mem)
        );
    }

    #[test]
    fn plan_gunzips_and_reports_no_room() {
        use std::io::Write;
        let img = fake_image(1 << 20, 2 << 20);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&img).expect("gz");
        let gz = gz.finish().expect("gz");
        let dtb = crate::dtb::tests::synthetic();
        let mem = [Range {
            start: 0x4000_0000,
            end: 0x4000_0000 + (64 << 20),
        }];
        let plan = plan_arm64(&gz, None, "x", &ctx_inputs(&dtb, &mem, &[])).expect("plan");
        assert_eq!(plan.segments[0].buf, img);
        assert_eq!(plan.segments.len(), 3);
        let small = [Range {
            start: 0x4000_0000,
            end: 0x4000_0000 + (4 << 20),
        }];
        let e = plan_arm64(&img, None, "x", &ctx_inputs(&dtb, &small, &[])).expect_err("no room");
        assert!(matches!(e, Error::NoRoom { .. }), "{e}");
        assert!(plan_arm64(b"not an image", None, "x", &ctx_inputs(&dtb, &mem, &[])).is_err());
    }

    #[test]
    fn iomem_ram_at_the_top_of_the_address_space_does_not_wrap() {
        // Found by fuzzing: `last + 1` overflowed on this entry.
        let text = "40000000-ffffffffffffffff : System RAM\n\
                    ffffffffffffff00-ffffffffffffffff : System RAM\n\
                    ffffffffffffffff-ffffffffffffffff : System RAM\n";
        assert_eq!(
            parse_iomem(text),
            [
                Range {
                    start: 0x4000_0000,
                    end: u64::MAX
                },
                Range {
                    start: 0xffff_ffff_ffff_ff00,
                    end: u64::MAX
                }
            ],
            "end clamped to u64::MAX (the last byte is given up), a 1-byte range dropped"
        );
    }

    /// The error of a plan expected to fail, without printing a plan's
    /// megabytes when it does not.
    fn no_plan(r: Result<KexecPlan, Error>) -> Error {
        match r {
            Ok(p) => panic!("planned at {:#x}, expected an error", p.entry),
            Err(e) => e,
        }
    }

    #[test]
    fn image_header_sizes_that_overflow_are_errors_not_panics() {
        let dtb = crate::dtb::tests::synthetic();
        let top = [Range {
            start: 0xffff_ffff_ffc0_0000,
            end: u64::MAX,
        }];
        let mem = parse_iomem(IOMEM);
        // image_size near u64::MAX: kernel_at + image_size wraps.
        let img = fake_image(1 << 20, u64::MAX - 0x1000);
        for m in [&top[..], &mem[..]] {
            let e = no_plan(plan_arm64(&img, None, "x", &ctx_inputs(&dtb, m, &[])));
            assert!(e.to_string().contains("overflows"), "{e}");
        }
        // text_offset near u64::MAX: base + text_offset wraps.
        let mut img = fake_image(1 << 20, 2 << 20);
        img[8..16].copy_from_slice(&(!(PAGE - 1)).to_le_bytes());
        let e = no_plan(plan_arm64(&img, None, "x", &ctx_inputs(&dtb, &mem, &[])));
        assert!(e.to_string().contains("text_offset"), "{e}");
        // A layout that fits the address space but not the RAM near its top.
        let img = fake_image(1 << 20, 2 << 20);
        let e = no_plan(plan_arm64(&img, None, "x", &ctx_inputs(&dtb, &top, &[])));
        assert!(matches!(e, Error::NoRoom { .. }), "{e}");
        // text_offset that is not page aligned would give an unaligned segment.
        let mut img = fake_image(1 << 20, 2 << 20);
        img[8..16].copy_from_slice(&0x80001u64.to_le_bytes());
        let e = arm64_header(&img).expect_err("unaligned");
        assert!(e.to_string().contains("page aligned"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn iomem_parsing_never_panics(text in "[0-9a-f -:A-Za-z\n]{0,200}") {
            for r in parse_iomem(&text) {
                proptest::prop_assert!(r.start < r.end);
            }
        }

        #[test]
        fn arm64_header_sizes_never_panic(
            text_offset in proptest::prelude::any::<u64>(),
            image_size in proptest::prelude::any::<u64>(),
            start in proptest::prelude::any::<u64>(),
            len in proptest::prelude::any::<u64>(),
        ) {
            let dtb = crate::dtb::tests::synthetic();
            let mut img = fake_image(1 << 16, image_size);
            img[8..16].copy_from_slice(&text_offset.to_le_bytes());
            let mem = [Range { start, end: start.saturating_add(len) }];
            if let Ok(plan) = plan_arm64(&img, Some(b"initrd"), "x", &ctx_inputs(&dtb, &mem, &[])) {
                for s in &plan.segments {
                    proptest::prop_assert!(s.mem >= mem[0].start);
                    proptest::prop_assert!(s.mem.checked_add(s.memsz).is_some_and(|e| e <= mem[0].end));
                }
            }
        }
    }

    fn run(arch: Arch, pre: &Preflight, k: &mut DryRun) -> Result<Loaded, Error> {
        let dtb = crate::dtb::tests::synthetic();
        let mem = parse_iomem(IOMEM);
        let ctx = LoadContext {
            arch,
            preflight: pre,
            arm64: Some(ctx_inputs(&dtb, &mem, &[1; 16])),
            x86_64: None,
        };
        load(k, &ctx, &fake_image(1 << 20, 2 << 20), Some(b"initrd"), "c")
    }

    #[test]
    fn file_load_first() {
        let mut k = DryRun::default();
        let l = run(Arch::Aarch64, &Preflight::default(), &mut k).expect("loads");
        assert_eq!(l.path, "kexec_file_load");
        assert_eq!(k.calls.len(), 1);
    }

    /// `bytes` in a temporary file, as a memfd would hold them.
    fn file_with(bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(bytes).expect("write");
        f
    }

    #[test]
    fn files_go_to_file_load_by_descriptor_and_are_mapped_for_the_fallback() {
        let img = fake_image(1 << 20, 2 << 20);
        let (kf, inf) = (file_with(&img), file_with(b"initrd"));
        let (kernel, initrd) = (
            Payload::file(&kf).expect("fstat"),
            Payload::file(&inf).expect("fstat"),
        );
        assert_eq!((kernel.len(), initrd.len()), (1 << 20, 6));
        let dtb = crate::dtb::tests::synthetic();
        let mem = parse_iomem(IOMEM);
        let pre = Preflight::default();
        let ctx = LoadContext {
            arch: Arch::Aarch64,
            preflight: &pre,
            arm64: Some(ctx_inputs(&dtb, &mem, &[1; 16])),
            x86_64: None,
        };
        let mut k = DryRun::default();
        load_payloads(&mut k, &ctx, kernel, Some(initrd), "c").expect("loads");
        assert_eq!(
            k.calls,
            [Call::FileLoad {
                kernel: 1 << 20,
                initrd: Some(6),
                cmdline: "c".into(),
                by_fd: true
            }]
        );
        // Bytes in memory are not files: Syscalls copies those into a memfd.
        let mut k = DryRun::default();
        load(&mut k, &ctx, &img, Some(b"initrd"), "c").expect("loads");
        assert!(
            matches!(k.calls[..], [Call::FileLoad { by_fd: false, .. }]),
            "{:?}",
            k.calls
        );
        // The kexec_load fallback plans from the files' bytes, mapped.
        let mut k = DryRun {
            file_load_errno: libc::ENOSYS,
            ..DryRun::default()
        };
        let l = load_payloads(&mut k, &ctx, kernel, Some(initrd), "c").expect("falls back");
        assert_eq!(l.path, "kexec_load");
        let Call::Load(plan) = &k.calls[1] else {
            panic!("no kexec_load after ENOSYS")
        };
        let from_bytes = plan_arm64(
            &img,
            Some(b"initrd"),
            "c",
            ctx.arm64.as_ref().expect("arm64"),
        )
        .expect("plan");
        assert!(
            *plan == from_bytes,
            "the plan from files differs from the plan from bytes"
        );
        // A gzip'd Image in a file is decompressed for kexec_file_load.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &img).expect("gz");
        let gzf = file_with(&gz.finish().expect("gz"));
        let mut k = DryRun::default();
        load_payloads(&mut k, &ctx, Payload::file(&gzf).expect("fstat"), None, "c").expect("loads");
        assert!(
            matches!(
                k.calls[..],
                [Call::FileLoad {
                    kernel: 1_048_576,
                    initrd: None,
                    by_fd: false,
                    ..
                }]
            ),
            "{:?}",
            k.calls
        );
        // An empty file maps to no bytes rather than failing mmap.
        let empty = file_with(b"");
        assert!(
            Payload::file(&empty)
                .expect("fstat")
                .map()
                .expect("map")
                .is_empty()
        );
    }

    #[test]
    fn falls_back_only_on_format_errors() {
        for errno in [libc::ENOSYS, libc::EINVAL, libc::ENOEXEC, libc::EOPNOTSUPP] {
            let mut k = DryRun {
                file_load_errno: errno,
                ..DryRun::default()
            };
            let l = run(Arch::Aarch64, &Preflight::default(), &mut k).expect("falls back");
            assert_eq!(l.path, "kexec_load");
            assert!(l.reason.contains(errno_name(errno)), "{}", l.reason);
            assert!(matches!(k.calls[1], Call::Load(_)));
        }
        // Only Linux's libc names the key errnos.
        #[cfg(target_os = "linux")]
        let refusals = [libc::EPERM, libc::EKEYREJECTED, libc::ENOKEY];
        #[cfg(not(target_os = "linux"))]
        let refusals = [libc::EPERM];
        for errno in refusals {
            let mut k = DryRun {
                file_load_errno: errno,
                ..DryRun::default()
            };
            let e = run(Arch::Aarch64, &Preflight::default(), &mut k).expect_err("no fallback");
            assert_eq!(e.errno(), Some(errno));
            assert_eq!(k.calls.len(), 1, "kexec_load must not be tried");
            assert!(e.to_string().contains("SYS_kexec_file_load"), "{e}");
        }
    }

    #[test]
    fn disabled_kexec_is_one_clear_error_before_any_syscall() {
        let pre = Preflight {
            load_disabled: Some(true),
            lockdown: Some("none".into()),
            efi: false,
        };
        let mut k = DryRun::default();
        let e = run(Arch::X86_64, &pre, &mut k).expect_err("disabled");
        assert!(matches!(e, Error::KexecDisabled));
        let msg = e.to_string();
        assert!(msg.contains("kexec_load_disabled=1"), "{msg}");
        assert!(msg.contains("reboot"), "names a remedy: {msg}");
        assert!(k.calls.is_empty());
    }

    #[test]
    fn lockdown_blocks_the_unsigned_fallback() {
        let pre = Preflight {
            load_disabled: Some(false),
            lockdown: Some("integrity".into()),
            efi: false,
        };
        let mut k = DryRun {
            file_load_errno: libc::ENOSYS,
            ..DryRun::default()
        };
        let e = run(Arch::Aarch64, &pre, &mut k).expect_err("locked down");
        assert!(matches!(e, Error::LockedDown { .. }), "{e}");
        assert_eq!(k.calls.len(), 1);
    }

    #[test]
    fn x86_64_without_a_memory_map_has_no_kexec_load_fallback() {
        let mut k = DryRun {
            file_load_errno: libc::ENOSYS,
            ..DryRun::default()
        };
        let e = run(Arch::X86_64, &Preflight::default(), &mut k).expect_err("unsupported");
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    }

    #[test]
    fn preflight_reads_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, "1\n").expect("write");
        std::fs::write(&b, "[none] integrity confidentiality\n").expect("write");
        let p = Preflight::read_from(&a, &b);
        assert_eq!(p.load_disabled, Some(true));
        assert_eq!(p.lockdown.as_deref(), Some("none"));
        assert!(!p.locked_down());
        let p = Preflight::read_from(&d.path().join("x"), &d.path().join("y"));
        assert_eq!(p, Preflight::default());
    }
}
