//! The carried store (the top-level DESIGN.md, decision 6): before kexec the first stage
//! appends a cpio newc archive holding the signed manifest, the first stage's
//! `phase.*` parameters and every verified chunk to the target's initramfs.
//! Linux unpacks concatenated archives into one rootfs, so the booted system
//! finds them under [`CARRIED_DIR`] and can serve what it booted from without
//! fetching it again.
//!
//! Layout (inside the target's rootfs):
//! - `var/lib/plasmd/carried/manifest.json`: the signed envelope, as fetched;
//! - `var/lib/plasmd/carried/params`: the first stage's `phase.*` parameters
//!   (cmdline syntax), so the target knows the pinned key, channel and arch
//!   without trusting its own, publisher-signed, command line for them; its
//!   `phase.min_sequence=` is the high-water mark (the carried manifest's
//!   sequence, or the first stage's `phase.min_sequence` if higher), and a
//!   store whose manifest is older is refused;
//! - `var/lib/plasmd/carried/chunks/HEX`: one file per chunk.
//!
//! The appended archive is uncompressed and starts on a 4-byte boundary of
//! the whole initrd (the kernel's unpacker skips zero padding between
//! archives but insists on that alignment for a `070701` header).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use phase_boot::cmdline::{self, PhaseConfig};
use phase_boot::cpio;
use phase_content::{ChunkStore, Hash, MemStore, SignedManifest};

/// Where the carried store lives in the target's rootfs (no leading slash:
/// cpio paths are relative).
pub(crate) const CARRIED_DIR: &str = "var/lib/plasmd/carried";

/// The `phase.*` parameters of `cmdline`, in cmdline syntax, to carry, with
/// `phase.min_sequence=` set to the high-water mark `high`.
pub(crate) fn phase_params(cmdline: &str, high: u64) -> String {
    let mut words: Vec<String> = cmdline::split(cmdline)
        .into_iter()
        .filter(|p| p.key.starts_with("phase."))
        .filter(|p| p.key.replace('-', "_") != "phase.min_sequence")
        .map(|p| match p.value {
            Some(v) => format!("{}={v}", p.key),
            None => p.key.to_owned(),
        })
        .collect();
    words.push(format!("phase.min_sequence={high}"));
    words.join(" ")
}

/// The target's initrd in a memfd, ready for `kexec_file_load` (see
/// [`write_target_initrd`]); returns it and the carried archive's length.
pub(crate) fn target_initrd(
    manifest: &SignedManifest,
    store: &dyn ChunkStore,
    params: &str,
) -> anyhow::Result<(std::fs::File, u64)> {
    let mut fd = phase_boot::kexec::memfd("initrd").context("a memfd for the target initrd")?;
    // Chunks are large and go straight through; the buffer only gathers
    // the archive's small headers into fewer writes.
    let out = std::io::BufWriter::with_capacity(64 << 10, &mut fd);
    let (_, carried) = write_target_initrd(manifest, store, params, out)?;
    Ok((fd, carried))
}

/// Writes the target's initrd to `out` in one pass: the manifest's
/// `initramfs` chunk by chunk from `store` (if it has one), zero padding to
/// a 4-byte boundary, then the carried archive (the manifest, `params` and
/// every chunk the manifest lists, each read from `store`, which only holds
/// verified chunks). No artifact is gathered into a buffer on the way:
/// every chunk goes from the store to `out` once. Returns the bytes written
/// and the carried archive's length.
pub(crate) fn write_target_initrd<W: Write>(
    manifest: &SignedManifest,
    store: &dyn ChunkStore,
    params: &str,
    out: W,
) -> anyhow::Result<(u64, u64)> {
    let mut out = Counted { inner: out, n: 0 };
    if let Some(a) = manifest.manifest().artifact("initramfs") {
        phase_content::write_chunks(store, a, &mut out).context("writing the initramfs")?;
    }
    let pad = usize::try_from((4 - out.n % 4) % 4).unwrap_or(0);
    out.write_all(&[0u8; 3][..pad])
        .context("writing the initrd padding")?;
    let base = out.n;
    write_archive(&mut out, manifest, store, params)?;
    out.flush().context("writing the target initrd")?;
    Ok((out.n, out.n - base))
}

