//! Chunk stores: where verified chunks live.
//!
//! Every store checks a chunk's hash on the way in, so nothing unverified is
//! ever stored or served onward; [`FsStore`] checks again on the way out, so a
//! file corrupted on disk is caught and removed rather than passed on.

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use bytes::Bytes;

use crate::manifest::{Artifact, SignedManifest, valid_component};
use crate::{Error, Hash};

/// A content-addressed set of chunks.
pub trait ChunkStore: Send + Sync {
    /// Whether the chunk is present.
    fn has(&self, hash: &Hash) -> bool;
    /// The chunk's bytes, verified, or `None` when absent.
    fn get(&self, hash: &Hash) -> Result<Option<Bytes>, Error>;
    /// Stores a chunk after checking that `data` hashes to `hash`.
    /// Returns whether it was new.
    fn put(&self, hash: &Hash, data: &[u8]) -> Result<bool, Error>;
    /// [`ChunkStore::put`] for bytes the caller gives up: a store that keeps
    /// chunks in memory keeps these without a copy.
    fn put_bytes(&self, hash: &Hash, data: Bytes) -> Result<bool, Error> {
        self.put(hash, &data)
    }
}

fn check(hash: &Hash, data: &[u8]) -> Result<(), Error> {
    let got = Hash::of(data);
    if got != *hash {
        return Err(Error::ChunkMismatch {
            expected: *hash,
            got,
        });
    }
    Ok(())
}

