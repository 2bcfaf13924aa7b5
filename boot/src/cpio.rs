//! A streaming cpio "newc" writer, the format Linux unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Every entry gets a fresh inode number, uid/gid 0 and mtime 0, so the same
//! inputs give the same bytes. Concatenated archives are valid initramfs
//! images too: the kernel unpacks them in order.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes a newc archive to any `Write`.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

/// The kernel's `PATH_MAX`: it silently skips an entry whose name (with its
/// NUL) or symlink target is longer (init/initramfs.c).
pub const PATH_MAX: usize = 4096;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The name as stored (leading `/` removed), or why the kernel would not
/// unpack it as the entry asked for.
fn entry_name(path: &str) -> io::Result<&str> {
    let name = path.trim_start_matches('/');
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.contains('\0') {
        "it contains a NUL byte"
    } else if name.len() + 1 > PATH_MAX {
        "it is longer than the kernel's PATH_MAX (4096 bytes with its NUL)"
    } else if name == TRAILER {
        "it is the end-of-archive marker: a reader would stop there"
    } else {
        return Ok(name);
    };
    Err(invalid(format!("bad cpio entry name {path:?}: {reason}")))
}

impl<W: Write> Writer<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.raw(&[0u8; 3][..n])
    }

    /// Writes an entry's header; `h.name` is already checked (or the trailer).
    fn header(&mut self, h: Header<'_>) -> io::Result<()> {
        let name = h.name;
        let ino = if h.name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime
            h.size,
            0, // devmajor
            0, // devminor
            h.rdev.0,
            h.rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut head = String::with_capacity(110);
        head.push_str(MAGIC);
        for f in fields {
            head.push_str(&format!("{f:08x}"));
        }
        self.raw(head.as_bytes())?;
        self.raw(name.as_bytes())?;
        self.raw(&[0])?;
        self.pad4()
    }

    /// Adds a directory (parents are not created implicitly).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.header(Header {
            name: entry_name(path)?,
            mode: S_IFDIR | (perm & 0o7777),
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        })
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let name = entry_name(path)?;
        let size = u32::try_from(data.len())
            .map_err(|_| invalid(format!("{path}: {} bytes is too big for cpio", data.len())))?;
        self.header(Header {
            name,
            mode: S_IFREG | (perm & 0o7777),
            nlink: 1,
            size,
            rdev: (0, 0),
        })?;
        self.raw(data)?;
        self.pad4()
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let name = entry_name(path)?;
        if target.is_empty() || target.contains('\0') || target.len() + 1 > PATH_MAX {
            return Err(invalid(format!(
                "bad symlink target {target:?} for {path:?}: want 1 to {} bytes, no NUL",
                PATH_MAX - 1
            )));
        }
        self.header(Header {
            name,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            size: target.len() as u32,
            rdev: (0, 0),
        })?;
        self.raw(target.as_bytes())?;
        self.pad4()
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1).
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(Header {
            name: entry_name(path)?,
            mode: S_IFCHR | (perm & 0o7777),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer, pads to 512 bytes and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(Header {
            name: TRAILER,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        })?;
        let n = ((512 - self.written % 512) % 512) as usize;
        self.raw(&vec![0u8; n])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        w.dir("dev", 0o755).expect("dir");
        w.char_dev("dev/console", 0o600, 5, 1).expect("dev");
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n")
            .expect("file");
        w.file("empty", 0o644, b"").expect("file");
        w.symlink("bin/sh", "busybox").expect("symlink");
        w.finish().expect("finish")
    }

    #[test]
    fn layout_is_aligned_and_deterministic() {
        let a = sample();
        assert_eq!(a, sample());
        assert_eq!(a.len() % 512, 0);
        assert!(a.starts_with(b"070701"));
        let trailer = a
            .windows(TRAILER.len())
            .position(|w| w == TRAILER.as_bytes())
            .expect("trailer");
        // The trailer's header starts 110 bytes before its name, 4-aligned.
        assert_eq!((trailer - 110) % 4, 0);
    }

    fn gnu_cpio(args: &[&str], input: &[u8]) -> Option<String> {
        let mut child = Command::new("cpio")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("feed cpio");
        let out = child.wait_with_output().expect("cpio runs");
        assert!(out.status.success(), "cpio {args:?} failed");
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[test]
    fn gnu_cpio_lists_it() {
        let Some(names) = gnu_cpio(&["-t", "--quiet"], &sample()) else {
            eprintln!("SKIP: GNU cpio is not installed");
            return;
        };
        assert_eq!(
            names.lines().collect::<Vec<_>>(),
            ["dev", "dev/console", "init", "empty", "bin/sh"]
        );
        let long = gnu_cpio(&["-tv", "--quiet"], &sample()).expect("cpio");
        let modes: Vec<&str> = long
            .lines()
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        assert_eq!(
            modes,
            [
                "drwxr-xr-x",
                "crw-------",
                "-rwxr-xr-x",
                "-rw-r--r--",
                "lrwxrwxrwx"
            ],
            "{long}"
        );
        assert!(long.contains("bin/sh -> busybox"), "{long}");
    }

    #[test]
    fn rejects_empty_names() {
        let mut w = Writer::new(Vec::new());
        assert!(w.file("/", 0o644, b"x").is_err());
    }

    #[test]
    fn refuses_names_a_reader_would_misread() {
        let long = "a".repeat(PATH_MAX);
        let ok_long = "a".repeat(PATH_MAX - 1);
        for (name, why) in [
            ("TRAILER!!!", "end-of-archive"),
            ("/TRAILER!!!", "end-of-archive"),
            ("", "empty"),
            ("//", "empty"),
            ("a\0b", "NUL"),
            (long.as_str(), "PATH_MAX"),
        ] {
            let mut w = Writer::new(Vec::new());
            let errors = [
                w.file(name, 0o644, b"x").expect_err("file"),
                w.dir(name, 0o755).expect_err("dir"),
                w.symlink(name, "x").expect_err("symlink"),
                w.char_dev(name, 0o600, 5, 1).expect_err("char_dev"),
            ];
            for e in errors {
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
                assert!(e.to_string().contains(why), "{name:?}: {e}");
            }
            assert_eq!(w.written(), 0, "{name:?}: nothing written");
        }
        let mut w = Writer::new(Vec::new());
        w.file(&ok_long, 0o644, b"x")
            .expect("4095 bytes + NUL fits");
        w.file("TRAILER!!!x", 0o644, b"x")
            .expect("only the exact marker");
        for target in ["", "a\0b", long.as_str()] {
            let mut w = Writer::new(Vec::new());
            let e = w.symlink("l", target).expect_err("target");
            assert!(e.to_string().contains("symlink target"), "{e}");
        }
        let mut w = Writer::new(Vec::new());
        w.symlink("l", &ok_long)
            .expect("4095-byte target + NUL fits");
    }
}
