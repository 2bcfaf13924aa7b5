//! The node's configuration ([`NodeConfig`]) and its libp2p identity on
//! disk ([`load_or_create_key`]).

use std::path::Path;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::identity::Keypair;

use crate::Error;
use crate::limits::Limits;
use crate::metrics::{Metrics, SharedRegistry};
use crate::scheduler::SchedulerConfig;

use super::v2::Protocol;

/// Configuration of a [`Node`](super::Node). `Default` listens on all IPv4 addresses on
/// an ephemeral TCP port with mDNS on.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The libp2p identity; a fresh one if `None`.
    pub keypair: Option<Keypair>,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub peers: Vec<Multiaddr>,
    /// Discover LAN peers with mDNS.
    pub mdns: bool,
    /// Take part in the Kademlia DHT: announce provider records, look up
    /// providers, bootstrap. Off (`phase.mode=lan`), the DHT protocol is not
    /// even offered, and peers come only from `peers`, mDNS and dials.
    pub dht: bool,
    /// Chunk uploads at once, over all peers, before the node answers
    /// "busy" (v1) or chokes (v2); see [`crate::serving::ServingPolicy`].
    pub max_serving: usize,
    /// Chunk uploads at once to one peer before "busy" (v1) or choke (v2).
    pub per_peer_serving: usize,
    /// Inbound requests outstanding from one peer beyond which it is
    /// flooding: disconnected and blocked.
    pub flood_limit: usize,
    /// "Busy" answers to one peer within a second beyond which it is
    /// flooding (an honest peer backs off after a busy answer).
    pub flood_busy: u32,
    /// How long a flooding or malformed-message peer stays blocked.
    pub block_time: Duration,
    /// Timeout of one request-response exchange.
    pub request_timeout: Duration,
    /// How often provider records are re-announced.
    pub provide_interval: Duration,
    /// How often the DHT is asked for providers while fetching, at first
    /// and again after a lookup that found a provider we were not connected
    /// to. Each lookup that finds none doubles the wait, up to 32 s: once a
    /// node is connected to every provider (in a LAN storm mDNS and the seed
    /// find them all), a lookup every 2 s only loads the DHT's servers, all
    /// of which every lookup asks.
    pub lookup_interval: Duration,
    /// The fetch scheduler's tunables.
    pub scheduler: SchedulerConfig,
    /// Seed of the scheduler's random choices.
    pub rng_seed: u64,
    /// A node holding every chunk offers only its least-sent ones
    /// ([`crate::superseed`]), so a seed's upload goes to chunks the swarm lacks.
    pub super_seed: bool,
    /// A fetching node advertises (v1 have-maps) the chunks it has asked
    /// another peer for as well as those it holds, and holds a request for
    /// such a chunk until it arrives (at most [`PARK_MAX`](crate::node) and
    /// 64 at once), so the next hop's request waits at the holder instead of
    /// crossing the links' queues after the bytes arrived.
    pub promise: bool,
    /// Send our have-map along with every chunk we serve to a peer that
    /// reads it ([`crate::protocol::MAPS_PROTOCOL`]), and read theirs: a
    /// peer's map that came with a chunk counts as a pull, so while chunks
    /// flow between two nodes neither pulls the other's map (the pulls were
    /// most of the requests at N = 32).
    pub maps_with_chunks: bool,
    /// What the node counts ([`crate::metrics`]); registered nowhere by default.
    pub metrics: Metrics,
    /// Where libp2p's own metrics go (bandwidth, connections, Kademlia,
    /// identify, under `libp2p_`); none by default.
    pub registry: Option<SharedRegistry>,
    /// Caps on connections, memory and dials ([`Limits`]).
    pub limits: Limits,
    /// K: peers held connected at most ([`crate::neighbours`]); candidates
    /// beyond wait, and a fetching node rotates the least useful out.
    pub max_neighbours: usize,
    /// The chunk protocol this node fetches with ([`Protocol::V1`]).
    pub protocol: Protocol,
    /// Sessions of [`Protocol::V2`]: depth (requests pipelined per peer),
    /// timeouts, limits.
    pub session: crate::v2::SessionConfig,
}

/// The longest wait between two provider lookups of one fetch.
pub(super) const MAX_LOOKUP_INTERVAL: Duration = Duration::from_secs(32);