/// Chunks in memory.
#[derive(Debug, Default)]
pub struct MemStore {
    chunks: RwLock<HashMap<Hash, Bytes>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of chunks held.
    pub fn len(&self) -> usize {
        self.chunks.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ChunkStore for MemStore {
    fn has(&self, hash: &Hash) -> bool {
        self.chunks
            .read()
            .map(|m| m.contains_key(hash))
            .unwrap_or(false)
    }

    fn get(&self, hash: &Hash) -> Result<Option<Bytes>, Error> {
        Ok(self.chunks.read().ok().and_then(|m| m.get(hash).cloned()))
    }

    fn put(&self, hash: &Hash, data: &[u8]) -> Result<bool, Error> {
        self.put_bytes(hash, Bytes::copy_from_slice(data))
    }

    fn put_bytes(&self, hash: &Hash, data: Bytes) -> Result<bool, Error> {
        check(hash, &data)?;
        let mut m = self
            .chunks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(m.insert(*hash, data).is_none())
    }
}

/// Chunks as files under a directory, one file per chunk named by its hash,
/// plus the signed manifests published or fetched into it.
///
/// Layout: `ROOT/chunks/ab/abcdef…` and `ROOT/manifests/CHANNEL/ARCH.json`.
/// Every file is written beside its final name and renamed into place, so a
/// crash leaves either the old state or the new one.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        for sub in ["chunks", "manifests", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|e| Error::io("create store directory", &p, e))?;
        }
        Ok(FsStore { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn chunk_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, channel: &str, arch: &str) -> Option<PathBuf> {
        (valid_component(channel) && valid_component(arch)).then(|| {
            self.root
                .join("manifests")
                .join(channel)
                .join(format!("{arch}.json"))
        })
    }

    /// Writes `data` to `path` atomically (temp file in the store, then rename).
    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), Error> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
        }
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(|e| Error::io("create temporary file in", &tmp_dir, e))?;
        tmp.write_all(data)
            .map_err(|e| Error::io("write", tmp.path(), e))?;
        tmp.persist(path)
            .map_err(|e| Error::io("rename into place", path, e.error))?;
        Ok(())
    }

    /// Stores a signed manifest as the current one for its channel/arch.
    pub fn put_manifest(&self, m: &SignedManifest) -> Result<PathBuf, Error> {
        let man = m.manifest();
        let path =
            self.manifest_path(&man.channel, &man.arch)
                .ok_or_else(|| Error::BadManifest {
                    reason: format!("invalid channel/arch {}/{}", man.channel, man.arch),
                })?;
        self.write_atomic(&path, m.envelope())?;
        Ok(path)
    }

    /// The raw envelope of the current manifest for `channel/arch`, unverified.
    pub fn manifest_bytes(&self, channel: &str, arch: &str) -> Result<Option<Vec<u8>>, Error> {
        let Some(path) = self.manifest_path(channel, arch) else {
            return Ok(None);
        };
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read manifest", &path, e)),
        }
    }

    /// Every `(channel, arch)` with a stored manifest, sorted.
    pub fn manifest_list(&self) -> Result<Vec<(String, String)>, Error> {
        let dir = self.root.join("manifests");
        let mut out = Vec::new();
        let rd = |p: &Path| fs::read_dir(p).map_err(|e| Error::io("list", p, e));
        for ch in rd(&dir)? {
            let ch = ch.map_err(|e| Error::io("list", &dir, e))?;
            let Some(channel) = ch.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !ch.path().is_dir() {
                continue;
            }
            for a in rd(&ch.path())? {
                let a = a.map_err(|e| Error::io("list", ch.path(), e))?;
                let name = a.file_name();
                if let Some(arch) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
                    out.push((channel.clone(), arch.to_owned()));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

impl ChunkStore for FsStore {
    fn has(&self, hash: &Hash) -> bool {
        self.chunk_path(hash).is_file()
    }

    fn get(&self, hash: &Hash) -> Result<Option<Bytes>, Error> {
        let path = self.chunk_path(hash);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read chunk", &path, e)),
        };
        let got = Hash::of(&data);
        if got != *hash {
            // Never serve it onward; removing it lets a later fetch heal the store.
            let _ = fs::remove_file(&path);
            tracing::warn!(path = %path.display(), "removed corrupt chunk file");
            return Err(Error::CorruptChunk { path, got });
        }
        Ok(Some(Bytes::from(data)))
    }

    fn put(&self, hash: &Hash, data: &[u8]) -> Result<bool, Error> {
        check(hash, data)?;
        let path = self.chunk_path(hash);
        if path.is_file() {
            return Ok(false);
        }
        self.write_atomic(&path, data)?;
        Ok(true)
    }
}

/// A test aid for lying peers: serves every chunk of the wrapped store with
/// its first byte flipped, so a node serving from it sends bytes that fail
/// verification at the receiver. `has` and `put` pass through, so the node
/// still claims (and takes in) the real chunks; only what it serves is wrong.
///
/// ```
/// use phase_content::{ChunkStore, CorruptingStore, Hash, MemStore};
///
/// let store = CorruptingStore::new(MemStore::new());
/// let h = Hash::of(b"chunk");
/// store.put(&h, b"chunk")?;
/// assert!(store.has(&h));
/// assert_ne!(Hash::of(&store.get(&h)?.unwrap()), h);
/// # Ok::<(), phase_content::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct CorruptingStore<S> {
    inner: S,
}

impl<S: ChunkStore> CorruptingStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        CorruptingStore { inner }
    }
}

impl<S: ChunkStore> ChunkStore for CorruptingStore<S> {
    fn has(&self, hash: &Hash) -> bool {
        self.inner.has(hash)
    }

    fn get(&self, hash: &Hash) -> Result<Option<Bytes>, Error> {
        Ok(self.inner.get(hash)?.map(|b| {
            let mut v = b.to_vec();
            if let Some(x) = v.first_mut() {
                *x ^= 0xff;
            }
            Bytes::from(v)
        }))
    }

    fn put(&self, hash: &Hash, data: &[u8]) -> Result<bool, Error> {
        self.inner.put(hash, data)
    }
}

/// Writes `artifact` to `out` from the chunks in `store`, checking every
/// chunk's length and the whole-artifact hash. Returns the bytes written.
///
/// On error, `out` may hold a prefix: callers that write files use
/// [`write_artifact`], which never leaves a partial file.
pub fn reassemble<W: Write>(
    store: &dyn ChunkStore,
    artifact: &Artifact,
    out: W,
) -> Result<u64, Error> {
    let mut tee = Hashing {
        inner: out,
        whole: blake3::Hasher::new(),
    };
    let written = write_chunks(store, artifact, &mut tee)?;
    let got: Hash = tee.whole.finalize().into();
    if got != artifact.hash {
        return Err(Error::ArtifactMismatch {
            what: artifact.name.clone(),
            reason: format!(
                "reassembled {written} bytes hashing to {got}, want {} bytes hashing to {}",
                artifact.size, artifact.hash
            ),
        });
    }
    Ok(written)
}

