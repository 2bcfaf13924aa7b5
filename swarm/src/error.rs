//! The error type of this crate.

use std::path::PathBuf;

/// What went wrong in the swarm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The libp2p transport could not be built.
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Dialing an address failed at once.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The event loop has stopped (the node shut down or crashed).
    #[error("the swarm node has stopped")]
    Stopped,
    /// The identity key file could not be read or written.
    #[error("libp2p identity key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No peer could give a manifest that verifies.
    #[error("no peer offered a manifest for {what} that verifies against the pinned key")]
    NoManifest {
        /// What was asked for.
        what: String,
    },
    /// The fetch could not complete.
    #[error("fetch of {root} failed: {reason}")]
    Fetch {
        /// The manifest root.
        root: String,
        /// Why.
        reason: String,
    },
    /// The content layer failed (store, manifest).
    #[error(transparent)]
    Content(#[from] phase_content::Error),
}
