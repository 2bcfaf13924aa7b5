//! Content addressing for Phase swarm boot: what the bytes are.
//!
//! Artifacts (kernel, initramfs, dtb) are split into fixed-size chunks, each
//! named by its blake3 [`Hash`]. A [`Manifest`] lists every chunk of every
//! artifact for one channel/arch and is signed by the publisher (ed25519); a
//! booting machine pins the publisher's [`PublicKey`] and trusts nothing else.
//! Chunks live in a [`ChunkStore`] that refuses bytes that do not match their
//! hash. This crate does no networking and makes no syscalls beyond files.
//!
//! ```
//! use phase_content::{chunk_hashes, reassemble, Artifact, ChunkStore, Hash, Manifest, MemStore,
//!     SecretKey, SignedManifest, FORMAT};
//!
//! let key = SecretKey::generate();
//! let kernel = vec![42u8; 100_000];
//! let store = MemStore::new();
//! for c in kernel.chunks(16 << 10) {
//!     store.put(&Hash::of(c), c)?;
//! }
//! let manifest = Manifest {
//!     format: FORMAT,
//!     channel: "stable".into(),
//!     arch: "x86_64".into(),
//!     sequence: 1,
//!     created: 0,
//!     publisher: key.public(),
//!     cmdline: None,
//!     artifacts: vec![Artifact {
//!         name: "kernel".into(),
//!         size: kernel.len() as u64,
//!         hash: Hash::of(&kernel),
//!         chunk_size: 16 << 10,
//!         chunks: chunk_hashes(&kernel, 16 << 10),
//!     }],
//!     seeds: vec![],
//!     peers: vec![],
//! };
//! let signed = manifest.sign(&key)?;
//! // The booting side: verify against the pinned key, then reassemble.
//! let verified = SignedManifest::verify(signed.envelope(), &key.public())?;
//! let mut out = Vec::new();
//! reassemble(&store, verified.manifest().artifact("kernel").unwrap(), &mut out)?;
//! assert_eq!(out, kernel);
//! # Ok::<(), phase_content::Error>(())
//! ```

mod chunk;
mod error;
mod hash;
mod keys;
mod manifest;
pub mod publish;
pub mod range;
mod store;

pub use chunk::{
    ChunkReadError, DEFAULT_CHUNK_SIZE, MAX_DEFAULT_CHUNKS, chunk_hashes, chunk_reader,
    default_chunk_size,
};
pub use error::Error;
pub use hash::{Hash, ParseHashError};
pub use keys::{ParseKeyError, PublicKey, SecretKey, Signature};
pub use manifest::{
    ARTIFACT_NAMES, Artifact, FORMAT, MAX_ARTIFACT_SIZE, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES,
    MIN_CHUNK_SIZE, Manifest, SignedManifest, valid_component, with_urls,
};
pub use store::{
    ChunkStore, CorruptingStore, FsStore, MemStore, reassemble, verify_file, write_artifact,
    write_chunks,
};