/// The wait after a lookup: back to `first` if the lookups since the last
/// one found a provider we were not connected to, else twice `now` (at most
/// [`MAX_LOOKUP_INTERVAL`]).
pub(super) fn next_lookup_wait(now: Duration, first: Duration, found: bool) -> Duration {
    if found {
        first
    } else {
        now.saturating_mul(2).min(MAX_LOOKUP_INTERVAL).max(first)
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            keypair: None,
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr")],
            peers: Vec::new(),
            mdns: true,
            dht: true,
            // Few uploads at once, each fast: a chunk reaches a fetcher (and
            // becomes servable there) sooner than when 16 share the link.
            max_serving: 6,
            // Below the global cap, so one peer (honest ones ask one at a
            // time) cannot take every upload slot.
            per_peer_serving: 2,
            flood_limit: 32,
            flood_busy: 32,
            block_time: Duration::from_secs(60),
            request_timeout: Duration::from_secs(20),
            provide_interval: Duration::from_secs(10),
            lookup_interval: Duration::from_secs(2),
            scheduler: SchedulerConfig::default(),
            rng_seed: rand::random(),
            super_seed: true,
            promise: true,
            maps_with_chunks: true,
            metrics: Metrics::default(),
            registry: None,
            limits: Limits::default(),
            // Far above log2 of a 10,000-node swarm (about 13), so a chunk
            // still spreads in a few hops, and under the 64 outgoing
            // connections of `Limits` with room for the DHT's own dials;
            // in the range BitTorrent clients hold per torrent (50-80).
            max_neighbours: 40,
            protocol: Protocol::V1,
            session: crate::v2::SessionConfig::default(),
        }
    }
}

impl NodeConfig {
    /// Sets the identity.
    pub fn with_keypair(mut self, k: Keypair) -> Self {
        self.keypair = Some(k);
        self
    }
    /// Sets the listen addresses.
    pub fn with_listen(mut self, l: Vec<Multiaddr>) -> Self {
        self.listen = l;
        self
    }
    /// Sets the peers dialed at start.
    pub fn with_peers(mut self, p: Vec<Multiaddr>) -> Self {
        self.peers = p;
        self
    }
    /// Turns mDNS on or off.
    pub fn with_mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }
    /// Turns the Kademlia DHT on or off.
    pub fn with_dht(mut self, on: bool) -> Self {
        self.dht = on;
        self
    }
    /// Turns super-seeding on or off.
    pub fn with_super_seed(mut self, on: bool) -> Self {
        self.super_seed = on;
        self
    }
    /// Sets [`NodeConfig::promise`].
    pub fn with_promise(mut self, on: bool) -> Self {
        self.promise = on;
        self
    }
    /// Sets [`NodeConfig::maps_with_chunks`].
    pub fn with_maps_with_chunks(mut self, on: bool) -> Self {
        self.maps_with_chunks = on;
        self
    }
    /// Sets the global serving cap.
    pub fn with_max_serving(mut self, n: usize) -> Self {
        self.max_serving = n.max(1);
        self
    }
    /// Counts into `metrics` (already registered by the caller) and adds
    /// libp2p's metrics to `registry`.
    pub fn with_metrics(mut self, metrics: Metrics, registry: SharedRegistry) -> Self {
        self.metrics = metrics;
        self.registry = Some(registry);
        self
    }
    /// Sets the scheduler's tunables.
    pub fn with_scheduler(mut self, s: SchedulerConfig) -> Self {
        self.scheduler = s;
        self
    }
    /// Sets K, the most peers held connected (at least 1).
    pub fn with_max_neighbours(mut self, k: usize) -> Self {
        self.max_neighbours = k.max(1);
        self
    }
    /// Sets the caps on connections, memory and dials.
    pub fn with_limits(mut self, l: Limits) -> Self {
        self.limits = l;
        self
    }
    /// Sets the chunk protocol the node fetches with.
    pub fn with_protocol(mut self, p: Protocol) -> Self {
        self.protocol = p;
        self
    }
    /// Sets the v2 sessions' configuration (its depth is also the
    /// scheduler's requests in flight per v2 peer).
    pub fn with_session(mut self, s: crate::v2::SessionConfig) -> Self {
        self.session = s;
        self
    }
}

/// Reads the libp2p identity from `path`, or creates one there (mode 0600).
pub fn load_or_create_key(path: &Path) -> Result<Keypair, Error> {
    let err = |reason: String| Error::Key {
        path: path.to_owned(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = Keypair::generate_ed25519();
            let bytes = k.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            }
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| err(e.to_string()))?;
                f.write_all(&bytes).map_err(|e| err(e.to_string()))?;
            }
            std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
            Ok(k)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn identity_is_stable_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p2p.key");
        let a = load_or_create_key(&path).unwrap();
        let b = load_or_create_key(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(load_or_create_key(&path), Err(Error::Key { .. })));
    }

    #[test]
    fn lookups_back_off_while_they_find_nobody_new() {
        let first = NodeConfig::default().lookup_interval;
        let mut w = first;
        let mut waits = Vec::new();
        for _ in 0..6 {
            w = next_lookup_wait(w, first, false);
            waits.push(w.as_secs());
        }
        assert_eq!(waits, [4, 8, 16, 32, 32, 32]);
        assert_eq!(
            next_lookup_wait(w, first, true),
            first,
            "a new provider: ask often again"
        );
    }
}
