//! The public face of a running node: the cloneable [`Handle`], the
//! [`Command`]s it sends the event loop, and what a fetch reports
//! ([`FetchReport`], [`FetchProgress`], [`Source`], [`PeerStats`]) or falls
//! back on ([`Fallback`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use phase_content::{Hash, PublicKey, SignedManifest};
use tokio::sync::{mpsc, oneshot, watch};

use crate::Error;

/// A chunk source of last resort: the HTTP seed ([`Source::HttpSeed`] in
/// reports). Called on a blocking thread.
pub trait Fallback: Send + Sync + 'static {
    /// The bytes of the chunk with `hash` (verified by the caller).
    fn get(&self, hash: &Hash) -> Result<Vec<u8>, String>;

    /// The bytes of several consecutive chunks of one artifact in one
    /// request (each verified by the caller). By default one [`get`] per
    /// chunk, concatenated.
    ///
    /// [`get`]: Fallback::get
    fn get_span(&self, span: &Span) -> Result<Vec<u8>, String> {
        span_by_chunks(self, span)
    }
}

/// A span as one [`Fallback::get`] per chunk, concatenated.
pub fn span_by_chunks<F: Fallback + ?Sized>(fb: &F, span: &Span) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(usize::try_from(span.len).unwrap_or(0));
    for h in &span.hashes {
        out.extend_from_slice(&fb.get(h)?);
    }
    Ok(out)
}

/// Consecutive chunks of one artifact, asked of the [`Fallback`] at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The manifest's channel.
    pub channel: String,
    /// The manifest's architecture.
    pub arch: String,
    /// The artifact's name (`kernel`, `initramfs`, ...).
    pub artifact: String,
    /// Byte offset of the first chunk in the artifact.
    pub offset: u64,
    /// Bytes in all (the chunks' lengths summed).
    pub len: u64,
    /// The chunks' hashes, in order.
    pub hashes: Vec<Hash>,
}

/// Bytes and chunks received from one source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerStats {
    /// Verified bytes.
    pub bytes: u64,
    /// Verified chunks.
    pub chunks: u64,
}

/// Where verified bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// A swarm peer.
    Peer(PeerId),
    /// The HTTP seed (the [`Fallback`]).
    HttpSeed,
}

/// The peer id's base58 text, or `http-seed`.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Peer(p) => fmt::Display::fmt(p, f),
            Source::HttpSeed => f.write_str("http-seed"),
        }
    }
}

/// As its [`Display`](fmt::Display) text, so a map keyed by `Source` is a
/// JSON object keyed by peer id.
impl serde::Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The outcome of a completed fetch.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// From start to the last chunk.
    pub wall: Duration,
    /// Verified bytes received during this fetch (duplicates included; not
    /// the chunks an earlier, abandoned fetch already held).
    pub bytes: u64,
    /// Per source.
    pub sources: BTreeMap<Source, PeerStats>,
    /// Peers banned during this fetch for bad bytes, in ban order.
    pub banned: Vec<PeerId>,
    /// The most neighbours the node held at once since it started
    /// ([`crate::NodeConfig::max_neighbours`] bounds it).
    pub neighbours_peak: usize,
    /// The most libp2p connections established at once since it started,
    /// those closed at once for want of room included.
    pub connections_peak: usize,
}

/// Progress of a running fetch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchProgress {
    /// Per artifact: name, verified bytes held, size.
    pub artifacts: Vec<(String, u64, u64)>,
    /// Chunks held.
    pub held: usize,
    /// Chunks in the manifest.
    pub total: usize,
    /// Peers connected.
    pub peers: usize,
}

// Commands are few and short-lived; boxing the larger ones buys nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), Error>>),
    Seed(Box<SignedManifest>, oneshot::Sender<Result<(), Error>>),
    FindManifest {
        channel: String,
        arch: String,
        pinned: PublicKey,
        wait: Duration,
        /// A manifest the caller holds: the answer unless a peer offers a
        /// newer one.
        known: Option<Box<SignedManifest>>,
        reply: oneshot::Sender<Result<SignedManifest, Error>>,
    },
    Fetch {
        manifest: Box<SignedManifest>,
        fallback: Option<Arc<dyn Fallback>>,
        progress: Option<watch::Sender<FetchProgress>>,
        reply: oneshot::Sender<Result<FetchReport, Error>>,
    },
    Peers(oneshot::Sender<Vec<PeerId>>),
}

