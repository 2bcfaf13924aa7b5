//! What the node counts for Prometheus: the few things only the event loop
//! sees (chunks verified and rejected per kind of source, chunks and bytes it
//! served, busy answers both ways, bans, connected peers, the manifest
//! sequence it serves, fetch durations).
//!
//! [`Metrics`] is a set of `prometheus-client` counters and gauges; clones
//! share the values. The binary registers it ([`Metrics::register`]) in its
//! registry and hands the registry to [`crate::NodeConfig::with_metrics`], which
//! also adds libp2p's own metrics (bandwidth, connections, Kademlia,
//! identify), named `libp2p_*` after the registry's prefix.
//!
//! ```
//! use phase_swarm::metrics::{Metrics, Registry};
//! let m = Metrics::new();
//! let mut registry = Registry::with_prefix("plasmd");
//! m.register(&mut registry);
//! m.sent_http(4096);
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains("plasmd_bytes_sent_total{via=\"http\"} 4096"));
//! ```

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
pub use prometheus_client::registry::Registry;

use crate::node::Source;
use crate::protocol::Response;

/// A registry shared by the binary (which encodes it for `/metrics`) and
/// the node (which adds libp2p's metrics to it when it starts).
pub type SharedRegistry = Arc<Mutex<Registry>>;

/// Seed peer ids remembered for the `source="seed"` label; a seed lists a
/// handful, more are counted as `peer`.
const MAX_SEEDS: usize = 64;

type Label = [(&'static str, &'static str); 1];
type ManifestLabel = [(&'static str, String); 2];

/// The node's counters. `Default` is a set registered nowhere (counting
/// into it costs a few atomic adds).
#[derive(Debug, Clone)]
pub struct Metrics {
    bytes_received: Family<Label, Counter>,
    bytes_late: Family<Label, Counter>,
    chunks_verified: Family<Label, Counter>,
    chunks_rejected: Family<Label, Counter>,
    bytes_sent: Family<Label, Counter>,
    chunks_sent: Family<Label, Counter>,
    busy: Family<Label, Counter>,
    held: Family<Label, Counter>,
    waiting: Gauge,
    bans: Family<Label, Counter>,
    connected: Gauge,
    sequence: Family<ManifestLabel, Gauge>,
    fetch_duration: Histogram,
    seeds: Arc<Mutex<HashSet<PeerId>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set, all zero.
    pub fn new() -> Self {
        Metrics {
            bytes_received: Family::default(),
            bytes_late: Family::default(),
            chunks_verified: Family::default(),
            chunks_rejected: Family::default(),
            bytes_sent: Family::default(),
            chunks_sent: Family::default(),
            busy: Family::default(),
            held: Family::default(),
            waiting: Gauge::default(),
            bans: Family::default(),
            connected: Gauge::default(),
            sequence: Family::default(),
            // 0.1 s to about 7 min: a loopback fetch to a slow boot storm.
            fetch_duration: Histogram::new(exponential_buckets(0.1, 2.0, 13)),
            seeds: Arc::default(),
        }
    }

    /// Registers every metric in `r` (give it a registry prefixed `plasmd`).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "bytes_received",
            "Verified chunk bytes received by fetches, by source (seed: the HTTP seed's swarm \
             node, peer: any other peer, http: the seed's /chunks rescue); duplicates included, \
             as in fetch --json",
            self.bytes_received.clone(),
        );
        r.register(
            "late_bytes_received",
            "Verified chunk bytes that arrived after their fetch had finished (end-game \
             duplicates still in flight), by source",
            self.bytes_late.clone(),
        );
        r.register(
            "chunks_verified",
            "Chunks received by fetches that verified against the manifest, by source",
            self.chunks_verified.clone(),
        );
        r.register(
            "chunks_rejected",
            "Chunks received that failed verification (the sender is banned), by source",
            self.chunks_rejected.clone(),
        );
        r.register(
            "bytes_sent",
            "Chunk bytes served, by transport (swarm, http)",
            self.bytes_sent.clone(),
        );
        r.register(
            "chunks_sent",
            "Chunks served, by transport (swarm, http)",
            self.chunks_sent.clone(),
        );
        r.register(
            "busy_answers",
            "Busy answers to chunk requests, sent (we were at our serving cap) or received",
            self.busy.clone(),
        );
        r.register(
            "chunk_requests_held",
            "Chunk requests held for a chunk on its way to us (NodeConfig::promise), by how \
             they ended (served, refused: not served when the chunk arrived or the wait ended)",
            self.held.clone(),
        );
        r.register(
            "chunk_requests_waiting",
            "Chunk requests held now for a chunk on its way to us",
            self.waiting.clone(),
        );
        r.register(
            "bans",
            "Peers banned or blocked, by reason (bad_chunk, flood, malformed, unread)",
            self.bans.clone(),
        );
        r.register(
            "connected_peers",
            "Peers connected now",
            self.connected.clone(),
        );
        r.register(
            "manifest_sequence",
            "Highest manifest sequence this node serves, per channel and arch",
            self.sequence.clone(),
        );
        r.register_with_unit(
            "fetch_duration",
            "Wall time of completed fetches, from start to the last chunk",
            prometheus_client::registry::Unit::Seconds,
            self.fetch_duration.clone(),
        );
    }

    /// Counts `peer` as the seed's own swarm node from now on.
    pub fn mark_seed(&self, peer: PeerId) {
        let mut s = self.seeds.lock().unwrap_or_else(PoisonError::into_inner);
        if s.len() < MAX_SEEDS {
            s.insert(peer);
        }
    }

    fn kind(&self, src: &Source) -> &'static str {
        match src {
            Source::HttpSeed => "http",
            Source::Peer(p)
                if self
                    .seeds
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(p) =>
            {
                "seed"
            }
            Source::Peer(_) => "peer",
        }
    }

    pub(crate) fn verified(&self, src: &Source, bytes: usize) {
        let l = [("source", self.kind(src))];
        self.chunks_verified.get_or_create(&l).inc();
        self.bytes_received.get_or_create(&l).inc_by(bytes as u64);
    }

    /// A verified chunk that arrived when no fetch wanted it any more.
    pub(crate) fn late(&self, src: &Source, bytes: usize) {
        self.bytes_late
            .get_or_create(&[("source", self.kind(src))])
            .inc_by(bytes as u64);
    }

    /// A chunk request held for a chunk on its way ended: `served` or not.
    pub(crate) fn held(&self, served: bool) {
        let l = [("outcome", if served { "served" } else { "refused" })];
        self.held.get_or_create(&l).inc();
    }

    /// Chunk requests held now.
    pub(crate) fn waiting(&self, n: usize) {
        self.waiting.set(n as i64);
    }

    pub(crate) fn rejected(&self, src: &Source) {
        self.chunks_rejected
            .get_or_create(&[("source", self.kind(src))])
            .inc();
    }

    /// Counts one chunk of `bytes` served over the HTTP seed (`/chunks`, artifacts).
    pub fn sent_http(&self, bytes: u64) {
        let l = [("via", "http")];
        self.chunks_sent.get_or_create(&l).inc();
        self.bytes_sent.get_or_create(&l).inc_by(bytes);
    }

    /// Counts what an answer to a request serves.
    pub(crate) fn answered(&self, r: &Response) {
        match r {
            Response::Busy => {
                self.busy.get_or_create(&[("direction", "sent")]).inc();
            }
            Response::Chunks(pieces) | Response::ChunksWithMap { pieces, .. } => {
                let l = [("via", "swarm")];
                let bytes: usize = pieces.iter().map(|p| p.data.len()).sum();
                self.chunks_sent
                    .get_or_create(&l)
                    .inc_by(pieces.len() as u64);
                self.bytes_sent.get_or_create(&l).inc_by(bytes as u64);
            }
            _ => {}
        }
    }

    pub(crate) fn busy_received(&self) {
        self.busy.get_or_create(&[("direction", "received")]).inc();
    }

    pub(crate) fn banned(&self, reason: &'static str) {
        self.bans.get_or_create(&[("reason", reason)]).inc();
    }

    pub(crate) fn set_connected(&self, n: usize) {
        self.connected.set(n as i64);
    }

    pub(crate) fn serving(&self, channel: &str, arch: &str, sequence: u64) {
        let g = self
            .sequence
            .get_or_create(&[("channel", channel.to_owned()), ("arch", arch.to_owned())]);
        let s = i64::try_from(sequence).unwrap_or(i64::MAX);
        if g.get() < s {
            g.set(s);
        }
    }

    pub(crate) fn fetched(&self, wall: Duration) {
        self.fetch_duration.observe(wall.as_secs_f64());
    }
}