/// Writes `artifact`'s chunks from `store` to `out` in order, checking each
/// chunk's length and the total size, without hashing the whole artifact
/// again: for a caller whose store verified every chunk against the signed
/// chunk list on the way in (`ChunkStore::put` does), those bytes are
/// exactly the ones the publisher signed, and a second blake3 pass over tens
/// of MB (slow under emulation, between the last chunk and kexec) could
/// catch nothing an attacker can change. [`reassemble`] adds that pass.
pub fn write_chunks<W: Write>(
    store: &dyn ChunkStore,
    artifact: &Artifact,
    mut out: W,
) -> Result<u64, Error> {
    let mut written = 0u64;
    for (index, hash) in artifact.chunks.iter().enumerate() {
        let data = store.get(hash)?.ok_or_else(|| Error::MissingChunk {
            artifact: artifact.name.clone(),
            index,
            hash: *hash,
        })?;
        let want = artifact.chunk_len(index);
        if data.len() as u64 != want {
            return Err(Error::ChunkLength {
                artifact: artifact.name.clone(),
                index,
                got: data.len() as u64,
                want,
            });
        }
        out.write_all(&data)
            .map_err(|e| Error::io("write", format!("artifact {}", artifact.name), e))?;
        written += want;
    }
    if written != artifact.size {
        return Err(Error::ArtifactMismatch {
            what: artifact.name.clone(),
            reason: format!("reassembled {written} bytes, want {} bytes", artifact.size),
        });
    }
    Ok(written)
}

/// A writer that hashes what it passes on.
struct Hashing<W> {
    inner: W,
    whole: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.whole.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reassembles `artifact` into the file `path`, atomically: the file appears
/// complete and verified, or not at all.
pub fn write_artifact(
    store: &dyn ChunkStore,
    artifact: &Artifact,
    path: &Path,
) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::io("create temporary file in", dir, e))?;
    let mut w = std::io::BufWriter::new(tmp);
    reassemble(store, artifact, &mut w)?;
    let tmp = w
        .into_inner()
        .map_err(|e| Error::io("write", path, e.into_error()))?;
    tmp.persist(path)
        .map_err(|e| Error::io("rename into place", path, e.error))?;
    Ok(())
}