/// A cloneable handle to a running node.
#[derive(Clone, Debug)]
pub struct Handle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) peer_id: PeerId,
}

impl Handle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(&self, f: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(f(tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The addresses the node listens on (waits for the first listener).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        self.ask(Command::ListenAddrs).await
    }

    /// Dials `addr` (with or without `/p2p/`).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), Error> {
        self.ask(|r| Command::Dial(addr, r)).await?
    }

    /// Seeds `manifest`, whose chunks must all be in the node's store.
    pub async fn seed(&self, manifest: SignedManifest) -> Result<(), Error> {
        self.ask(|r| Command::Seed(Box::new(manifest), r)).await?
    }

    /// Asks connected (and later connecting) peers for the newest manifest of
    /// `channel`/`arch` that verifies against `pinned`; waits up to `wait`.
    pub async fn find_manifest(
        &self,
        channel: &str,
        arch: &str,
        pinned: PublicKey,
        wait: Duration,
    ) -> Result<SignedManifest, Error> {
        let (channel, arch) = (channel.to_owned(), arch.to_owned());
        self.ask(|reply| Command::FindManifest {
            channel,
            arch,
            pinned,
            wait,
            known: None,
            reply,
        })
        .await?
    }

    /// `known`, or a newer manifest of its channel and arch (verified against
    /// `pinned`) that a connected (or later connecting) peer offers; answers
    /// once every peer asked has answered, or after `wait`, and at once with
    /// no peer connected. Peers that list
    /// [`crate::protocol::ABOVE_PROTOCOL`] are asked only for a manifest
    /// newer than `known`, so one that holds the same sends no manifest back.
    pub async fn newer_manifest(
        &self,
        known: SignedManifest,
        pinned: PublicKey,
        wait: Duration,
    ) -> Result<SignedManifest, Error> {
        let m = known.manifest();
        let (channel, arch) = (m.channel.clone(), m.arch.clone());
        self.ask(|reply| Command::FindManifest {
            channel,
            arch,
            pinned,
            wait,
            known: Some(Box::new(known)),
            reply,
        })
        .await?
    }

    /// Fetches every chunk of `manifest` into the store, verifying each, and
    /// serves them onward as they arrive. Chunks no peer holds come from
    /// `fallback`. Returns when every chunk is held.
    ///
    /// One fetch runs at a time: while a caller still waits for one, another
    /// fails. Dropping the returned future (a caller's timeout) abandons the
    /// fetch; the next one replaces it and resumes from the chunks already
    /// held, so a retry does not download them again.
    pub async fn fetch(
        &self,
        manifest: SignedManifest,
        fallback: Option<Arc<dyn Fallback>>,
        progress: Option<watch::Sender<FetchProgress>>,
    ) -> Result<FetchReport, Error> {
        self.ask(|reply| Command::Fetch {
            manifest: Box::new(manifest),
            fallback,
            progress,
            reply,
        })
        .await?
    }

    /// The peers connected now.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, Error> {
        self.ask(Command::Peers).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use libp2p::identity::Keypair;

    #[test]
    fn source_text_is_the_peer_id_or_http_seed() {
        let p = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(Source::Peer(p).to_string(), p.to_base58());
        assert_eq!(Source::HttpSeed.to_string(), "http-seed");
        let mut m = BTreeMap::new();
        m.insert(
            Source::HttpSeed,
            PeerStats {
                bytes: 7,
                chunks: 1,
            },
        );
        m.insert(
            Source::Peer(p),
            PeerStats {
                bytes: 9,
                chunks: 2,
            },
        );
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["http-seed"]["bytes"], 7);
        assert_eq!(json[p.to_base58()]["chunks"], 2);
        assert_eq!(json.as_object().unwrap().len(), 2);
    }
}
