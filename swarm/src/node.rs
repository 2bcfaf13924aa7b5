//! The node: one event loop that owns the libp2p `Swarm`, the serving state
//! and the running fetch; a cloneable [`Handle`] sends it commands.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, RecordKey};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, mdns, noise, tcp, yamux};
use phase_content::{ChunkStore, Hash, PublicKey, SignedManifest};
use tokio::sync::{mpsc, oneshot, watch};

use crate::Error;
use crate::codec::{ChunkCodec, Inbound};
use crate::limits::{DialQueue, IpBans, Limits, Offer, Target, ip_of};
use crate::metrics::{Metrics, SharedRegistry};
use crate::protocol::{MAX_NAME, PROTOCOL, Piece, Request, Response, Root, pack_bits, unpack_bits};
use crate::scheduler::{Action, Input, Scheduler, SchedulerConfig};

/// Configuration of a [`Node`]. `Default` listens on all IPv4 addresses on
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
    /// Inbound requests being answered at once, over all peers, before the
    /// node answers "busy".
    pub max_serving: usize,
    /// Inbound requests being answered at once for one peer before "busy".
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
    /// How often the DHT is asked for providers while fetching.
    pub lookup_interval: Duration,
    /// The fetch scheduler's tunables.
    pub scheduler: SchedulerConfig,
    /// Seed of the scheduler's random choices.
    pub rng_seed: u64,
    /// A node holding every chunk offers only its least-sent ones
    /// ([`crate::superseed`]), so a seed's upload goes to chunks the swarm lacks.
    pub super_seed: bool,
    /// What the node counts ([`crate::metrics`]); registered nowhere by default.
    pub metrics: Metrics,
    /// Where libp2p's own metrics go (bandwidth, connections, Kademlia,
    /// identify, under `libp2p_`); none by default.
    pub registry: Option<SharedRegistry>,
    /// Caps on connections, memory and dials ([`Limits`]).
    pub limits: Limits,
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
            metrics: Metrics::default(),
            registry: None,
            limits: Limits::default(),
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
    /// Sets the caps on connections, memory and dials.
    pub fn with_limits(mut self, l: Limits) -> Self {
        self.limits = l;
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

/// A chunk source of last resort: the HTTP seed ([`Source::HttpSeed`] in
/// reports). Called on a blocking thread.
pub trait Fallback: Send + Sync + 'static {
    /// The bytes of the chunk with `hash` (verified by the caller).
    fn get(&self, hash: &Hash) -> Result<Vec<u8>, String>;
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
enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), Error>>),
    Seed(Box<SignedManifest>, oneshot::Sender<Result<(), Error>>),
    FindManifest {
        channel: String,
        arch: String,
        pinned: PublicKey,
        wait: Duration,
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
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
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

#[derive(NetworkBehaviour)]
struct Behaviour {
    // First, so a connection over a cap is refused before any other
    // behaviour spends anything on it.
    limits: libp2p::connection_limits::Behaviour,
    memory: libp2p::memory_connection_limits::Behaviour,
    rr: request_response::Behaviour<ChunkCodec>,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// A manifest this node holds chunks of.
struct Held {
    manifest: SignedManifest,
    hashes: Vec<Hash>,
    lens: Vec<u64>,
    /// (name, first chunk, chunk count, size) per artifact.
    artifacts: Vec<(String, usize, usize, u64)>,
    /// The one record of which chunks are held (what this node serves), and
    /// the fetch state while this root is being fetched.
    sched: Scheduler<Source>,
    /// Verified bytes held per artifact.
    done: Vec<u64>,
    announced: bool,
    /// What this node has sent of each chunk (super-seeding once complete).
    sent: crate::superseed::SendCounts,
}

impl Held {
    fn new(manifest: SignedManifest, cfg: SchedulerConfig, rng_seed: u64) -> Self {
        let mut hashes = Vec::new();
        let mut lens = Vec::new();
        let mut artifacts = Vec::new();
        for a in &manifest.manifest().artifacts {
            artifacts.push((a.name.clone(), hashes.len(), a.chunks.len(), a.size));
            for (i, h) in a.chunks.iter().enumerate() {
                hashes.push(*h);
                lens.push(a.chunk_len(i));
            }
        }
        let n = hashes.len();
        let done = vec![0; artifacts.len()];
        Held {
            manifest,
            hashes,
            lens,
            artifacts,
            sched: Scheduler::new(n, cfg, rng_seed),
            done,
            announced: false,
            sent: crate::superseed::SendCounts::new(n),
        }
    }

    /// Marks chunk `i` held and counts its bytes, once.
    fn mark(&mut self, i: usize) {
        if !self.sched.is_held(i as u32) {
            self.sched.mark_held(i as u32);
            self.add_done(i);
        }
    }

    fn add_done(&mut self, i: usize) {
        let a = self
            .artifacts
            .partition_point(|(_, first, _, _)| *first <= i);
        if let Some(d) = a.checked_sub(1).and_then(|a| self.done.get_mut(a)) {
            *d += self.lens[i];
        }
    }

    fn progress(&self, peers: usize) -> FetchProgress {
        FetchProgress {
            artifacts: self
                .artifacts
                .iter()
                .zip(&self.done)
                .map(|((name, _, _, size), done)| (name.clone(), *done, *size))
                .collect(),
            held: self.sched.held_count(),
            total: self.hashes.len(),
            peers,
        }
    }
}

/// What belongs to one fetch; the chunks and the scheduler belong to the
/// root's [`Held`], so a later fetch of the same root resumes.
struct Fetch {
    root: Root,
    start: Instant,
    stats: BTreeMap<Source, PeerStats>,
    bytes: u64,
    /// Peers banned while this fetch ran (the node's set holds them all).
    banned: Vec<PeerId>,
    fallback: Option<Arc<dyn Fallback>>,
    progress: Option<watch::Sender<FetchProgress>>,
    reply: oneshot::Sender<Result<FetchReport, Error>>,
    last_lookup: Instant,
}

struct Find {
    channel: String,
    arch: String,
    pinned: PublicKey,
    deadline: Instant,
    asked: HashSet<PeerId>,
    outstanding: usize,
    best: Option<SignedManifest>,
    reply: oneshot::Sender<Result<SignedManifest, Error>>,
}

enum Outbound {
    Chunk { root: Root, index: u32 },
    HaveMap { root: Root },
    Latest,
}

/// The node. Start one with [`Node::spawn`].
pub struct Node {
    swarm: Swarm<Behaviour>,
    store: Arc<dyn ChunkStore>,
    cfg: NodeConfig,
    rx: mpsc::Receiver<Command>,
    held: HashMap<Root, Held>,
    fetch: Option<Fetch>,
    find: Option<Find>,
    outbound: HashMap<OutboundRequestId, (PeerId, Outbound)>,
    inbound: HashMap<request_response::InboundRequestId, PeerId>,
    serving: HashMap<PeerId, usize>,
    serving_total: usize,
    /// Per peer: start of the current one-second window and busy answers in it.
    busy_log: HashMap<PeerId, (Instant, u32)>,
    connected: HashSet<PeerId>,
    /// Peers that sent bytes failing verification, for the life of the
    /// process: the one ban list (schedulers forget a banned peer).
    banned: HashSet<PeerId>,
    blocked: HashMap<PeerId, Instant>,
    listen: Vec<Multiaddr>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    fb_tx: mpsc::Sender<(Root, u32, Result<Vec<u8>, String>)>,
    fb_rx: mpsc::Receiver<(Root, u32, Result<Vec<u8>, String>)>,
    last_provide: Instant,
    epoch: Instant,
    metrics: Metrics,
    /// libp2p's recorders, when the caller asked for metrics.
    p2p_metrics: Option<libp2p::metrics::Metrics>,
    /// Our own dials, capped.
    dials: DialQueue,
    /// Whether the DHT runs in server mode (answers others' queries and
    /// keeps their provider records).
    kad_server: bool,
    /// Offences per remote address, and the addresses refused.
    ip_bans: IpBans,
    /// The remote IP address of each connected peer (its first connection).
    peer_ips: HashMap<PeerId, std::net::IpAddr>,
}

/// The DHT's protocol; a peer that does not list it in identify (a node
/// with the DHT off) is kept out of the routing table.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/phase/kad/1");

fn root_key(root: &Root) -> RecordKey {
    RecordKey::new(root)
}

fn latest_key(channel: &str, arch: &str) -> RecordKey {
    RecordKey::new(&format!("phase/latest/{channel}/{arch}"))
}

impl Node {
    /// Builds the swarm, starts listening and dialing, and spawns the event
    /// loop on the current tokio runtime.
    pub fn spawn(cfg: NodeConfig, store: Arc<dyn ChunkStore>) -> Result<Handle, Error> {
        let key = cfg
            .keypair
            .clone()
            .unwrap_or_else(Keypair::generate_ed25519);
        let peer_id = key.public().to_peer_id();
        let rr_cfg = request_response::Config::default()
            .with_request_timeout(cfg.request_timeout)
            // Above the flood limit, so a flood is seen (and the peer dropped)
            // rather than silently refused stream by stream.
            .with_max_concurrent_streams(cfg.flood_limit * 2);
        let (mdns_on, dht_on) = (cfg.mdns, cfg.dht);
        let limits = cfg.limits.clone();
        // A node that dials nobody at start is where others bootstrap: it
        // answers the DHT from the start. Any other node is a DHT client
        // until it holds something to serve ([`Node::announce`]).
        let kad_server = cfg.peers.is_empty();
        // Bandwidth is counted either way (a few atomic adds); it is only
        // exported when the caller gave a registry.
        let mut scratch = crate::metrics::Registry::default();
        let export = cfg.registry.is_some();
        let mut shared = cfg
            .registry
            .as_ref()
            .map(|r| r.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let lib = match shared.as_mut() {
            // libp2p names its own metrics `libp2p_*`.
            Some(r) => &mut **r,
            None => &mut scratch,
        };
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| Error::Transport(e.to_string()))?
            .with_bandwidth_metrics(lib)
            .with_behaviour(|key| {
                let local = key.public().to_peer_id();
                let kad = dht_on.then(|| {
                    let mut kcfg = kad::Config::new(KAD_PROTOCOL);
                    kcfg.set_query_timeout(Duration::from_secs(10));
                    kcfg.set_provider_record_ttl(Some(Duration::from_secs(300)));
                    kcfg.set_provider_publication_interval(None);
                    // Every inbound record comes to the event loop, which
                    // keeps provider records of our keys only.
                    kcfg.set_record_filtering(kad::StoreInserts::FilterBoth);
                    let mut kad = kad::Behaviour::with_config(
                        local,
                        kad::store::MemoryStore::with_config(local, crate::limits::kad_store()),
                        kcfg,
                    );
                    kad.set_mode(Some(if kad_server {
                        kad::Mode::Server
                    } else {
                        kad::Mode::Client
                    }));
                    kad
                });
                let mdns = if mdns_on {
                    Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
                } else {
                    None
                };
                Ok(Behaviour {
                    limits: libp2p::connection_limits::Behaviour::new(limits.connection_limits()),
                    memory: limits.memory_limits(),
                    rr: request_response::Behaviour::with_codec(
                        ChunkCodec,
                        [(StreamProtocol::new(PROTOCOL), ProtocolSupport::Full)],
                        rr_cfg,
                    ),
                    kad: Toggle::from(kad),
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/phase/id/1".into(),
                        key.public(),
                    )),
                    mdns: Toggle::from(mdns),
                })
            })
            .map_err(|e| Error::Transport(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let p2p_metrics = export.then(|| libp2p::metrics::Metrics::new(lib));
        drop(shared);
        for addr in &cfg.listen {
            swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        }
        let (tx, rx) = mpsc::channel(32);
        let (fb_tx, fb_rx) = mpsc::channel(32);
        let metrics = cfg.metrics.clone();
        let dials = DialQueue::new(&cfg.limits);
        let ip_bans = IpBans::new(&cfg.limits);
        let peers = cfg.peers.clone();
        let mut node = Node {
            swarm,
            store,
            cfg,
            rx,
            held: HashMap::new(),
            fetch: None,
            find: None,
            outbound: HashMap::new(),
            inbound: HashMap::new(),
            serving: HashMap::new(),
            serving_total: 0,
            busy_log: HashMap::new(),
            connected: HashSet::new(),
            banned: HashSet::new(),
            blocked: HashMap::new(),
            listen: Vec::new(),
            listen_waiters: Vec::new(),
            fb_tx,
            fb_rx,
            last_provide: Instant::now(),
            epoch: Instant::now(),
            metrics,
            p2p_metrics,
            dials,
            kad_server,
            ip_bans,
            peer_ips: HashMap::new(),
        };
        for addr in peers {
            node.dial(Target::Addr(addr))?;
        }
        tokio::spawn(node.run());
        Ok(Handle { tx, peer_id })
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                cmd = self.rx.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    // Every handle dropped: the node stops.
                    None => return,
                },
                Some((root, index, res)) = self.fb_rx.recv() => self.on_fallback(root, index, res),
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The DHT, or `None` when this node runs without it.
    fn kad(&mut self) -> Option<&mut kad::Behaviour<kad::store::MemoryStore>> {
        self.swarm.behaviour_mut().kad.as_mut()
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::ListenAddrs(r) => {
                if self.listen.is_empty() {
                    self.listen_waiters.push(r);
                } else {
                    let _ = r.send(self.listen.clone());
                }
            }
            Command::Dial(addr, r) => {
                let _ = r.send(self.dial(Target::Addr(addr)));
            }
            Command::Seed(m, r) => {
                let _ = r.send(self.seed(*m));
            }
            Command::FindManifest {
                channel,
                arch,
                pinned,
                wait,
                reply,
            } => {
                if channel.len() > MAX_NAME || arch.len() > MAX_NAME {
                    let _ = reply.send(Err(Error::NoManifest {
                        what: format!("{channel}/{arch}"),
                    }));
                    return;
                }
                if let Some(kad) = self.kad() {
                    kad.get_providers(latest_key(&channel, &arch));
                }
                let mut find = Find {
                    channel,
                    arch,
                    pinned,
                    deadline: Instant::now() + wait,
                    asked: HashSet::new(),
                    outstanding: 0,
                    best: None,
                    reply,
                };
                for p in self.connected.clone() {
                    self.ask_latest(&mut find, p);
                }
                self.find = Some(find);
            }
            Command::Fetch {
                manifest,
                fallback,
                progress,
                reply,
            } => self.start_fetch(*manifest, fallback, progress, reply),
            Command::Peers(r) => {
                let _ = r.send(self.connected.iter().copied().collect());
            }
        }
    }

    fn seed(&mut self, m: SignedManifest) -> Result<(), Error> {
        let root = *m.root().as_bytes();
        let mut held = Held::new(m, self.cfg.scheduler.clone(), self.cfg.rng_seed);
        for i in 0..held.hashes.len() {
            if self.store.has(&held.hashes[i]) {
                held.mark(i);
            }
        }
        if !held.sched.is_done() {
            return Err(Error::Fetch {
                root: Hash::from_bytes(root).to_hex(),
                reason: format!(
                    "cannot seed: the store holds {} of {} chunks",
                    held.sched.held_count(),
                    held.hashes.len()
                ),
            });
        }
        let m = held.manifest.manifest();
        self.metrics.serving(&m.channel, &m.arch, m.sequence);
        self.held.insert(root, held);
        self.announce(root);
        Ok(())
    }

    fn announce(&mut self, root: Root) {
        let Some(h) = self.held.get_mut(&root) else {
            return;
        };
        h.announced = true;
        let m = h.manifest.manifest();
        let latest = latest_key(&m.channel, &m.arch);
        let to_server = !self.kad_server;
        self.kad_server = true;
        let Some(kad) = self.kad() else {
            return;
        };
        if to_server {
            // It holds something now: peers may ask it, so it answers the DHT.
            kad.set_mode(Some(kad::Mode::Server));
            tracing::debug!("DHT server mode: holding chunks to serve");
        }
        if let Err(e) = kad.start_providing(root_key(&root)) {
            tracing::warn!(error = %e, "cannot announce provider record");
        }
        let _ = kad.start_providing(latest);
        tracing::debug!(root = %Hash::from_bytes(root), "announced");
    }

    fn start_fetch(
        &mut self,
        m: SignedManifest,
        fallback: Option<Arc<dyn Fallback>>,
        progress: Option<watch::Sender<FetchProgress>>,
        reply: oneshot::Sender<Result<FetchReport, Error>>,
    ) {
        if let Some(f) = &self.fetch {
            if !f.reply.is_closed() {
                let _ = reply.send(Err(Error::Fetch {
                    root: m.root().to_hex(),
                    reason: "another fetch is running on this node; wait for it to finish \
                             or drop it before fetching again"
                        .into(),
                }));
                return;
            }
            // Its caller gave up (a timeout): this fetch takes over and
            // resumes from what that one verified.
            tracing::debug!(root = %Hash::from_bytes(f.root), "replacing an abandoned fetch");
            self.fetch = None;
        }
        let root = *m.root().as_bytes();
        let (cfg, seed) = (self.cfg.scheduler.clone(), self.cfg.rng_seed);
        let held = self
            .held
            .entry(root)
            .or_insert_with(|| Held::new(m, cfg, seed));
        // A fresh view of peers and timers, but not of the chunks held.
        held.sched.reset();
        held.sched
            .set_fallback(fallback.is_some().then_some(Source::HttpSeed));
        for i in 0..held.hashes.len() {
            if self.store.has(&held.hashes[i]) {
                held.mark(i);
            }
        }
        let need_announce = held.sched.held_count() > 0 && !held.announced;
        let mm = held.manifest.manifest();
        self.metrics.serving(&mm.channel, &mm.arch, mm.sequence);
        if let Some(kad) = self.kad() {
            kad.get_providers(root_key(&root));
        }
        self.fetch = Some(Fetch {
            root,
            start: Instant::now(),
            stats: BTreeMap::new(),
            bytes: 0,
            banned: Vec::new(),
            fallback,
            progress,
            reply,
            last_lookup: Instant::now(),
        });
        if need_announce {
            self.announce(root);
        }
        let peers: Vec<Source> = self.connected.iter().map(|p| Source::Peer(*p)).collect();
        self.drive(Input::ProvidersFound(peers));
    }

    /// Feeds the running fetch's scheduler and carries out its actions.
    fn drive(&mut self, mut input: Input<Source>) {
        let now = self.now();
        let Some(root) = self.fetch.as_ref().map(|f| f.root) else {
            return;
        };
        // The scheduler forgot every banned peer; it must not hear of one again.
        let banned = |s: &Source| matches!(s, Source::Peer(p) if self.banned.contains(p));
        match &mut input {
            Input::ProvidersFound(ps) => ps.retain(|p| !banned(p)),
            Input::Tick => {}
            Input::PeerFound(p)
            | Input::HaveMap { peer: p, .. }
            | Input::Have { peer: p, .. }
            | Input::ChunkOk { peer: p, .. }
            | Input::ChunkBad { peer: p, .. }
            | Input::ChunkFailed { peer: p, .. }
            | Input::DoNotHave { peer: p, .. }
            | Input::Busy { peer: p, .. }
            | Input::Unchoke(p)
            | Input::PeerGone(p) => {
                if banned(p) {
                    return;
                }
            }
        }
        // Alone (no peer connected, no dial in flight): the HTTP rescue need
        // not wait for anyone (the top-level DESIGN.md, decision 11).
        let alone = self.connected.is_empty()
            && self
                .swarm
                .network_info()
                .connection_counters()
                .num_pending_outgoing()
                == 0;
        let Some(h) = self.held.get_mut(&root) else {
            return;
        };
        h.sched.set_alone(alone, now);
        let actions = h.sched.handle(input, now);
        for a in actions {
            match a {
                Action::Request {
                    peer: Source::Peer(p),
                    chunk,
                } => {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .rr
                        .send_request(&p, Inbound::Ok(Request::Chunk { root, index: chunk }));
                    self.outbound
                        .insert(id, (p, Outbound::Chunk { root, index: chunk }));
                }
                Action::Request {
                    peer: Source::HttpSeed,
                    chunk,
                } => {
                    let Some(f) = self.fetch.as_ref() else { return };
                    let (Some(fb), Some(h)) = (
                        f.fallback.clone(),
                        self.held
                            .get(&root)
                            .and_then(|h| h.hashes.get(chunk as usize)),
                    ) else {
                        continue;
                    };
                    let (hash, tx) = (*h, self.fb_tx.clone());
                    tokio::spawn(async move {
                        let res = tokio::task::spawn_blocking(move || fb.get(&hash))
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()));
                        let _ = tx.send((root, chunk, res)).await;
                    });
                }
                Action::AskHaveMap(Source::Peer(p)) => {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .rr
                        .send_request(&p, Inbound::Ok(Request::HaveMap { root }));
                    self.outbound.insert(id, (p, Outbound::HaveMap { root }));
                }
                Action::AskHaveMap(Source::HttpSeed) => {}
                Action::Ban(Source::Peer(p)) => {
                    if self.banned.insert(p) {
                        self.metrics.banned("bad_chunk");
                        tracing::warn!(peer = %p, "banned: sent a chunk that failed verification");
                        if let Some(f) = self.fetch.as_mut() {
                            f.banned.push(p);
                        }
                    }
                    self.ip_offence(p);
                    let _ = self.swarm.disconnect_peer_id(p);
                }
                Action::Ban(Source::HttpSeed) => {
                    tracing::warn!("the HTTP seed sent a chunk that failed verification");
                }
                Action::Done => self.finish_fetch(),
            }
        }
    }

    fn finish_fetch(&mut self) {
        let Some(f) = self.fetch.take() else {
            return;
        };
        let report = FetchReport {
            wall: f.start.elapsed(),
            bytes: f.bytes,
            sources: f.stats,
            banned: f.banned,
        };
        self.metrics.fetched(report.wall);
        if let (Some(p), Some(h)) = (&f.progress, self.held.get(&f.root)) {
            let _ = p.send(h.progress(self.connected.len()));
        }
        let _ = f.reply.send(Ok(report));
    }

    fn on_fallback(&mut self, root: Root, index: u32, res: Result<Vec<u8>, String>) {
        match res {
            Ok(data) => self.on_chunk(Source::HttpSeed, root, index, Some(data)),
            Err(e) => {
                tracing::debug!(index, error = %e, "fallback chunk failed");
                if self.fetch.as_ref().is_some_and(|f| f.root == root) {
                    self.drive(Input::ChunkFailed {
                        peer: Source::HttpSeed,
                        chunk: index,
                    });
                }
            }
        }
    }

    /// A chunk arrived from `src` (`None`: the answer was not a chunk at all).
    fn on_chunk(&mut self, src: Source, root: Root, index: u32, data: Option<Vec<u8>>) {
        if matches!(src, Source::Peer(p) if self.banned.contains(&p)) {
            // A late answer from a banned peer: its bytes are not wanted.
            return;
        }
        let Some(held) = self.held.get_mut(&root) else {
            return;
        };
        let i = index as usize;
        let fetching = self.fetch.as_ref().is_some_and(|f| f.root == root);
        let data = match data {
            Some(d) if i < held.hashes.len() && d.len() as u64 == held.lens[i] => d,
            _ => {
                self.metrics.rejected(&src);
                if fetching {
                    self.drive(Input::ChunkBad {
                        peer: src,
                        chunk: index,
                    });
                }
                return;
            }
        };
        // Verify exactly once: the store checks the hash before it keeps the
        // bytes; a duplicate (end-game) is still checked, so a liar is caught.
        let verdict = if held.sched.is_held(index) {
            if Hash::of(&data) == held.hashes[i] {
                Ok(())
            } else {
                Err(None)
            }
        } else {
            match self.store.put(&held.hashes[i], &data) {
                Ok(_) => {
                    held.mark(i);
                    Ok(())
                }
                Err(phase_content::Error::ChunkMismatch { .. }) => Err(None),
                Err(e) => Err(Some(e)),
            }
        };
        match verdict {
            Ok(()) => {}
            Err(None) => {
                self.metrics.rejected(&src);
                if fetching {
                    self.drive(Input::ChunkBad {
                        peer: src,
                        chunk: index,
                    });
                }
                return;
            }
            Err(Some(e)) => {
                tracing::warn!(error = %e, "cannot store chunk");
                if fetching {
                    self.drive(Input::ChunkFailed {
                        peer: src,
                        chunk: index,
                    });
                }
                return;
            }
        }
        let first = !held.announced;
        let progress = held.progress(self.connected.len());
        if fetching {
            self.metrics.verified(&src, data.len());
        } else {
            self.metrics.late(&src, data.len());
        }
        if let Some(f) = self.fetch.as_mut().filter(|f| f.root == root) {
            let st = f.stats.entry(src).or_default();
            st.bytes += data.len() as u64;
            st.chunks += 1;
            f.bytes += data.len() as u64;
            if let Some(p) = &f.progress {
                let _ = p.send(progress);
            }
        }
        if first {
            // Announce as soon as the first verified chunk is held.
            self.announce(root);
        }
        if fetching {
            self.drive(Input::ChunkOk {
                peer: src,
                chunk: index,
            });
        }
    }

    fn ask_latest(&mut self, find: &mut Find, p: PeerId) {
        if self.banned.contains(&p) || !find.asked.insert(p) {
            return;
        }
        let id = self.swarm.behaviour_mut().rr.send_request(
            &p,
            Inbound::Ok(Request::Latest {
                channel: find.channel.clone(),
                arch: find.arch.clone(),
            }),
        );
        find.outstanding += 1;
        self.outbound.insert(id, (p, Outbound::Latest));
    }

    fn find_check(&mut self) {
        let Some(f) = self.find.as_ref() else { return };
        let timed_out = Instant::now() >= f.deadline;
        if (f.best.is_some() && f.outstanding == 0) || timed_out {
            let Some(f) = self.find.take() else { return };
            let what = format!("{}/{}", f.channel, f.arch);
            let _ = f.reply.send(f.best.ok_or(Error::NoManifest { what }));
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.pump_dials();
        self.ip_bans.expire(now);
        self.blocked.retain(|_, until| *until > now);
        self.busy_log
            .retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(2));
        if self.fetch.is_some() {
            self.drive(Input::Tick);
        }
        let lookup = self
            .fetch
            .as_ref()
            .filter(|f| f.last_lookup.elapsed() >= self.cfg.lookup_interval)
            .map(|f| f.root);
        if let Some(root) = lookup {
            if let Some(f) = self.fetch.as_mut() {
                f.last_lookup = now;
            }
            if let Some(kad) = self.kad() {
                kad.get_providers(root_key(&root));
            }
        }
        if self.last_provide.elapsed() >= self.cfg.provide_interval {
            self.last_provide = now;
            let roots: Vec<Root> = self
                .held
                .iter()
                .filter(|(_, h)| h.announced)
                .map(|(r, _)| *r)
                .collect();
            for r in roots {
                self.announce(r);
            }
        }
        self.find_check();
    }

    /// Dials `t` now if fewer than the cap are in flight, else queues it;
    /// a dial the full queue cannot take is dropped (counted) with an error.
    fn dial(&mut self, t: Target) -> Result<(), Error> {
        match self.dials.offer(t) {
            Offer::Now(t) => self.dial_now(&t),
            Offer::Queued => Ok(()),
            Offer::Dropped => {
                let n = self.dials.dropped();
                tracing::debug!(dropped = n, "dial queue full: dial dropped");
                Err(Error::Dial {
                    addr: "(queued dial)".into(),
                    reason: format!(
                        "{} dials in flight and {} waiting already; dropped ({n} so far)",
                        self.cfg.limits.max_dials_in_flight, self.cfg.limits.max_dials_waiting
                    ),
                })
            }
        }
    }

    fn dial_now(&mut self, t: &Target) -> Result<(), Error> {
        let opts = t.opts();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dials.started(id, Instant::now());
                Ok(())
            }
            Err(e) => Err(Error::Dial {
                addr: match t {
                    Target::Addr(a) => a.to_string(),
                    Target::Peer(p) => p.to_string(),
                },
                reason: e.to_string(),
            }),
        }
    }

    /// A connection was established or a dial failed: if it was one of our
    /// dials, its slot goes to the next waiting one.
    fn dial_ended(&mut self, id: libp2p::swarm::ConnectionId) {
        if self.dials.ended(id) {
            self.pump_dials();
        }
    }

    /// Starts the waiting dials that fit now.
    fn pump_dials(&mut self) {
        for t in self.dials.ready(Instant::now()) {
            if let Err(e) = self.dial_now(&t) {
                tracing::debug!(error = %e, "queued dial failed");
            }
        }
    }

    fn block(&mut self, peer: PeerId, why: &str) {
        tracing::warn!(%peer, why, "dropping peer");
        self.blocked
            .insert(peer, Instant::now() + self.cfg.block_time);
        self.ip_offence(peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Counts an offence of `peer` against its address too: a new identity
    /// costs nothing, a new address does.
    fn ip_offence(&mut self, peer: PeerId) {
        let Some(ip) = self.peer_ips.get(&peer).copied() else {
            return;
        };
        if self.ip_bans.offence(ip, peer, Instant::now()) {
            self.metrics.banned("address");
            tracing::warn!(
                %ip,
                threshold = self.cfg.limits.ip_ban_threshold,
                for_secs = self.cfg.limits.ip_ban_time.as_secs(),
                "refusing new connections from an address: offences from many peer ids"
            );
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        if let Some(m) = &self.p2p_metrics {
            use libp2p::metrics::Recorder;
            m.record(&ev);
            match &ev {
                SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => m.record(e),
                _ => {}
            }
        }
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address
                    .clone()
                    .with_p2p(*self.swarm.local_peer_id())
                    .unwrap_or(address.clone());
                tracing::info!(addr = %full, "listening");
                self.listen.push(address);
                for w in self.listen_waiters.drain(..) {
                    let _ = w.send(self.listen.clone());
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, .. } => {
                self.dial_ended(connection_id)
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "incoming connection refused or failed");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                connection_id,
                ..
            } => {
                self.dial_ended(connection_id);
                if self.banned.contains(&peer_id) || self.blocked.contains_key(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let ip = ip_of(endpoint.get_remote_address());
                if let Some(ip) = ip
                    && !self.connected.contains(&peer_id)
                    && self.ip_bans.is_banned(ip, Instant::now())
                {
                    tracing::debug!(peer = %peer_id, %ip, "connection from a refused address closed");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if let Some(ip) = ip {
                    self.peer_ips.entry(peer_id).or_insert(ip);
                }
                if endpoint.is_dialer() {
                    let addr = endpoint.get_remote_address().clone();
                    if let Some(kad) = self.kad() {
                        kad.add_address(&peer_id, addr);
                    }
                }
                if num_established.get() == 1 {
                    self.connected.insert(peer_id);
                    self.metrics.set_connected(self.connected.len());
                    tracing::debug!(peer = %peer_id, "connected");
                    if let Some(mut f) = self.find.take() {
                        self.ask_latest(&mut f, peer_id);
                        self.find = Some(f);
                    }
                    self.drive(Input::PeerFound(Source::Peer(peer_id)));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                self.peer_ips.remove(&peer_id);
                self.metrics.set_connected(self.connected.len());
                self.drive(Input::PeerGone(Source::Peer(peer_id)));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(ev)) => self.on_rr(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest { request })) => {
                self.on_kad_inbound(request)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let Some(kad) = self.kad() else { return };
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for a in info.listen_addrs {
                        kad.add_address(&peer_id, a);
                    }
                } else {
                    // A node without the DHT: our walks, and the peers we
                    // answer, must not dial it (it chose where its peers
                    // come from). A dial may have put it in the table.
                    kad.remove_peer(&peer_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if self.banned.contains(&peer) || self.blocked.contains_key(&peer) {
                        continue;
                    }
                    tracing::debug!(%peer, %addr, "mDNS discovered");
                    if let Some(kad) = self.kad() {
                        kad.add_address(&peer, addr.clone());
                    }
                    if !self.connected.contains(&peer) {
                        let _ = self.dial(Target::Addr(addr));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result:
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })),
                ..
            })) => {
                let me = *self.swarm.local_peer_id();
                for p in providers {
                    if p == me || self.banned.contains(&p) || self.blocked.contains_key(&p) {
                        continue;
                    }
                    if self.connected.contains(&p) {
                        self.drive(Input::PeerFound(Source::Peer(p)));
                    } else {
                        // The query still knows its addresses: dial now.
                        let _ = self.dial(Target::Peer(p));
                    }
                }
            }
            _ => {}
        }
    }

    /// Record filtering: a provider record of one of our keys is kept (up
    /// to the store's bounds); value records are never stored.
    fn on_kad_inbound(&mut self, request: kad::InboundRequest) {
        match request {
            kad::InboundRequest::AddProvider {
                record: Some(record),
            } => {
                if !crate::limits::provider_key_ok(record.key.as_ref()) {
                    tracing::debug!(provider = %record.provider, "provider record of a foreign key refused");
                    return;
                }
                use kad::store::RecordStore;
                if let Some(kad) = self.kad()
                    && let Err(e) = kad.store_mut().add_provider(record)
                {
                    tracing::debug!(error = %e, "provider record not stored");
                }
            }
            kad::InboundRequest::PutRecord {
                source,
                record: Some(_),
                ..
            } => {
                tracing::debug!(%source, "value record refused: only provider records are kept");
            }
            _ => {}
        }
    }

    fn on_rr(&mut self, ev: request_response::Event<Inbound, Response>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request_id,
                        request,
                        channel,
                    },
                ..
            } => {
                if self.banned.contains(&peer) || self.blocked.contains_key(&peer) {
                    let _ = self.swarm.disconnect_peer_id(peer);
                    return;
                }
                let request = match request {
                    Inbound::Ok(r) => r,
                    Inbound::Bad(why) => {
                        tracing::debug!(%peer, %why, "malformed request");
                        self.metrics.banned("malformed");
                        self.block(peer, "malformed or oversize request");
                        return;
                    }
                };
                let n = self.serving.entry(peer).or_default();
                *n += 1;
                let n = *n;
                self.serving_total += 1;
                self.inbound.insert(request_id, peer);
                if n > self.cfg.flood_limit {
                    self.metrics.banned("flood");
                    self.block(peer, "request flood");
                    return;
                }
                let busy =
                    n > self.cfg.per_peer_serving || self.serving_total > self.cfg.max_serving;
                let resp = self.answer(peer, request, busy);
                // Busy and refused answers alike: an honest peer backs off
                // after one, and never sends what we refuse.
                if matches!(resp, Response::Busy | Response::Refused(_)) {
                    let now = Instant::now();
                    let e = self.busy_log.entry(peer).or_insert((now, 0));
                    if now.duration_since(e.0) >= Duration::from_secs(1) {
                        *e = (now, 0);
                    }
                    e.1 += 1;
                    if e.1 > self.cfg.flood_busy {
                        self.metrics.banned("flood");
                        self.block(peer, "request flood (kept asking while told busy)");
                        return;
                    }
                }
                self.metrics.answered(&resp);
                self.respond(channel, resp);
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((_, what)) = self.outbound.remove(&request_id) else {
                    return;
                };
                self.on_response(peer, what, response);
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let Some((_, what)) = self.outbound.remove(&request_id) else {
                    return;
                };
                tracing::debug!(%peer, %error, "request failed");
                match what {
                    Outbound::Chunk { root, index } => {
                        if self.fetch.as_ref().is_some_and(|f| f.root == root) {
                            self.drive(Input::ChunkFailed {
                                peer: Source::Peer(peer),
                                chunk: index,
                            });
                        }
                    }
                    Outbound::HaveMap { .. } => {}
                    Outbound::Latest => {
                        if let Some(f) = self.find.as_mut() {
                            f.outstanding = f.outstanding.saturating_sub(1);
                        }
                        self.find_check();
                    }
                }
            }
            Event::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "answering a request failed");
                self.inbound_done(request_id);
                if let request_response::InboundFailure::Io(e) = &error
                    && e.to_string() == crate::codec::STALLED
                {
                    // It asked and did not read for WRITE_STALL: the upload is
                    // cancelled (its slot is free) and the peer not served.
                    self.block(peer, "asked for chunks and did not read them");
                }
            }
            Event::ResponseSent { request_id, .. } => self.inbound_done(request_id),
        }
    }

    fn inbound_done(&mut self, id: request_response::InboundRequestId) {
        if let Some(peer) = self.inbound.remove(&id) {
            self.serving_total = self.serving_total.saturating_sub(1);
            if let Some(n) = self.serving.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.serving.remove(&peer);
                }
            }
        }
    }

    fn respond(&mut self, ch: ResponseChannel<Response>, r: Response) {
        let _ = self.swarm.behaviour_mut().rr.send_response(ch, r);
    }

    fn read_chunk(&self, held: &Held, i: usize) -> Option<Vec<u8>> {
        if !held.sched.is_held(i as u32) {
            return None;
        }
        match self.store.get(&held.hashes[i]) {
            Ok(Some(b)) => Some(b.to_vec()),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read chunk");
                None
            }
        }
    }

    fn answer(&mut self, peer: PeerId, req: Request, busy: bool) -> Response {
        let refused = |s: &str| Response::Refused(s.to_owned());
        match req {
            Request::HaveMap { root } => match self.held.get(&root) {
                Some(h) if self.cfg.super_seed && h.sched.is_done() => Response::HaveMap {
                    chunks: h.hashes.len() as u32,
                    bits: pack_bits(&h.sent.offer_map()),
                },
                Some(h) => Response::HaveMap {
                    chunks: h.hashes.len() as u32,
                    bits: pack_bits(h.sched.held()),
                },
                None => Response::DoNotHave,
            },
            Request::Manifest { root } => match self.held.get(&root) {
                Some(h) => Response::Manifest(h.manifest.envelope().to_vec()),
                None => Response::DoNotHave,
            },
            Request::Latest { channel, arch } => self
                .held
                .values()
                .filter(|h| {
                    let m = h.manifest.manifest();
                    m.channel == channel && m.arch == arch
                })
                .max_by_key(|h| h.manifest.manifest().sequence)
                .map_or(Response::DoNotHave, |h| {
                    Response::Manifest(h.manifest.envelope().to_vec())
                }),
            Request::Chunk { .. } if busy => Response::Busy,
            Request::Chunk { root, index } => {
                let Some(h) = self.held.get(&root) else {
                    return Response::DoNotHave;
                };
                let i = index as usize;
                if i >= h.hashes.len() {
                    tracing::debug!(%peer, index, "chunk index out of range");
                    return refused("chunk index out of range");
                }
                if self.cfg.super_seed && h.sched.is_done() && !h.sent.offer(i) {
                    // Sent more often than others: let peers serve this one.
                    return Response::DoNotHave;
                }
                match self.read_chunk(h, i) {
                    Some(data) => {
                        if let Some(h) = self.held.get_mut(&root) {
                            h.sent.record(i);
                        }
                        Response::Chunks(vec![Piece { index, data }])
                    }
                    None => Response::DoNotHave,
                }
            }
            // Nothing asks for ranges (the scheduler asks chunk by chunk),
            // and one range holds an upload slot eight times as long as a
            // chunk: refused. The variant stays so the wire numbering does.
            Request::Range { .. } => refused("range requests are not served; ask chunk by chunk"),
        }
    }

    fn on_response(&mut self, peer: PeerId, what: Outbound, resp: Response) {
        match what {
            Outbound::Chunk { root, index } => {
                let fetching = self.fetch.as_ref().is_some_and(|f| f.root == root);
                let src = Source::Peer(peer);
                match resp {
                    Response::Chunks(mut pieces) if pieces.len() == 1 => {
                        let p = pieces.remove(0);
                        let data = (p.index == index).then_some(p.data);
                        self.on_chunk(src, root, index, data);
                    }
                    Response::Chunks(_) => self.on_chunk(src, root, index, None),
                    Response::DoNotHave if fetching => self.drive(Input::DoNotHave {
                        peer: src,
                        chunk: index,
                    }),
                    Response::Busy if fetching => {
                        self.metrics.busy_received();
                        self.drive(Input::Busy {
                            peer: src,
                            chunk: index,
                        })
                    }
                    _ if fetching => self.drive(Input::ChunkFailed {
                        peer: src,
                        chunk: index,
                    }),
                    _ => {}
                }
            }
            Outbound::HaveMap { root } => {
                let Some(n) = self.held.get(&root).map(|h| h.hashes.len()) else {
                    return;
                };
                match resp {
                    Response::HaveMap { chunks, bits } if chunks as usize == n => {
                        if let Some(have) = unpack_bits(chunks, &bits) {
                            self.drive(Input::HaveMap {
                                peer: Source::Peer(peer),
                                have,
                            });
                        }
                    }
                    Response::DoNotHave => self.drive(Input::HaveMap {
                        peer: Source::Peer(peer),
                        have: vec![false; n],
                    }),
                    _ => {}
                }
            }
            Outbound::Latest => {
                if let Some(f) = self.find.as_mut() {
                    f.outstanding = f.outstanding.saturating_sub(1);
                    if let Response::Manifest(bytes) = resp {
                        match SignedManifest::verify(&bytes, &f.pinned) {
                            Ok(m)
                                if m.manifest().channel == f.channel
                                    && m.manifest().arch == f.arch =>
                            {
                                let better = f
                                    .best
                                    .as_ref()
                                    .is_none_or(|b| m.manifest().sequence > b.manifest().sequence);
                                if better {
                                    f.best = Some(m);
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "peer offered a manifest that does not verify");
                            }
                        }
                    }
                }
                self.find_check();
            }
        }
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
    fn progress_counts_bytes_per_artifact() {
        use phase_content::{Artifact, FORMAT, Manifest, SecretKey, chunk_hashes};
        let key = SecretKey::from_seed([1; 32]);
        let k = vec![1u8; 10_000];
        let i = vec![2u8; 5_000];
        let art = |name: &str, d: &[u8]| Artifact {
            name: name.into(),
            size: d.len() as u64,
            hash: Hash::of(d),
            chunk_size: 4096,
            chunks: chunk_hashes(d, 4096),
        };
        let m = Manifest {
            format: FORMAT,
            channel: "stable".into(),
            arch: "x86_64".into(),
            sequence: 1,
            created: 0,
            publisher: key.public(),
            cmdline: None,
            artifacts: vec![art("kernel", &k), art("initramfs", &i)],
            seeds: vec![],
            peers: vec![],
        }
        .sign(&key)
        .unwrap();
        let mut h = Held::new(m, SchedulerConfig::default(), 1);
        assert_eq!(h.hashes.len(), 5);
        h.mark(2);
        h.mark(4);
        h.mark(4);
        let p = h.progress(0);
        assert_eq!(p.artifacts[0], ("kernel".into(), 10_000 - 8192, 10_000));
        assert_eq!(p.artifacts[1], ("initramfs".into(), 5_000 - 4096, 5_000));
        assert_eq!((p.held, p.total), (2, 5));
        assert!(
            h.sched.is_held(4) && !h.sched.is_held(3),
            "the scheduler is the record"
        );
    }

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
