//! Flattened device tree: parse into a tree, edit, encode again; and the
//! `/chosen` patch a kexec'd arm64 kernel needs.
//!
//! Hand-written (about 200 lines) rather than a crate: `fdt` 0.1 is read-only
//! and panics on some malformed blobs, and `vm-fdt` refuses node names that
//! real firmware emits (`__symbols__`). Parsing here is bounded and never
//! panics: a bad blob is an [`Error::Dtb`].

use crate::Error;

const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;
const MAX_DEPTH: usize = 64;

/// The largest DTB an arm64 kernel accepts (Documentation/arch/arm64/booting.rst).
pub const MAX_DTB: usize = 2 << 20;

/// One device tree node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    /// Node name with unit address (`memory@40000000`); empty for the root.
    pub name: String,
    /// Properties in order.
    pub props: Vec<(String, Vec<u8>)>,
    /// Child nodes in order.
    pub children: Vec<Node>,
}

impl Node {
    /// A property's value.
    pub fn prop(&self, name: &str) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Sets (replaces or appends) a property.
    pub fn set_prop(&mut self, name: &str, value: Vec<u8>) {
        match self.props.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value,
            None => self.props.push((name.to_owned(), value)),
        }
    }

    /// Removes a property; returns whether it was there.
    pub fn remove_prop(&mut self, name: &str) -> bool {
        let before = self.props.len();
        self.props.retain(|(n, _)| n != name);
        self.props.len() != before
    }

    /// A direct child by name.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// A direct child by name, created when missing.
    pub fn child_mut_or_insert(&mut self, name: &str) -> &mut Node {
        let i = match self.children.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.children.push(Node {
                    name: name.to_owned(),
                    ..Node::default()
                });
                self.children.len() - 1
            }
        };
        &mut self.children[i]
    }
}

/// A whole device tree blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fdt {
    /// `boot_cpuid_phys` from the header.
    pub boot_cpuid: u32,
    /// The memory reservation block: (address, size).
    pub reserved: Vec<(u64, u64)>,
    /// The root node.
    pub root: Node,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Dtb {
        reason: reason.into(),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Result<u32, Error> {
        let s = self
            .b
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| bad("structure block ends early"))?;
        self.pos += 4;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let s = self
            .b
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or_else(|| bad("property runs past the structure block"))?;
        self.pos = (self.pos + n + 3) & !3;
        Ok(s)
    }
    fn cstr(&mut self) -> Result<&'a str, Error> {
        let rest = self.b.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| bad("unterminated node name"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| bad("node name is not UTF-8"))?;
        self.pos = (self.pos + n + 1 + 3) & !3;
        Ok(s)
    }
}

fn be32(b: &[u8], off: usize) -> Result<u32, Error> {
    b.get(off..off + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad("header truncated"))
}

fn be64(b: &[u8], off: usize) -> Result<u64, Error> {
    Ok(((be32(b, off)? as u64) << 32) | be32(b, off + 4)? as u64)
}

fn string_at(strings: &[u8], off: usize) -> Result<String, Error> {
    let rest = strings
        .get(off..)
        .ok_or_else(|| bad("property name offset out of range"))?;
    let n = rest
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| bad("unterminated property name"))?;
    String::from_utf8(rest[..n].to_vec()).map_err(|_| bad("property name is not UTF-8"))
}