/// The OpenMetrics text of `registry` (what `/metrics` answers), ending in `# EOF`.
pub fn encode(registry: &SharedRegistry) -> String {
    let r = registry.lock().unwrap_or_else(PoisonError::into_inner);
    let mut text = String::new();
    // Writing into a String cannot fail; a metric that could not encode
    // would be a bug in prometheus-client, and a scrape still gets the rest.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &r) {
        tracing::error!(error = %e, "encoding metrics");
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::Piece;

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).unwrap();
        s
    }

    #[test]
    fn counts_by_source_kind_and_transport() {
        let m = Metrics::new();
        let mut r = Registry::with_prefix("plasmd");
        m.register(&mut r);
        let seed = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let other = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        m.mark_seed(seed);
        m.verified(&Source::Peer(seed), 100);
        m.verified(&Source::Peer(other), 7);
        m.verified(&Source::HttpSeed, 5);
        m.verified(&Source::HttpSeed, 5);
        m.late(&Source::Peer(seed), 9);
        m.rejected(&Source::Peer(other));
        m.answered(&Response::Chunks(vec![
            Piece {
                index: 0,
                data: vec![0; 3],
            },
            Piece {
                index: 1,
                data: vec![0; 4],
            },
        ]));
        m.answered(&Response::Busy);
        m.answered(&Response::DoNotHave);
        m.serving("stable", "x86_64", 3);
        m.serving("stable", "x86_64", 2);
        m.fetched(Duration::from_millis(1500));
        let t = text(&r);
        for want in [
            "plasmd_bytes_received_total{source=\"seed\"} 100",
            "plasmd_bytes_received_total{source=\"peer\"} 7",
            "plasmd_bytes_received_total{source=\"http\"} 10",
            "plasmd_chunks_verified_total{source=\"http\"} 2",
            "plasmd_late_bytes_received_total{source=\"seed\"} 9",
            "plasmd_chunks_rejected_total{source=\"peer\"} 1",
            "plasmd_chunks_sent_total{via=\"swarm\"} 2",
            "plasmd_bytes_sent_total{via=\"swarm\"} 7",
            "plasmd_busy_answers_total{direction=\"sent\"} 1",
            "plasmd_manifest_sequence{channel=\"stable\",arch=\"x86_64\"} 3",
            "plasmd_fetch_duration_seconds_count 1",
            "plasmd_fetch_duration_seconds_sum 1.5",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }
}
