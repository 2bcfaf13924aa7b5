//! x86_64 `kexec_load`: a bzImage through the 64-bit boot protocol
//! (Linux `Documentation/arch/x86/boot.rst`), without a C purgatory.
//!
//! [`plan_x86_64`] is pure: from a bzImage, an initrd, a command line and the
//! firmware memory map (`/sys/firmware/memmap`, parsed by
//! [`parse_memmap_entry`]) it builds the kernel, initrd, zero page
//! (`boot_params`), command line and entry trampoline segments. Every size
//! and offset taken from the image is checked: a bad image is an
//! [`Error::Image`], never a panic or a wrapped address.

use std::path::Path;

use super::{KexecPlan, PAGE, Range, Segment};
use crate::Error;

/// The setup header starts here, in the image and in `boot_params` alike.
const HDR_START: usize = 0x1f1;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const ENTRY_64: u64 = 0x200;
/// `xloadflags`: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags`: the initrd may live above 4 GiB.
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// `boot_params.e820_table` holds this many entries.
pub const E820_MAX: usize = 128;
/// Most entries read from `/sys/firmware/memmap` (a bound on a sysfs walk).
pub const MEMMAP_MAX: usize = 1024;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// The setup header fields [`plan_x86_64`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzHeader {
    /// Boot protocol version (`0x020f` = 2.15).
    pub version: u16,
    /// 512-byte setup sectors before the protected-mode kernel.
    pub setup_sects: u8,
    /// Offset of the protected-mode kernel in the file.
    pub pm_offset: usize,
    /// One past the setup header's last byte (`0x202` + the byte at `0x201`).
    pub hdr_end: usize,
    /// `xloadflags`.
    pub xloadflags: u16,
    /// Alignment of the load address of a relocatable kernel (a power of two).
    pub kernel_alignment: u32,
    /// Whether the kernel may be loaded elsewhere than `pref_address`.
    pub relocatable: bool,
    /// Preferred (and, relocatable, lowest useful) load address.
    pub pref_address: u64,
    /// Bytes the kernel needs from its load address until it runs.
    pub init_size: u32,
    /// Highest address the initrd's last byte may have.
    pub initrd_addr_max: u32,
    /// Longest command line, without its NUL.
    pub cmdline_size: u32,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Image {
        reason: reason.into(),
    }
}

