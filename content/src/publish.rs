//! Publishing: a directory of artifacts becomes chunks in a store plus a
//! signed manifest per channel/arch.

use std::fs;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::chunk::default_chunk_size;
use crate::chunk::{ChunkReadError, chunk_reader};
use crate::keys::SecretKey;
use crate::manifest::{Artifact, FORMAT, Manifest, SignedManifest, valid_component};
use crate::store::{ChunkStore, FsStore};

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Chunk size for new manifests; `None`: [`default_chunk_size`] of the set's size.
    pub chunk_size: Option<u32>,
    /// HTTP seed URLs to list in the manifest.
    pub seeds: Vec<String>,
    /// libp2p multiaddrs to list in the manifest.
    pub peers: Vec<String>,
    /// Bump the sequence even when nothing changed (`plasmd publish` does;
    /// `plasmd serve` keeps an unchanged manifest so its root stays stable).
    pub bump_if_unchanged: bool,
    /// Creation time to record, seconds since the epoch.
    pub now: u64,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            chunk_size: None,
            seeds: Vec::new(),
            peers: Vec::new(),
            bump_if_unchanged: true,
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

impl PublishOptions {
    /// Sets the chunk size (`None`: the default for the set's size).
    pub fn with_chunk_size(mut self, cs: impl Into<Option<u32>>) -> Self {
        self.chunk_size = cs.into();
        self
    }
    /// Sets the seed URLs.
    pub fn with_seeds(mut self, seeds: Vec<String>) -> Self {
        self.seeds = seeds;
        self
    }
    /// Sets the peer multiaddrs.
    pub fn with_peers(mut self, peers: Vec<String>) -> Self {
        self.peers = peers;
        self
    }
    /// Whether to bump the sequence when nothing changed.
    pub fn with_bump_if_unchanged(mut self, bump: bool) -> Self {
        self.bump_if_unchanged = bump;
        self
    }
}

/// The outcome for one channel/arch.
#[derive(Debug, Clone)]
pub struct Published {
    /// The current signed manifest.
    pub manifest: SignedManifest,
    /// Where it is stored.
    pub path: PathBuf,
    /// False when an unchanged manifest was kept as it was.
    pub changed: bool,
}

fn dir_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let rd = fs::read_dir(dir).map_err(|e| Error::io("read artifacts directory", dir, e))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io("read artifacts directory", dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        out.push((name, e.path()));
    }
    out.sort();
    Ok(out)
}

/// Publishes every `DIR/CHANNEL/ARCH/{kernel,initramfs[,cmdline][,dtb]}`.
pub fn publish_dir(
    key: &SecretKey,
    dir: &Path,
    store: &FsStore,
    opts: &PublishOptions,
) -> Result<Vec<Published>, Error> {
    let bad = |dir: &Path, reason: String| Error::BadArtifactsDir {
        dir: dir.to_owned(),
        reason,
    };
    let mut out = Vec::new();
    for (channel, cdir) in dir_entries(dir)? {
        for (arch, adir) in dir_entries(&cdir)? {
            if !valid_component(&channel) || !valid_component(&arch) {
                return Err(bad(
                    &adir,
                    "channel and arch names may hold only letters, digits, '-', '_' and '.'".into(),
                ));
            }
            out.push(publish_one(key, &channel, &arch, &adir, store, opts)?);
        }
    }
    if out.is_empty() {
        return Err(bad(
            dir,
            "nothing to publish: expected CHANNEL/ARCH/kernel (e.g. stable/x86_64/kernel)".into(),
        ));
    }
    Ok(out)
}

/// Publishes one `CHANNEL/ARCH` directory.
pub fn publish_one(
    key: &SecretKey,
    channel: &str,
    arch: &str,
    adir: &Path,
    store: &FsStore,
    opts: &PublishOptions,
) -> Result<Published, Error> {
    let mut present = Vec::new();
    for (name, required) in [("kernel", true), ("initramfs", true), ("dtb", false)] {
        let path = adir.join(name);
        if !path.exists() {
            if required {
                return Err(Error::BadArtifactsDir {
                    dir: adir.to_owned(),
                    reason: format!("no {name} file"),
                });
            }
            continue;
        }
        present.push((name, path));
    }
    let chunk_size = match opts.chunk_size {
        Some(cs) => cs,
        None => {
            let mut total = 0u64;
            for (_, path) in &present {
                let m = fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
                total = total.saturating_add(m.len());
            }
            default_chunk_size(total)
        }
    };
    let mut artifacts = Vec::new();
    for (name, path) in &present {
        artifacts.push(chunk_file(name, path, store, chunk_size)?);
    }
    let cmdline_path = adir.join("cmdline");
    let cmdline = match fs::read_to_string(&cmdline_path) {
        Ok(s) => Some(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("read", &cmdline_path, e)),
    };

    let prev = match store.manifest_bytes(channel, arch)? {
        Some(b) => match SignedManifest::verify(&b, &key.public()) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(%channel, %arch, error = %e, "stored manifest does not verify with this key; replacing it");
                None
            }
        },
        None => None,
    };
    let mut manifest = Manifest {
        format: FORMAT,
        channel: channel.to_owned(),
        arch: arch.to_owned(),
        sequence: 1,
        created: opts.now,
        publisher: key.public(),
        cmdline,
        artifacts,
        seeds: opts.seeds.clone(),
        peers: opts.peers.clone(),
    };
    if let Some(prev) = prev {
        let p = prev.manifest();
        let same = p.artifacts == manifest.artifacts
            && p.cmdline == manifest.cmdline
            && p.seeds == manifest.seeds
            && p.peers == manifest.peers;
        if same && !opts.bump_if_unchanged {
            let path = store.put_manifest(&prev)?;
            return Ok(Published {
                manifest: prev,
                path,
                changed: false,
            });
        }
        manifest.sequence = p.sequence.saturating_add(1);
    }
    let signed = manifest.sign(key)?;
    let path = store.put_manifest(&signed)?;
    tracing::info!(%channel, %arch, sequence = manifest.sequence, root = %signed.root(), "published");
    Ok(Published {
        manifest: signed,
        path,
        changed: true,
    })
}