/// Checks a file against an artifact entry: size, whole hash.
pub fn verify_file(artifact: &Artifact, path: &Path) -> Result<(), Error> {
    let f = fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let (whole, size, _) =
        crate::chunk::chunk_reader::<_, ()>(f, artifact.chunk_size, |_, _| Ok(())).map_err(
            |e| match e {
                crate::chunk::ChunkReadError::Io(e) => Error::io("read", path, e),
                crate::chunk::ChunkReadError::Sink(()) => {
                    Error::io("read", path, std::io::Error::other("unreachable"))
                }
            },
        )?;
    if size != artifact.size {
        return Err(Error::ArtifactMismatch {
            what: path.display().to_string(),
            reason: format!(
                "{size} bytes, the manifest says {} (truncated or extended)",
                artifact.size
            ),
        });
    }
    if whole != artifact.hash {
        return Err(Error::ArtifactMismatch {
            what: path.display().to_string(),
            reason: format!("hashes to {whole}, the manifest says {}", artifact.hash),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_hashes;

    #[test]
    fn mem_store_keeps_given_bytes_without_a_copy_and_checks_them() {
        let s = MemStore::new();
        let data = Bytes::from(vec![7u8; 1000]);
        let h = Hash::of(&data);
        assert!(s.put_bytes(&h, data.clone()).expect("stored"));
        let got = s.get(&h).expect("get").expect("present");
        assert_eq!(got.as_ptr(), data.as_ptr(), "the same buffer, not a copy");
        let bad = Bytes::from(vec![8u8; 1000]);
        assert!(matches!(
            s.put_bytes(&Hash::of(b"other"), bad),
            Err(Error::ChunkMismatch { .. })
        ));
        assert_eq!(s.len(), 1);
    }

    fn artifact(data: &[u8], cs: u32) -> Artifact {
        Artifact {
            name: "kernel".into(),
            size: data.len() as u64,
            hash: Hash::of(data),
            chunk_size: cs,
            chunks: chunk_hashes(data, cs),
        }
    }

    fn fill(store: &dyn ChunkStore, data: &[u8], cs: u32) {
        for c in data.chunks(cs as usize) {
            store.put(&Hash::of(c), c).unwrap();
        }
    }

    #[test]
    fn corrupting_store_flips_what_it_serves_only() {
        let store = CorruptingStore::new(MemStore::new());
        let h = Hash::of(b"right");
        assert!(matches!(
            store.put(&h, b"wrong"),
            Err(Error::ChunkMismatch { .. })
        ));
        assert!(store.put(&h, b"right").unwrap());
        assert!(store.has(&h));
        let served = store.get(&h).unwrap().unwrap();
        assert_eq!(&served[..], &[b'r' ^ 0xff, b'i', b'g', b'h', b't'][..]);
        assert_ne!(Hash::of(&served), h, "a receiver's check fails");
        assert!(store.get(&Hash::of(b"absent")).unwrap().is_none());
        assert_eq!(&store.inner.get(&h).unwrap().unwrap()[..], b"right");
    }

    #[test]
    fn put_refuses_wrong_bytes() {
        for store in [
            Box::new(MemStore::new()) as Box<dyn ChunkStore>,
            Box::new(FsStore::open(tempfile::tempdir().unwrap().keep()).unwrap()),
        ] {
            let h = Hash::of(b"right");
            assert!(matches!(
                store.put(&h, b"wrong"),
                Err(Error::ChunkMismatch { .. })
            ));
            assert!(!store.has(&h));
            assert!(store.put(&h, b"right").unwrap());
            assert!(!store.put(&h, b"right").unwrap());
            assert_eq!(&store.get(&h).unwrap().unwrap()[..], b"right");
        }
    }

    #[test]
    fn reassembles_both_stores() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let a = artifact(&data, 4096);
        let dir = tempfile::tempdir().unwrap();
        let fs_store = FsStore::open(dir.path()).unwrap();
        for store in [&MemStore::new() as &dyn ChunkStore, &fs_store] {
            fill(store, &data, 4096);
            let mut out = Vec::new();
            assert_eq!(reassemble(store, &a, &mut out).unwrap(), data.len() as u64);
            assert_eq!(out, data);
        }
        let path = dir.path().join("kernel");
        write_artifact(&fs_store, &a, &path).unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
        verify_file(&a, &path).unwrap();
    }

    #[test]
    fn missing_chunk_leaves_no_file() {
        let data = vec![3u8; 20_000];
        let mut data2 = data.clone();
        data2[19_999] = 4;
        let a = artifact(&data2, 4096);
        let store = MemStore::new();
        fill(&store, &data, 4096);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        assert!(matches!(
            write_artifact(&store, &a, &path),
            Err(Error::MissingChunk { index: 4, .. })
        ));
        assert!(!path.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_chunk_file_is_caught_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let h = Hash::of(b"hello chunk");
        store.put(&h, b"hello chunk").unwrap();
        let path = store.chunk_path(&h);
        fs::write(&path, b"hellO chunk").unwrap();
        let e = store.get(&h).unwrap_err();
        assert!(matches!(e, Error::CorruptChunk { .. }), "{e}");
        assert!(!store.has(&h));
    }

    #[test]
    fn truncated_file_fails_verification() {
        let data = vec![5u8; 10_000];
        let a = artifact(&data, 4096);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, &data[..9_999]).unwrap();
        let e = verify_file(&a, &path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut bad = data.clone();
        bad[5] = 0;
        fs::write(&path, &bad).unwrap();
        assert!(
            verify_file(&a, &path)
                .unwrap_err()
                .to_string()
                .contains("hashes to")
        );
    }
}
