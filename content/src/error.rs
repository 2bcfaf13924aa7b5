use std::path::PathBuf;

use crate::{Hash, PublicKey};

/// Everything that can go wrong in the content layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key file does not hold a key.
    #[error("{}: not a plasmd key file (want 64 hex digits; make one with `plasmd keygen`)", path.display())]
    BadKeyFile {
        /// The file.
        path: PathBuf,
    },
    /// A manifest is malformed or inconsistent.
    #[error("invalid manifest: {reason}")]
    BadManifest {
        /// What is wrong with it.
        reason: String,
    },
    /// A manifest's signature does not verify with the pinned key.
    #[error(
        "manifest signature does not verify with the pinned key {key}: tampered, or signed by another publisher"
    )]
    BadSignature {
        /// The pinned key (boxed: a verifying key is large, errors stay small).
        key: Box<PublicKey>,
    },
    /// A manifest is older than one already seen.
    #[error(
        "manifest for {channel}/{arch} has sequence {got}, older than {seen} already seen: refusing a rollback"
    )]
    Rollback {
        /// Channel.
        channel: String,
        /// Arch.
        arch: String,
        /// The manifest's sequence.
        got: u64,
        /// The highest sequence seen before.
        seen: u64,
    },
    /// Bytes do not hash to the chunk they claim to be.
    #[error("chunk {expected} failed verification (got bytes hashing to {got})")]
    ChunkMismatch {
        /// The hash asked for.
        expected: Hash,
        /// The hash of the bytes received.
        got: Hash,
    },
    /// A stored chunk file is corrupt; it has been removed from the store.
    #[error("{}: stored chunk is corrupt (hashes to {got}); removed it, fetch or publish again", path.display())]
    CorruptChunk {
        /// The file.
        path: PathBuf,
        /// What its bytes hash to.
        got: Hash,
    },
    /// A chunk needed for reassembly is not in the store.
    #[error("chunk {index} ({hash}) of {artifact} is not in the store")]
    MissingChunk {
        /// Artifact name.
        artifact: String,
        /// Chunk index.
        index: usize,
        /// Chunk hash.
        hash: Hash,
    },
    /// A chunk has the wrong length for its place in the artifact.
    #[error("chunk {index} of {artifact} is {got} bytes, the manifest says {want}")]
    ChunkLength {
        /// Artifact name.
        artifact: String,
        /// Chunk index.
        index: usize,
        /// Actual length.
        got: u64,
        /// Expected length.
        want: u64,
    },
    /// A reassembled or on-disk artifact does not match the manifest.
    #[error("{what} does not match the manifest: {reason}")]
    ArtifactMismatch {
        /// Which artifact (name or path).
        what: String,
        /// How it differs.
        reason: String,
    },
    /// An artifacts directory cannot be published.
    #[error("{}: {reason}", dir.display())]
    BadArtifactsDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