impl Fdt {
    /// Parses a blob; trailing bytes past `totalsize` are ignored (the kernel's
    /// `/sys/firmware/fdt` may be padded).
    pub fn parse(blob: &[u8]) -> Result<Fdt, Error> {
        if be32(blob, 0)? != MAGIC {
            return Err(bad("bad magic (not a device tree blob)"));
        }
        let total = be32(blob, 4)? as usize;
        if total > blob.len() || total < 40 {
            return Err(bad(format!(
                "totalsize {total} but {} bytes available",
                blob.len()
            )));
        }
        let blob = &blob[..total];
        let off_struct = be32(blob, 8)? as usize;
        let off_strings = be32(blob, 12)? as usize;
        let off_rsv = be32(blob, 16)? as usize;
        let version = be32(blob, 20)?;
        if version < 16 {
            return Err(bad(format!("version {version} is too old")));
        }
        let boot_cpuid = be32(blob, 28)?;
        let size_strings = be32(blob, 32)? as usize;
        let size_struct = if version >= 17 {
            be32(blob, 36)? as usize
        } else {
            total.saturating_sub(off_struct)
        };
        let strings = blob
            .get(off_strings..off_strings.saturating_add(size_strings))
            .ok_or_else(|| bad("strings block out of range"))?;
        let structure = blob
            .get(off_struct..off_struct.saturating_add(size_struct))
            .ok_or_else(|| bad("structure block out of range"))?;

        let mut reserved = Vec::new();
        let mut off = off_rsv;
        loop {
            let (a, s) = (be64(blob, off)?, be64(blob, off + 8)?);
            if a == 0 && s == 0 {
                break;
            }
            reserved.push((a, s));
            off += 16;
        }

        let mut r = Reader {
            b: structure,
            pos: 0,
        };
        let mut stack: Vec<Node> = Vec::new();
        let mut root = None;
        loop {
            match r.u32()? {
                BEGIN_NODE => {
                    if root.is_some() {
                        return Err(bad("more than one root node"));
                    }
                    if stack.len() >= MAX_DEPTH {
                        return Err(bad("nodes nested too deeply"));
                    }
                    let name = r.cstr()?.to_owned();
                    stack.push(Node {
                        name,
                        ..Node::default()
                    });
                }
                END_NODE => {
                    let n = stack.pop().ok_or_else(|| bad("unbalanced end of node"))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(n),
                        None => root = Some(n),
                    }
                }
                PROP => {
                    let len = r.u32()? as usize;
                    let name = string_at(strings, r.u32()? as usize)?;
                    let value = r.bytes(len)?.to_vec();
                    stack
                        .last_mut()
                        .ok_or_else(|| bad("property outside any node"))?
                        .props
                        .push((name, value));
                }
                NOP => {}
                END => break,
                t => return Err(bad(format!("unknown structure token {t:#x}"))),
            }
        }
        if !stack.is_empty() {
            return Err(bad("unterminated node"));
        }
        let root = root.ok_or_else(|| bad("no root node"))?;
        Ok(Fdt {
            boot_cpuid,
            reserved,
            root,
        })
    }

    /// Encodes the tree as a version 17 blob.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut strings: Vec<u8> = Vec::new();
        let mut offsets: std::collections::HashMap<String, u32> = Default::default();
        let mut st: Vec<u8> = Vec::new();
        fn pad(v: &mut Vec<u8>) {
            while !v.len().is_multiple_of(4) {
                v.push(0);
            }
        }
        fn node(
            n: &Node,
            st: &mut Vec<u8>,
            strings: &mut Vec<u8>,
            offsets: &mut std::collections::HashMap<String, u32>,
        ) {
            st.extend_from_slice(&BEGIN_NODE.to_be_bytes());
            st.extend_from_slice(n.name.as_bytes());
            st.push(0);
            pad(st);
            for (name, value) in &n.props {
                let off = *offsets.entry(name.clone()).or_insert_with(|| {
                    let o = strings.len() as u32;
                    strings.extend_from_slice(name.as_bytes());
                    strings.push(0);
                    o
                });
                st.extend_from_slice(&PROP.to_be_bytes());
                st.extend_from_slice(&(value.len() as u32).to_be_bytes());
                st.extend_from_slice(&off.to_be_bytes());
                st.extend_from_slice(value);
                pad(st);
            }
            for c in &n.children {
                node(c, st, strings, offsets);
            }
            st.extend_from_slice(&END_NODE.to_be_bytes());
        }
        node(&self.root, &mut st, &mut strings, &mut offsets);
        st.extend_from_slice(&END.to_be_bytes());

        let off_rsv = 40usize;
        let off_struct = off_rsv + 16 * (self.reserved.len() + 1);
        let off_strings = off_struct + st.len();
        let total = off_strings + strings.len();
        let mut out = Vec::with_capacity(total);
        for v in [
            MAGIC,
            total as u32,
            off_struct as u32,
            off_strings as u32,
            off_rsv as u32,
            17,
            16,
            self.boot_cpuid,
            strings.len() as u32,
            st.len() as u32,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for &(a, s) in self.reserved.iter().chain(std::iter::once(&(0, 0))) {
            out.extend_from_slice(&a.to_be_bytes());
            out.extend_from_slice(&s.to_be_bytes());
        }
        out.extend_from_slice(&st);
        out.extend_from_slice(&strings);
        out
    }

    /// A node by absolute path (`/chosen`).
    pub fn node(&self, path: &str) -> Option<&Node> {
        let mut n = &self.root;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            n = n.child(part)?;
        }
        Some(n)
    }
}