fn le16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(o..o.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn le64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(o..o.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Parses a bzImage's setup header and checks that the 64-bit boot protocol
/// (>= 2.12, `XLF_KERNEL_64`) can start it.
pub fn bzimage_header(image: &[u8]) -> Result<BzHeader, Error> {
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err(bad(
            "not an x86 bzImage (no \"HdrS\" at offset 0x202); pass the kernel's bzImage (vmlinuz)",
        ));
    }
    let short = || bad(format!("bzImage truncated ({} bytes)", image.len()));
    let version = le16(image, 0x206).ok_or_else(short)?;
    if version < 0x020c {
        return Err(bad(format!(
            "boot protocol {}.{:02} is older than 2.12, which the 64-bit entry needs",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match image[HDR_START] {
        0 => 4,
        n => n,
    };
    let pm_offset = (usize::from(setup_sects) + 1) * 512;
    let hdr_end = 0x202 + usize::from(*image.get(0x201).ok_or_else(short)?);
    if hdr_end > pm_offset || pm_offset >= image.len() {
        return Err(bad(format!(
            "bzImage setup ({pm_offset} bytes, header to {hdr_end:#x}) does not fit a {} byte file",
            image.len()
        )));
    }
    let xloadflags = le16(image, 0x236).ok_or_else(short)?;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad(
            "bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)",
        ));
    }
    let kernel_alignment = le32(image, 0x230).ok_or_else(short)?;
    let relocatable = *image.get(0x234).ok_or_else(short)? != 0;
    if relocatable && !kernel_alignment.is_power_of_two() {
        return Err(bad(format!(
            "kernel_alignment {kernel_alignment:#x} is not a power of two"
        )));
    }
    let pref_address = le64(image, 0x258).ok_or_else(short)?;
    let init_size = le32(image, 0x260).ok_or_else(short)?;
    let pm_len = (image.len() - pm_offset) as u64;
    if u64::from(init_size) < pm_len {
        return Err(bad(format!(
            "init_size {init_size:#x} is smaller than the {pm_len:#x} byte protected-mode kernel"
        )));
    }
    Ok(BzHeader {
        version,
        setup_sects,
        pm_offset,
        hdr_end,
        xloadflags,
        kernel_alignment,
        relocatable,
        pref_address,
        init_size,
        initrd_addr_max: le32(image, 0x22c).ok_or_else(short)?,
        cmdline_size: le32(image, 0x238).ok_or_else(short)?,
    })
}

/// One e820 entry: `[addr, addr + size)` of type `kind` (1 = RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes (> 0).
    pub size: u64,
    /// e820 type.
    pub kind: u32,
}

/// The e820 type the kernel names `name` in `/sys/firmware/memmap/N/type`
/// (its `e820_type_to_string`); an unknown name is reserved.
pub fn e820_type(name: &str) -> u32 {
    match name.trim() {
        "System RAM" => E820_RAM,
        "ACPI Tables" => 3,
        "ACPI Non-volatile Storage" => 4,
        "Unusable memory" => 5,
        "Persistent Memory" => 7,
        "Persistent Memory (legacy)" => 12,
        "Soft Reserved" => 0xefff_ffff,
        _ => 2,
    }
}

fn memmap_bad(reason: String) -> Error {
    Error::MemoryMap { reason }
}

fn parse_hex(what: &str, s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u64::from_str_radix(digits, 16).map_err(|_| memmap_bad(format!("{what} {t:?} is not hex")))
}

/// One `/sys/firmware/memmap/N` entry from its `start`, `end` (inclusive)
/// and `type` files.
pub fn parse_memmap_entry(start: &str, end: &str, kind: &str) -> Result<E820Entry, Error> {
    let addr = parse_hex("start", start)?;
    let last = parse_hex("end", end)?;
    let size = last
        .checked_sub(addr)
        .and_then(|d| d.checked_add(1))
        .ok_or_else(|| memmap_bad(format!("range {addr:#x}-{last:#x} is empty or wraps")))?;
    Ok(E820Entry {
        addr,
        size,
        kind: e820_type(kind),
    })
}

/// Reads `/sys/firmware/memmap` (or `dir`): the firmware's memory map, as
/// kexec-tools hands it to the next kernel. Sorted by address.
pub fn read_memmap(dir: &Path) -> Result<Vec<E820Entry>, Error> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("read_dir", dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io("read_dir", dir, e))?;
        if out.len() == MEMMAP_MAX {
            return Err(memmap_bad(format!(
                "{} has more than {MEMMAP_MAX} entries",
                dir.display()
            )));
        }
        let p = ent.path();
        let read = |f: &str| {
            let path = p.join(f);
            std::fs::read_to_string(&path).map_err(|e| Error::io("read", path, e))
        };
        out.push(parse_memmap_entry(
            &read("start")?,
            &read("end")?,
            &read("type")?,
        )?);
    }
    out.sort_by_key(|e| e.addr);
    Ok(out)
}

/// The x86_64 entry trampoline, to run at physical `at`: load a flat GDT
/// (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18, as boot.rst asks), reload the
/// segments, then `%rsi` = `boot_params` and jump to `entry`. The kernel's
/// `relocate_kernel` enters it in long mode with every page identity mapped
/// and all general registers cleared, so this replaces a purgatory.
pub fn x86_64_trampoline(at: u64, boot_params: u64, entry: u64) -> Vec<u8> {
    let mut t = Vec::with_capacity(0x6a);
    t.push(0xfa); // cli
    t.extend_from_slice(&[0x0f, 0x01, 0x15, 0x5a, 0, 0, 0]); // lgdt gdtr(%rip) (0x62 - 0x08)
    t.extend_from_slice(&[0xb8, 0x18, 0, 0, 0]); // mov $0x18, %eax
    for sreg in [0xd8, 0xc0, 0xd0, 0xe0, 0xe8] {
        t.extend_from_slice(&[0x8e, sreg]); // mov %eax, %ds/%es/%ss/%fs/%gs
    }
    t.extend_from_slice(&[0x48, 0x8d, 0x05, 0x05, 0, 0, 0]); // lea 1f(%rip), %rax (0x23 - 0x1e)
    t.extend_from_slice(&[0x6a, 0x10]); // push $0x10 (__BOOT_CS)
    t.push(0x50); // push %rax
    t.extend_from_slice(&[0x48, 0xcb]); // lretq: %cs = 0x10, continue at 1f
    t.extend_from_slice(&[0x48, 0xbe]); // 1: movabs $boot_params, %rsi
    t.extend_from_slice(&boot_params.to_le_bytes());
    t.extend_from_slice(&[0x48, 0xb8]); // movabs $entry, %rax
    t.extend_from_slice(&entry.to_le_bytes());
    t.extend_from_slice(&[0xff, 0xe0]); // jmp *%rax
    t.resize(0x40, 0xcc); // int3 padding up to the 8-aligned GDT
    t.extend_from_slice(&[0; 16]); // null descriptor, unused 0x08
    t.extend_from_slice(&0x00af_9a00_0000_ffffu64.to_le_bytes()); // 0x10: 64-bit code, flat
    t.extend_from_slice(&0x00cf_9200_0000_ffffu64.to_le_bytes()); // 0x18: data, flat 4 GiB
    t.extend_from_slice(&[0, 0]); // pad: gdtr sits at 0x62, where lgdt points
    t.extend_from_slice(&0x1fu16.to_le_bytes()); // gdtr at 0x62: limit
    t.extend_from_slice(&at.wrapping_add(0x40).to_le_bytes()); // base: the GDT above
    t
}