/// A writer that counts what it passes on.
struct Counted<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the carried archive to `out`.
fn write_archive<W: Write>(
    out: W,
    manifest: &SignedManifest,
    store: &dyn ChunkStore,
    params: &str,
) -> anyhow::Result<()> {
    let mut w = cpio::Writer::new(out);
    let mut path = String::new();
    for part in CARRIED_DIR.split('/') {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(part);
        w.dir(&path, 0o755)?;
    }
    w.dir(&format!("{CARRIED_DIR}/chunks"), 0o755)?;
    w.file(
        &format!("{CARRIED_DIR}/manifest.json"),
        0o644,
        manifest.envelope(),
    )?;
    w.file(
        &format!("{CARRIED_DIR}/params"),
        0o644,
        format!("{params}\n").as_bytes(),
    )?;
    for hash in unique_chunks(manifest) {
        let data = store
            .get(&hash)?
            .with_context(|| format!("chunk {hash} is not in the store; cannot carry it"))?;
        w.file(&format!("{CARRIED_DIR}/chunks/{hash}"), 0o644, &data)?;
    }
    w.finish()?;
    Ok(())
}

fn unique_chunks(manifest: &SignedManifest) -> Vec<Hash> {
    let mut seen = std::collections::HashSet::new();
    manifest
        .manifest()
        .artifacts
        .iter()
        .flat_map(|a| a.chunks.iter().copied())
        .filter(|h| seen.insert(*h))
        .collect()
}

/// A carried store, checked: the manifest verifies against the carried pinned
/// key and every chunk it lists is present and hashes right.
pub(crate) struct Carried {
    pub(crate) manifest: SignedManifest,
    pub(crate) store: MemStore,
    pub(crate) params: PhaseConfig,
    /// The raw `params` line (test knobs are read from it).
    pub(crate) raw_params: String,
    pub(crate) chunks: usize,
    pub(crate) bytes: u64,
}

/// Refuses `m` if it is older than `floor` (`why` says what set it).
pub(crate) fn check_floor(m: &SignedManifest, floor: Option<u64>, why: &str) -> anyhow::Result<()> {
    let mm = m.manifest();
    match floor {
        Some(f) if mm.sequence < f => anyhow::bail!(
            "refusing the carried {}/{} manifest sequence {}: older than sequence {f} ({why}); \
             not serving it",
            mm.channel,
            mm.arch,
            mm.sequence
        ),
        _ => Ok(()),
    }
}

/// Whether `root` (the rootfs, `/` in the target) holds a carried store.
pub(crate) fn present(root: &Path) -> bool {
    root.join(CARRIED_DIR).join("manifest.json").is_file()
}