/// What the next kernel must find in `/chosen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenPatch<'a> {
    /// New `bootargs`.
    pub bootargs: &'a str,
    /// Physical `[start, end)` of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// A fresh `kaslr-seed` (0 only when no entropy is available).
    pub kaslr_seed: u64,
    /// Fresh bytes for `rng-seed`; `None` removes the property.
    pub rng_seed: Option<Vec<u8>>,
}

/// Patches `/chosen` for a kexec'd kernel: bootargs, the initrd range as
/// u64 big-endian cells, a fresh `kaslr-seed`, a refreshed or removed
/// `rng-seed`, and no crash-kernel leftovers. Fails if the result exceeds
/// [`MAX_DTB`].
pub fn patch_chosen(blob: &[u8], patch: &ChosenPatch<'_>) -> Result<Vec<u8>, Error> {
    let mut fdt = Fdt::parse(blob)?;
    let chosen = fdt.root.child_mut_or_insert("chosen");
    let mut args = patch.bootargs.as_bytes().to_vec();
    args.push(0);
    chosen.set_prop("bootargs", args);
    match patch.initrd {
        Some((start, end)) => {
            chosen.set_prop("linux,initrd-start", start.to_be_bytes().to_vec());
            chosen.set_prop("linux,initrd-end", end.to_be_bytes().to_vec());
        }
        None => {
            chosen.remove_prop("linux,initrd-start");
            chosen.remove_prop("linux,initrd-end");
        }
    }
    chosen.set_prop("kaslr-seed", patch.kaslr_seed.to_be_bytes().to_vec());
    match &patch.rng_seed {
        Some(seed) => chosen.set_prop("rng-seed", seed.clone()),
        None => {
            chosen.remove_prop("rng-seed");
        }
    }
    for stale in ["linux,elfcorehdr", "linux,usable-memory-range"] {
        chosen.remove_prop(stale);
    }
    let out = fdt.to_bytes();
    if out.len() > MAX_DTB {
        return Err(bad(format!(
            "patched DTB is {} bytes, over the {MAX_DTB}-byte limit",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small synthetic tree like QEMU's `virt` machine.
    pub(crate) fn synthetic() -> Vec<u8> {
        let mut chosen = Node {
            name: "chosen".into(),
            ..Node::default()
        };
        chosen.set_prop("bootargs", b"console=ttyAMA0\0".to_vec());
        chosen.set_prop("linux,initrd-start", 0x4800_0000u32.to_be_bytes().to_vec());
        chosen.set_prop("linux,initrd-end", 0x4810_0000u32.to_be_bytes().to_vec());
        chosen.set_prop("kaslr-seed", vec![0; 8]);
        chosen.set_prop("rng-seed", vec![0; 32]);
        let mut mem = Node {
            name: "memory@40000000".into(),
            ..Node::default()
        };
        mem.set_prop("device_type", b"memory\0".to_vec());
        let mut reg = Vec::new();
        reg.extend_from_slice(&0x4000_0000u64.to_be_bytes());
        reg.extend_from_slice(&0x2000_0000u64.to_be_bytes());
        mem.set_prop("reg", reg);
        let mut root = Node::default();
        root.set_prop("#address-cells", 2u32.to_be_bytes().to_vec());
        root.set_prop("#size-cells", 2u32.to_be_bytes().to_vec());
        root.children = vec![
            chosen,
            mem,
            Node {
                name: "__symbols__".into(),
                ..Node::default()
            },
        ];
        Fdt {
            boot_cpuid: 0,
            reserved: vec![(0x4000_0000, 0x1000)],
            root,
        }
        .to_bytes()
    }

    #[test]
    fn round_trips() {
        let blob = synthetic();
        let fdt = Fdt::parse(&blob).expect("parse");
        assert_eq!(fdt.to_bytes(), blob);
        let mut padded = blob.clone();
        padded.resize(1 << 20, 0);
        assert_eq!(Fdt::parse(&padded).expect("padded"), fdt);
    }

    #[test]
    fn patches_chosen() {
        let out = patch_chosen(
            &synthetic(),
            &ChosenPatch {
                bootargs: "console=ttyAMA0 token=abc",
                initrd: Some((0x4a00_0000, 0x4a12_3456)),
                kaslr_seed: 0x1122_3344_5566_7788,
                rng_seed: None,
            },
        )
        .expect("patch");
        let fdt = Fdt::parse(&out).expect("parse patched");
        let c = fdt.node("/chosen").expect("chosen");
        assert_eq!(
            c.prop("bootargs"),
            Some(&b"console=ttyAMA0 token=abc\0"[..])
        );
        assert_eq!(
            c.prop("linux,initrd-start"),
            Some(&0x4a00_0000u64.to_be_bytes()[..])
        );
        assert_eq!(
            c.prop("linux,initrd-end"),
            Some(&0x4a12_3456u64.to_be_bytes()[..])
        );
        assert_eq!(
            c.prop("kaslr-seed"),
            Some(&0x1122_3344_5566_7788u64.to_be_bytes()[..])
        );
        assert_eq!(c.prop("rng-seed"), None);
        assert!(fdt.node("/memory@40000000").is_some());
        assert_eq!(fdt.reserved, vec![(0x4000_0000, 0x1000)]);
    }

    #[test]
    fn creates_chosen_and_drops_initrd() {
        let mut fdt = Fdt::parse(&synthetic()).expect("parse");
        fdt.root.children.retain(|c| c.name != "chosen");
        let out = patch_chosen(
            &fdt.to_bytes(),
            &ChosenPatch {
                bootargs: "x",
                initrd: None,
                kaslr_seed: 1,
                rng_seed: Some(vec![9; 64]),
            },
        )
        .expect("patch");
        let fdt = Fdt::parse(&out).expect("parse");
        let c = fdt.node("/chosen").expect("chosen");
        assert_eq!(c.prop("linux,initrd-start"), None);
        assert_eq!(c.prop("rng-seed"), Some(&[9u8; 64][..]));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let blob = synthetic();
        for cut in [0, 3, 39, 40, 60, blob.len() / 2, blob.len() - 1] {
            assert!(Fdt::parse(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut evil = blob.clone();
        // Claim a huge property length in the first property.
        let off = be32(&blob, 8).expect("off") as usize;
        let at = off + 8 + 4; // BEGIN_NODE, "" + pad, PROP token
        evil[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Fdt::parse(&evil).is_err());
    }

    #[test]
    fn qemu_virt_dtb_fixture() {
        let blob = include_bytes!("../tests/data/qemu-virt.dtb");
        let fdt = Fdt::parse(blob).expect("parse QEMU's DTB");
        assert!(fdt.node("/chosen").is_some());
        assert!(
            fdt.root
                .children
                .iter()
                .any(|c| c.name.starts_with("memory@"))
        );
        // Re-encoding is stable and the patch keeps every node.
        let again = Fdt::parse(&fdt.to_bytes()).expect("re-parse");
        assert_eq!(again, fdt);
        let out = patch_chosen(
            blob,
            &ChosenPatch {
                bootargs: "console=ttyAMA0",
                initrd: Some((0x4800_0000, 0x4900_0000)),
                kaslr_seed: 42,
                rng_seed: Some(vec![1; 64]),
            },
        )
        .expect("patch");
        let patched = Fdt::parse(&out).expect("parse");
        assert_eq!(patched.root.children.len(), fdt.root.children.len());
        assert!(out.len() <= MAX_DTB);
    }
}