/// Inputs of [`plan_x86_64`] besides the artifacts.
#[derive(Debug, Clone)]
pub struct X86Inputs<'a> {
    /// The firmware memory map ([`read_memmap`]).
    pub memmap: &'a [E820Entry],
}

fn ovf(what: &str) -> Error {
    bad(format!("{what} overflows the 64-bit address space"))
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_next_multiple_of(a)
}

fn add(a: u64, b: u64, what: &str) -> Result<u64, Error> {
    a.checked_add(b).ok_or_else(|| ovf(what))
}

/// Usable RAM of a memory map, sorted, adjacent entries merged.
pub fn usable_ram(memmap: &[E820Entry]) -> Vec<Range> {
    let mut ram: Vec<Range> = memmap
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .filter_map(|e| {
            Some(Range {
                start: e.addr,
                end: e.addr.checked_add(e.size)?,
            })
        })
        .collect();
    ram.sort_by_key(|r| r.start);
    let mut out: Vec<Range> = Vec::with_capacity(ram.len());
    for r in ram {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The lowest load address of the kernel in `r` and the end of what is
/// placed right after it (zero page, command line, trampoline).
fn place_low(r: &Range, hdr: &BzHeader, cmdline_len: u64) -> Option<(u64, u64, u64, u64, u64)> {
    let kernel_at = if hdr.relocatable {
        align_up(
            r.start.max(hdr.pref_address),
            u64::from(hdr.kernel_alignment),
        )?
    } else {
        hdr.pref_address
    };
    let kernel_end = align_up(kernel_at.checked_add(u64::from(hdr.init_size))?, PAGE)?;
    let bp_at = kernel_end;
    let cmd_at = bp_at.checked_add(PAGE)?;
    let tramp_at = align_up(cmd_at.checked_add(cmdline_len)?, PAGE)?;
    let end = tramp_at.checked_add(PAGE)?;
    // kernel_at % PAGE == 0: kernel_alignment >= PAGE for any real kernel,
    // and a non-relocatable one is loaded at its own pref_address.
    (kernel_at >= r.start && end <= r.end && kernel_at % PAGE == 0)
        .then_some((kernel_at, bp_at, cmd_at, tramp_at, end))
}

/// The highest page-aligned `len` bytes below `limit` in usable RAM that do
/// not touch `[avoid.0, avoid.1)`.
fn place_high(ram: &[Range], len: u64, limit: u64, avoid: (u64, u64)) -> Option<u64> {
    // Whole pages: the segment's memsz is `len` rounded up.
    let len = align_up(len, PAGE)?;
    let fits = |lo: u64, hi: u64| -> Option<u64> {
        let at = (hi / PAGE * PAGE).checked_sub(len)?;
        (at >= lo).then_some(at)
    };
    ram.iter().rev().find_map(|r| {
        let hi = r.end.min(limit);
        // Above the avoided range, then below it.
        let above = fits(r.start.max(avoid.1), hi).filter(|_| hi > avoid.1);
        above.or_else(|| fits(r.start, hi.min(avoid.0)))
    })
}

/// Plans an x86_64 `kexec_load` of a bzImage: the protected-mode kernel at
/// the lowest `kernel_alignment` boundary at or above `pref_address` in usable
/// RAM (its segment covers `init_size`, the room the decompressor uses),
/// right after it the zero page, the command line and the trampoline; the
/// initrd as high as `initrd_addr_max` allows. Entry: the trampoline.
pub fn plan_x86_64(
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    inputs: &X86Inputs<'_>,
) -> Result<KexecPlan, Error> {
    let hdr = bzimage_header(kernel)?;
    if cmdline.len() as u64 > u64::from(hdr.cmdline_size) {
        return Err(bad(format!(
            "command line of {} bytes exceeds the kernel's cmdline_size {}",
            cmdline.len(),
            hdr.cmdline_size
        )));
    }
    if cmdline.contains('\0') {
        return Err(bad("command line contains a NUL byte"));
    }
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    let ram = usable_ram(inputs.memmap);
    let mut table: Vec<E820Entry> = inputs.memmap.to_vec();
    table.sort_by_key(|e| e.addr);
    if table.len() > E820_MAX {
        return Err(memmap_bad(format!(
            "{} memory map entries; the zero page holds {E820_MAX}",
            table.len()
        )));
    }

    let (kernel_at, bp_at, cmd_at, tramp_at, low_end) = ram
        .iter()
        .find_map(|r| place_low(r, &hdr, cmd.len() as u64))
        .ok_or_else(|| Error::NoRoom {
            need: u64::from(hdr.init_size).saturating_add(3 * PAGE),
            ranges: ram.len(),
        })?;
    let initrd_len = initrd.map_or(0, |i| i.len() as u64);
    let initrd_at = match initrd {
        None => 0,
        Some(_) => {
            let limit = if hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0 {
                u64::MAX
            } else {
                u64::from(hdr.initrd_addr_max).saturating_add(1)
            };
            place_high(&ram, initrd_len, limit, (kernel_at, low_end)).ok_or(Error::NoRoom {
                need: initrd_len,
                ranges: ram.len(),
            })?
        }
    };

    // The zero page: the image's setup header, then what a loader fills in.
    let mut bp = vec![0u8; PAGE as usize];
    bp[HDR_START..hdr.hdr_end].copy_from_slice(&kernel[HDR_START..hdr.hdr_end]);
    let put32 = |bp: &mut Vec<u8>, o: usize, v: u64| {
        bp[o..o + 4].copy_from_slice(&(v as u32).to_le_bytes());
    };
    bp[0x210] = 0xff; // type_of_loader: undefined boot loader
    put32(&mut bp, 0x214, kernel_at); // code32_start (informational here)
    put32(&mut bp, 0x218, initrd_at); // ramdisk_image
    put32(&mut bp, 0x21c, initrd_len); // ramdisk_size
    put32(&mut bp, 0x228, cmd_at); // cmd_line_ptr
    put32(&mut bp, 0x0c0, initrd_at >> 32); // ext_ramdisk_image
    put32(&mut bp, 0x0c4, initrd_len >> 32); // ext_ramdisk_size
    put32(&mut bp, 0x0c8, cmd_at >> 32); // ext_cmd_line_ptr
    if hdr.hdr_end >= 0x258 {
        bp[0x250..0x258].fill(0); // setup_data: none
    }
    bp[0x1e8] = table.len() as u8; // e820_entries (<= 128, checked above)
    for (i, e) in table.iter().enumerate() {
        let o = 0x2d0 + i * 20;
        bp[o..o + 8].copy_from_slice(&e.addr.to_le_bytes());
        bp[o + 8..o + 16].copy_from_slice(&e.size.to_le_bytes());
        bp[o + 16..o + 20].copy_from_slice(&e.kind.to_le_bytes());
    }

    let page_up = |n: u64, what: &str| align_up(n, PAGE).ok_or_else(|| ovf(what));
    let pm = kernel[hdr.pm_offset..].to_vec();
    let entry = add(kernel_at, ENTRY_64, "kernel entry")?;
    let mut segments = vec![Segment {
        what: "kernel",
        memsz: page_up(u64::from(hdr.init_size), "init_size")?,
        buf: pm,
        mem: kernel_at,
    }];
    if let Some(i) = initrd {
        segments.push(Segment {
            what: "initrd",
            memsz: page_up(initrd_len, "initrd")?,
            buf: i.to_vec(),
            mem: initrd_at,
        });
    }
    segments.push(Segment {
        what: "boot_params",
        buf: bp,
        mem: bp_at,
        memsz: PAGE,
    });
    segments.push(Segment {
        what: "cmdline",
        memsz: page_up(cmd.len() as u64, "cmdline")?,
        buf: cmd,
        mem: cmd_at,
    });
    segments.push(Segment {
        what: "trampoline",
        buf: x86_64_trampoline(tramp_at, bp_at, entry),
        mem: tramp_at,
        memsz: PAGE,
    });
    segments.sort_by_key(|s| s.mem);
    Ok(KexecPlan {
        entry: tramp_at,
        segments,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kexec::{Arch, Call, DryRun, LoadContext, Preflight, errno_name, load};
    use proptest::prelude::*;

    /// A bzImage-shaped file: 4 setup sectors, protocol 2.15, relocatable,
    /// 64-bit entry, `pm` bytes of protected-mode kernel.
    pub(crate) fn fake_bzimage(pm: usize, init_size: u32) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512 + pm];
        img[0x1f1] = 4;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x200] = 0xeb;
        img[0x201] = 0x6a; // header to 0x26c
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x230..0x234].copy_from_slice(&(2u32 << 20).to_le_bytes());
        img[0x234] = 1;
        img[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&0x7ffu32.to_le_bytes());
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        for (i, b) in img[5 * 512..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        img
    }

    /// QEMU's (SeaBIOS, 1 GiB) map as /sys/firmware/memmap shows it.
    pub(crate) fn qemu_memmap() -> Vec<E820Entry> {
        [
            ("0x0", "0x9fbff", "System RAM"),
            ("0x9fc00", "0x9ffff", "Reserved"),
            ("0xf0000", "0xfffff", "Reserved"),
            ("0x100000", "0x3ffdffff", "System RAM"),
            ("0x3ffe0000", "0x3fffffff", "Reserved"),
            ("0xfeffc000", "0xfeffffff", "Reserved"),
            ("0xfffc0000", "0xffffffff", "Reserved"),
        ]
        .iter()
        .map(|(a, b, t)| parse_memmap_entry(a, &format!("{b}\n"), t).expect("entry"))
        .collect()
    }

    fn inputs(m: &[E820Entry]) -> X86Inputs<'_> {
        X86Inputs { memmap: m }
    }

    /// What a plan must satisfy whatever the inputs.
    fn check_layout(plan: &KexecPlan, memmap: &[E820Entry]) {
        let ram = usable_ram(memmap);
        let mut prev_end = 0;
        for s in &plan.segments {
            assert_eq!(s.mem % PAGE, 0, "{} aligned", s.what);
            assert_eq!(s.memsz % PAGE, 0, "{} size aligned", s.what);
            assert!(s.buf.len() as u64 <= s.memsz, "{}", s.what);
            assert!(s.mem >= prev_end, "{} overlaps the one before", s.what);
            let end = s.mem + s.memsz;
            assert!(
                ram.iter().any(|r| r.start <= s.mem && end <= r.end),
                "{} at {:#x}+{:#x} outside usable RAM",
                s.what,
                s.mem,
                s.memsz
            );
            prev_end = end;
        }
        let t = plan
            .segments
            .iter()
            .find(|s| s.what == "trampoline")
            .expect("trampoline");
        assert_eq!(plan.entry, t.mem, "entry is the trampoline");
    }

    fn seg<'a>(plan: &'a KexecPlan, what: &str) -> &'a Segment {
        plan.segments
            .iter()
            .find(|s| s.what == what)
            .unwrap_or_else(|| panic!("no {what} segment"))
    }

    fn u32_at(b: &[u8], o: usize) -> u64 {
        u64::from(le32(b, o).expect("in range"))
    }

    #[test]
    fn parses_memmap_entries() {
        let e = parse_memmap_entry("0x100000\n", "0x3ffdffff\n", "System RAM\n").expect("ok");
        assert_eq!(
            e,
            E820Entry {
                addr: 0x10_0000,
                size: 0x3fee_0000,
                kind: E820_RAM
            }
        );
        assert_eq!(e820_type("ACPI Tables"), 3);
        assert_eq!(e820_type("something new"), 2);
        for (a, b) in [
            ("0x10", "0x0f"),
            ("zz", "0x10"),
            ("0x0", "0xffffffffffffffff"),
        ] {
            let e = parse_memmap_entry(a, b, "System RAM").expect_err(a);
            assert!(e.to_string().starts_with("memory map: "), "{e}");
        }
    }

    #[test]
    fn reads_a_memmap_directory() {
        let d = tempfile::tempdir().expect("tempdir");
        for (i, (a, b, t)) in [
            ("0x100000", "0x1fffffff", "System RAM"),
            ("0x0", "0x9fbff", "System RAM"),
        ]
        .iter()
        .enumerate()
        {
            let e = d.path().join(i.to_string());
            std::fs::create_dir(&e).expect("mkdir");
            std::fs::write(e.join("start"), format!("{a}\n")).expect("w");
            std::fs::write(e.join("end"), format!("{b}\n")).expect("w");
            std::fs::write(e.join("type"), format!("{t}\n")).expect("w");
        }
        let m = read_memmap(d.path()).expect("reads");
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].addr, 0, "sorted by address");
        let e = read_memmap(&d.path().join("absent")).expect_err("absent");
        assert!(e.to_string().contains("absent"), "{e}");
    }

    #[test]
    fn header_of_a_synthetic_bzimage() {
        let h = bzimage_header(&fake_bzimage(8192, 1 << 24)).expect("header");
        assert_eq!(h.pm_offset, 5 * 512);
        assert_eq!(h.hdr_end, 0x26c);
        assert!(h.relocatable);
        assert_eq!(h.pref_address, 0x100_0000);
        let mut old = fake_bzimage(8192, 1 << 24);
        old[0x206..0x208].copy_from_slice(&0x020au16.to_le_bytes());
        assert!(
            bzimage_header(&old)
                .expect_err("2.10")
                .to_string()
                .contains("2.12")
        );
        let mut no64 = fake_bzimage(8192, 1 << 24);
        no64[0x236] = 0;
        assert!(
            bzimage_header(&no64)
                .expect_err("32-bit")
                .to_string()
                .contains("XLF_KERNEL_64")
        );
        let small = fake_bzimage(8192, 4096);
        assert!(
            bzimage_header(&small)
                .expect_err("init_size")
                .to_string()
                .contains("init_size")
        );
        assert!(bzimage_header(b"MZ not a kernel").is_err());
        let mut arm = vec![0u8; 4096];
        arm[56..60].copy_from_slice(b"ARM\x64");
        assert!(
            bzimage_header(&arm)
                .expect_err("arm64")
                .to_string()
                .contains("HdrS")
        );
    }

    /// The newest `/boot/vmlinuz-*` (linux-image-cloud-amd64, from
    /// scripts/setup); under CI its absence fails the test.
    fn real_bzimage() -> Option<Vec<u8>> {
        let mut found: Vec<_> = std::fs::read_dir("/boot")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        found.sort();
        match found.pop() {
            Some(p) => Some(std::fs::read(&p).expect("read /boot/vmlinuz-*")),
            None => {
                let ci =
                    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
                assert!(
                    !ci,
                    "no /boot/vmlinuz-*: install linux-image-cloud-amd64 (scripts/setup)"
                );
                eprintln!("skipped: no /boot/vmlinuz-* (install linux-image-cloud-amd64)");
                None
            }
        }
    }

    #[test]
    fn plans_a_real_bzimage_inside_usable_ram() {
        let Some(img) = real_bzimage() else { return };
        let h = bzimage_header(&img).expect("a Debian kernel parses");
        assert!(h.version >= 0x020c && h.relocatable, "{h:?}");
        assert_eq!(h.xloadflags & XLF_KERNEL_64, XLF_KERNEL_64);
        let memmap = qemu_memmap();
        let initrd = vec![0x5au8; 3 << 20];
        let cmdline = "console=ttyS0 token=abc";
        let plan = plan_x86_64(&img, Some(&initrd), cmdline, &inputs(&memmap)).expect("plan");
        check_layout(&plan, &memmap);
        let k = seg(&plan, "kernel");
        assert_eq!(
            k.mem, h.pref_address,
            "lowest aligned address at or above pref_address"
        );
        assert_eq!(k.mem % u64::from(h.kernel_alignment), 0);
        assert!(k.memsz >= u64::from(h.init_size));
        assert_eq!(k.buf, img[h.pm_offset..]);
        let bp = &seg(&plan, "boot_params").buf;
        // The setup header is copied; the loader's fields are then filled in.
        for (o, len) in [(0x1f1, 1), (0x202, 6), (0x230, 8), (0x258, 12)] {
            assert_eq!(bp[o..o + len], img[o..o + len], "header bytes at {o:#x}");
        }
        assert_eq!(bp[0x210], 0xff);
        let ir = seg(&plan, "initrd");
        assert_eq!(u32_at(bp, 0x218), ir.mem);
        assert_eq!(u32_at(bp, 0x21c), initrd.len() as u64);
        assert!(
            ir.mem + ir.memsz <= 0x3ffe_0000,
            "initrd high, below the end of RAM"
        );
        assert!(ir.mem > 0x3000_0000, "initrd placed high: {:#x}", ir.mem);
        let c = seg(&plan, "cmdline");
        assert_eq!(u32_at(bp, 0x228), c.mem);
        assert_eq!(c.buf, b"console=ttyS0 token=abc\0");
        assert_eq!(bp[0x1e8], 7, "every e820 entry");
        assert_eq!(
            &bp[0x2d0 + 3 * 20..0x2d0 + 3 * 20 + 8],
            &0x10_0000u64.to_le_bytes()
        );
        let t = seg(&plan, "trampoline");
        assert_eq!(
            t.buf,
            x86_64_trampoline(t.mem, seg(&plan, "boot_params").mem, k.mem + 0x200)
        );
    }

    #[test]
    fn trampoline_sets_rsi_and_jumps_to_the_64_bit_entry() {
        let t = x86_64_trampoline(0x4000_0000, 0x1122_3344_5566_7788, 0x0100_0200);
        assert_eq!(t.len(), 0x6c);
        assert_eq!(&t[0x23..0x25], &[0x48, 0xbe], "movabs imm64, %rsi");
        assert_eq!(&t[0x25..0x2d], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&t[0x2d..0x2f], &[0x48, 0xb8], "movabs imm64, %rax");
        assert_eq!(&t[0x2f..0x37], &0x0100_0200u64.to_le_bytes());
        assert_eq!(&t[0x37..0x39], &[0xff, 0xe0], "jmp *%rax");
        // lgdt's rip-relative operand and the lea's target land where they should.
        assert_eq!(8 + u32_at(&t, 4) as usize, 0x62);
        assert_eq!(0x1e + u32_at(&t, 0x1a) as usize, 0x23);
        assert_eq!(le16(&t, 0x62), Some(0x1f));
        assert_eq!(le64(&t, 0x64), Some(0x4000_0040), "GDT base is physical");
        assert_eq!(
            le64(&t, 0x50),
            Some(0x00af_9a00_0000_ffff),
            "__BOOT_CS 64-bit code"
        );
        assert_eq!(
            le64(&t, 0x58),
            Some(0x00cf_9200_0000_ffff),
            "__BOOT_DS data"
        );
    }

    #[test]
    fn reports_no_room_and_bad_cmdlines() {
        let img = fake_bzimage(1 << 20, 8 << 20);
        let tiny = [E820Entry {
            addr: 0x100_0000,
            size: 4 << 20,
            kind: E820_RAM,
        }];
        let e = plan_x86_64(&img, None, "x", &inputs(&tiny)).expect_err("no room");
        assert!(matches!(e, Error::NoRoom { .. }), "{e}");
        let m = qemu_memmap();
        let long = "x".repeat(0x800);
        let e = plan_x86_64(&img, None, &long, &inputs(&m)).expect_err("long");
        assert!(e.to_string().contains("cmdline_size"), "{e}");
        // An initrd the RAM below initrd_addr_max cannot hold.
        let huge = vec![0u8; 1 << 30];
        let e = plan_x86_64(&img, Some(&huge), "x", &inputs(&m)).expect_err("initrd");
        assert!(matches!(e, Error::NoRoom { .. }), "{e}");
        let many: Vec<E820Entry> = (0..200u64)
            .map(|i| E820Entry {
                addr: i << 30,
                size: 1 << 30,
                kind: E820_RAM,
            })
            .collect();
        let e = plan_x86_64(&img, None, "x", &inputs(&many)).expect_err("too many");
        assert!(e.to_string().contains("128"), "{e}");
    }

    #[test]
    fn initrd_goes_below_the_kernel_when_only_that_fits() {
        let img = fake_bzimage(1 << 20, 8 << 20);
        // One range: the kernel takes 16 MiB.., so the initrd must go lower.
        let m = [E820Entry {
            addr: 0x10_0000,
            size: (16 << 20) + (9 << 20),
            kind: E820_RAM,
        }];
        let initrd = vec![1u8; 4 << 20];
        let plan = plan_x86_64(&img, Some(&initrd), "c", &inputs(&m)).expect("plan");
        check_layout(&plan, &m);
        assert!(seg(&plan, "initrd").mem < seg(&plan, "kernel").mem);
    }

    #[test]
    fn a_bios_booted_kernel_takes_kexec_load_first_with_this_plan() {
        let img = fake_bzimage(1 << 20, 8 << 20);
        let m = qemu_memmap();
        let bios = Preflight::default();
        let ctx = |pre| LoadContext {
            arch: Arch::X86_64,
            preflight: pre,
            arm64: None,
            x86_64: Some(inputs(&m)),
        };
        let mut k = DryRun::default();
        let l = load(&mut k, &ctx(&bios), &img, Some(b"initrd"), "console=ttyS0").expect("loads");
        assert_eq!(l.path, "kexec_load");
        assert!(l.reason.contains("BIOS-booted"), "{}", l.reason);
        let [Call::Load(plan)] = &k.calls[..] else {
            panic!("only kexec_load is called: {:?}", k.calls)
        };
        check_layout(plan, &m);

        // kexec_load refused for any reason: kexec_file_load, and the reason says why.
        for errno in [libc::ENOSYS, libc::EPERM, libc::EINVAL] {
            let mut k = DryRun {
                load_errno: errno,
                ..DryRun::default()
            };
            let l = load(&mut k, &ctx(&bios), &img, None, "c").expect("file load");
            assert_eq!(l.path, "kexec_file_load");
            assert!(l.reason.contains(errno_name(errno)), "{}", l.reason);
            assert!(matches!(
                k.calls[..],
                [Call::Load(_), Call::FileLoad { .. }]
            ));
        }
        // Both refused: one error naming both.
        let mut k = DryRun {
            load_errno: libc::ENOSYS,
            file_load_errno: libc::ENOEXEC,
            ..DryRun::default()
        };
        let e = load(&mut k, &ctx(&bios), &img, None, "c").expect_err("both fail");
        let msg = e.to_string();
        assert!(matches!(e, Error::BothFailed { .. }), "{msg}");
        assert!(
            msg.contains("SYS_kexec_load") && msg.contains("SYS_kexec_file_load"),
            "{msg}"
        );
        assert_eq!(k.calls.len(), 2, "no third attempt");

        // The test knob skips kexec_load.
        let mut inner = DryRun::default();
        let mut forced = crate::kexec::ForceKexecFileLoad(&mut inner);
        let l = load(&mut forced, &ctx(&bios), &img, None, "c").expect("file load");
        assert_eq!(l.path, "kexec_file_load");
        assert!(
            l.reason.contains("test_force_kexec_file_load"),
            "{}",
            l.reason
        );
        assert!(matches!(inner.calls[..], [Call::FileLoad { .. }]));
    }

    #[test]
    fn efi_booted_and_locked_down_kernels_keep_kexec_file_load_first() {
        let img = fake_bzimage(1 << 20, 8 << 20);
        let m = qemu_memmap();
        let efi = Preflight {
            efi: true,
            ..Preflight::default()
        };
        let locked = Preflight {
            lockdown: Some("integrity".into()),
            ..Preflight::default()
        };
        let ctx = |pre| LoadContext {
            arch: Arch::X86_64,
            preflight: pre,
            arm64: None,
            x86_64: Some(inputs(&m)),
        };
        for pre in [&efi, &locked] {
            let mut k = DryRun::default();
            let l = load(&mut k, &ctx(pre), &img, None, "c").expect("loads");
            assert_eq!(l.path, "kexec_file_load");
            assert!(
                matches!(k.calls[..], [Call::FileLoad { .. }]),
                "{:?}",
                k.calls
            );
        }
        let mut k = DryRun::default();
        let l = load(&mut k, &ctx(&efi), &img, None, "c").expect("loads");
        assert!(l.reason.contains("EFI-booted"), "{}", l.reason);

        // EFI-booted: the kexec_load fallback as before, on a format error only.
        let mut inner = DryRun::default();
        let mut forced = crate::kexec::ForceKexecLoad(&mut inner);
        let l = load(
            &mut forced,
            &ctx(&efi),
            &img,
            Some(b"initrd"),
            "console=ttyS0",
        )
        .expect("loads");
        assert_eq!(l.path, "kexec_load");
        assert!(l.reason.contains("ENOSYS"), "{}", l.reason);
        let [Call::Load(plan)] = &inner.calls[..] else {
            panic!("kexec_file_load was not called: {:?}", inner.calls)
        };
        check_layout(plan, &m);
        let mut k = DryRun {
            file_load_errno: libc::EPERM,
            ..DryRun::default()
        };
        assert!(load(&mut k, &ctx(&efi), &img, None, "c").is_err());
        assert_eq!(k.calls.len(), 1, "a policy refusal does not fall back");
        // Locked down: no unsigned fallback at all.
        let mut k = DryRun {
            file_load_errno: libc::ENOSYS,
            ..DryRun::default()
        };
        let e = load(&mut k, &ctx(&locked), &img, None, "c").expect_err("locked down");
        assert!(matches!(e, Error::LockedDown { .. }), "{e}");
        assert_eq!(k.calls.len(), 1);
    }

    fn entry() -> impl Strategy<Value = E820Entry> {
        (
            any::<u64>(),
            any::<u64>(),
            prop_oneof![Just(1u32), Just(2u32), any::<u32>()],
        )
            .prop_map(|(addr, size, kind)| E820Entry { addr, size, kind })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let m = qemu_memmap();
            let _ = bzimage_header(&bytes);
            let _ = plan_x86_64(&bytes, Some(&bytes), "c", &inputs(&m));
        }

        #[test]
        fn a_corrupted_header_never_panics(
            patches in proptest::collection::vec((0x1f1usize..0x270, any::<u8>()), 1..16),
            memmap in proptest::collection::vec(entry(), 0..8),
        ) {
            let mut img = fake_bzimage(8192, 1 << 22);
            for (o, b) in patches {
                img[o] = b;
            }
            if let Ok(plan) = plan_x86_64(&img, Some(b"initrd"), "c", &inputs(&memmap)) {
                check_layout(&plan, &memmap);
            }
        }

        #[test]
        fn any_plan_that_succeeds_is_laid_out_right(
            memmap in proptest::collection::vec(entry(), 0..8),
            initrd_len in 0usize..(1 << 16),
        ) {
            let img = fake_bzimage(8192, 1 << 22);
            let initrd = vec![7u8; initrd_len];
            if let Ok(plan) = plan_x86_64(&img, Some(&initrd), "c", &inputs(&memmap)) {
                check_layout(&plan, &memmap);
            }
        }

        #[test]
        fn memmap_parsing_never_panics(a in "\\PC{0,24}", b in "\\PC{0,24}", t in "\\PC{0,24}") {
            let _ = parse_memmap_entry(&a, &b, &t);
        }
    }
}