/// Loads and checks the carried store under `root`.
pub(crate) fn load(root: &Path) -> anyhow::Result<Carried> {
    let dir = root.join(CARRIED_DIR);
    let raw_params = std::fs::read_to_string(dir.join("params"))
        .with_context(|| format!("reading {}/params", dir.display()))?;
    let (params, _warnings) = PhaseConfig::parse(raw_params.trim())
        .with_context(|| format!("parsing the carried parameters {:?}", raw_params.trim()))?;
    let pubkey = params.pubkey.context(
        "the carried parameters hold no phase.pubkey: the first stage must pin a key to carry",
    )?;
    let bytes = std::fs::read(dir.join("manifest.json"))
        .with_context(|| format!("reading {}/manifest.json", dir.display()))?;
    let manifest = SignedManifest::verify(&bytes, &pubkey).with_context(|| {
        format!("the carried manifest does not verify against the carried key {pubkey}")
    })?;
    check_floor(
        &manifest,
        params.min_sequence,
        "the carried high-water mark",
    )?;
    let store = MemStore::new();
    let mut total = 0u64;
    let hashes = unique_chunks(&manifest);
    for hash in &hashes {
        let path = dir.join("chunks").join(hash.to_string());
        let data = std::fs::read(&path)
            .with_context(|| format!("carried chunk {} is missing", path.display()))?;
        store
            .put(hash, &data)
            .with_context(|| format!("carried chunk {}", path.display()))?;
        total += data.len() as u64;
        // The chunk now lives in the store; free the rootfs copy.
        let _ = std::fs::remove_file(&path);
    }
    Ok(Carried {
        manifest,
        store,
        params,
        raw_params: raw_params.trim().to_owned(),
        chunks: hashes.len(),
        bytes: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use phase_content::publish::{PublishOptions, publish_dir};

    #[test]
    fn params_keep_only_phase_keys() {
        assert_eq!(
            phase_params(
                "console=ttyS0 phase.pubkey=ab phase.linger=3 quiet phase.x",
                4
            ),
            "phase.pubkey=ab phase.linger=3 phase.x phase.min_sequence=4"
        );
        // The high-water mark replaces the first stage's own minimum.
        assert_eq!(
            phase_params("phase.min-sequence=2 phase.pubkey=ab", 9),
            "phase.pubkey=ab phase.min_sequence=9"
        );
    }

    /// Unpacks a newc archive (regular files and directories) under `root`.
    fn unpack(mut buf: &[u8], root: &Path) {
        let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let pad = |n: usize| (4 - n % 4) % 4;
        loop {
            assert_eq!(&buf[..6], b"070701");
            let mode = hex(&buf[14..22]);
            let size = hex(&buf[54..62]);
            let namesize = hex(&buf[94..102]);
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1]).unwrap();
            let off = 110 + namesize + pad(110 + namesize);
            let data = &buf[off..off + size];
            if name == "TRAILER!!!" {
                return;
            }
            if mode & 0o170000 == 0o040000 {
                std::fs::create_dir_all(root.join(name)).unwrap();
            } else {
                std::fs::write(root.join(name), data).unwrap();
            }
            buf = &buf[off + size + pad(size)..];
        }
    }

    #[test]
    fn a_carried_archive_unpacks_to_a_store_that_loads() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("artifacts/stable/x86_64");
        std::fs::create_dir_all(&a).unwrap();
        let kernel: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(a.join("kernel"), &kernel).unwrap();
        // Not a multiple of 4: the carried archive starts after padding.
        std::fs::write(a.join("initramfs"), vec![2u8; 5001]).unwrap();
        let fs = phase_content::FsStore::open(t.path().join("store")).unwrap();
        let key = phase_content::SecretKey::from_seed([9; 32]);
        let opts = PublishOptions::default().with_chunk_size(64 << 10);
        let m = publish_dir(&key, &t.path().join("artifacts"), &fs, &opts)
            .unwrap()
            .remove(0)
            .manifest;
        let params = format!("phase.pubkey={} phase.test_liar=1", key.public());
        let mut whole = Vec::new();
        let (total, carried) = write_target_initrd(&m, &fs, &params, &mut whole).unwrap();
        assert_eq!(total, whole.len() as u64);
        assert_eq!(&whole[..5001], &[2u8; 5001][..], "the initramfs first");
        assert_eq!(&whole[5001..5004], &[0, 0, 0], "padding to 4 bytes");
        assert_eq!(whole.len() as u64, 5004 + carried);
        // The memfd PID 1 hands to kexec_file_load holds the same bytes.
        let (mut fd, in_fd) = target_initrd(&m, &fs, &params).unwrap();
        assert_eq!(in_fd, carried);
        let mut back = Vec::new();
        std::io::Seek::rewind(&mut fd).unwrap();
        std::io::Read::read_to_end(&mut fd, &mut back).unwrap();
        assert!(back == whole, "the memfd differs from the written initrd");
        // A chunk the store lacks is a clear error, not a short initrd.
        let kernel_artifact = m.manifest().artifact("kernel").unwrap();
        let e = phase_content::write_chunks(&MemStore::new(), kernel_artifact, std::io::sink())
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("chunk 0 (") && format!("{e:#}").contains("not in the store"),
            "{e:#}"
        );
        let cpio = whole[5004..].to_vec();
        assert_eq!(&cpio[..6], b"070701");
        let root = t.path().join("root");
        unpack(&cpio, &root);
        assert!(present(&root));
        let c = load(&root).unwrap();
        assert_eq!(c.manifest.root(), m.root());
        assert_eq!(c.chunks, 6);
        assert_eq!(c.bytes, 305_001);
        assert!(c.raw_params.contains("phase.test_liar=1"));

        // A store whose manifest is below its carried high-water mark is refused.
        unpack(&cpio, &root);
        let seq = m.manifest().sequence;
        std::fs::write(
            root.join(CARRIED_DIR).join("params"),
            phase_params(&format!("phase.pubkey={}", key.public()), seq + 1),
        )
        .unwrap();
        let e = format!("{:#}", load(&root).err().unwrap());
        assert!(
            e.contains(&format!("sequence {seq}: older than sequence {}", seq + 1)),
            "{e}"
        );

        // A wrong pinned key in the carried parameters is refused.
        unpack(&cpio, &root);
        let other = phase_content::SecretKey::from_seed([1; 32]).public();
        std::fs::write(
            root.join(CARRIED_DIR).join("params"),
            format!("phase.pubkey={other}\n"),
        )
        .unwrap();
        let e = load(&root).err().unwrap();
        assert!(format!("{e:#}").contains("does not verify"), "{e:#}");
    }
}