/// Chunks one file into the store and describes it.
pub fn chunk_file(
    name: &str,
    path: &Path,
    store: &dyn ChunkStore,
    chunk_size: u32,
) -> Result<Artifact, Error> {
    let f = fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    chunk_into(name, f, path, store, chunk_size)
}

/// Chunks `data` into the store and describes it as artifact `name`.
pub fn chunk_bytes(
    name: &str,
    data: &[u8],
    store: &dyn ChunkStore,
    chunk_size: u32,
) -> Result<Artifact, Error> {
    chunk_into(name, data, Path::new(name), store, chunk_size)
}

fn chunk_into(
    name: &str,
    r: impl std::io::Read,
    path: &Path,
    store: &dyn ChunkStore,
    chunk_size: u32,
) -> Result<Artifact, Error> {
    let (hash, size, chunks) = chunk_reader(r, chunk_size, |h, c| store.put(&h, c).map(|_| ()))
        .map_err(|e| match e {
            ChunkReadError::Io(e) => Error::io("read", path, e),
            ChunkReadError::Sink(e) => e,
        })?;
    Ok(Artifact {
        name: name.to_owned(),
        size,
        hash,
        chunk_size,
        chunks,
    })
}

/// Signs a manifest of `artifacts` for `channel`/`arch` at `sequence`, with no
/// cmdline, seeds or peers: what tests, benchmarks and tools that publish
/// from memory need.
pub fn sign_artifacts(
    key: &SecretKey,
    channel: &str,
    arch: &str,
    sequence: u64,
    artifacts: Vec<Artifact>,
) -> Result<SignedManifest, Error> {
    Manifest {
        format: FORMAT,
        channel: channel.to_owned(),
        arch: arch.to_owned(),
        sequence,
        created: 0,
        publisher: key.public(),
        cmdline: None,
        artifacts,
        seeds: vec![],
        peers: vec![],
    }
    .sign(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_chunk_like_files() {
        let t = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let path = t.path().join("k");
        fs::write(&path, &data).unwrap();
        let store = crate::MemStore::new();
        let a = chunk_bytes("kernel", &data, &store, 4096).unwrap();
        assert_eq!(a, chunk_file("kernel", &path, &store, 4096).unwrap());
        assert_eq!(a.chunks.len(), 5);
        assert!(a.chunks.iter().all(|h| store.has(h)));
        let key = SecretKey::from_seed([8; 32]);
        let m = sign_artifacts(&key, "stable", "x86_64", 3, vec![a]).unwrap();
        assert_eq!(m.manifest().sequence, 3);
        assert!(SignedManifest::verify(m.envelope(), &key.public()).is_ok());
    }

    fn setup() -> (tempfile::TempDir, PathBuf, FsStore, SecretKey) {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("artifacts/stable/x86_64");
        fs::create_dir_all(&a).unwrap();
        fs::write(a.join("kernel"), vec![1u8; 300_000]).unwrap();
        fs::write(a.join("initramfs"), vec![2u8; 5000]).unwrap();
        fs::write(a.join("cmdline"), "console=ttyS0\n").unwrap();
        let store = FsStore::open(t.path().join("store")).unwrap();
        let dir = t.path().join("artifacts");
        (t, dir, store, SecretKey::from_seed([4; 32]))
    }

    #[test]
    fn publish_bumps_sequence_and_serve_keeps_it() {
        let (_t, dir, store, key) = setup();
        let opts = PublishOptions::default().with_chunk_size(64 << 10);
        let p1 = publish_dir(&key, &dir, &store, &opts).unwrap();
        assert_eq!(p1.len(), 1);
        let m = p1[0].manifest.manifest();
        assert_eq!(m.sequence, 1);
        assert_eq!(m.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(m.artifact("kernel").unwrap().chunks.len(), 5);
        let p2 = publish_dir(&key, &dir, &store, &opts).unwrap();
        assert_eq!(p2[0].manifest.manifest().sequence, 2);
        let keep = opts.clone().with_bump_if_unchanged(false);
        let p3 = publish_dir(&key, &dir, &store, &keep).unwrap();
        assert_eq!(p3[0].manifest.manifest().sequence, 2);
        assert!(!p3[0].changed);
        let stored = store.manifest_bytes("stable", "x86_64").unwrap().unwrap();
        let v = SignedManifest::verify(&stored, &key.public()).unwrap();
        let mut out = Vec::new();
        crate::reassemble(&store, v.manifest().artifact("kernel").unwrap(), &mut out).unwrap();
        assert_eq!(out, vec![1u8; 300_000]);
    }

    #[test]
    fn missing_kernel_is_named() {
        let (_t, dir, store, key) = setup();
        fs::remove_file(dir.join("stable/x86_64/kernel")).unwrap();
        let e = publish_dir(&key, &dir, &store, &PublishOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stable/x86_64") && e.contains("no kernel"),
            "{e}"
        );
        assert!(store.manifest_list().unwrap().is_empty());
    }

    #[test]
    fn empty_dir_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let store = FsStore::open(t.path().join("store")).unwrap();
        fs::create_dir(t.path().join("a")).unwrap();
        let e = publish_dir(
            &SecretKey::generate(),
            &t.path().join("a"),
            &store,
            &PublishOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nothing to publish"), "{e}");
    }
}
