//! The node: one event loop that owns the libp2p `Swarm`, the serving state
//! and the running fetch; a cloneable [`Handle`] sends it commands.
//!
//! Where each part lives (every file adds methods to the one [`Node`]):
//! - `mod.rs`: the [`Node`] struct, [`Node::spawn`], the event loop (`run`,
//!   its `select!`), swarm events, commands, the tick, the libp2p
//!   `Behaviour`.
//! - `config.rs`: [`NodeConfig`], its defaults and builders, and
//!   [`load_or_create_key`].
//! - `handle.rs`: [`Handle`], the commands it sends, and the public types of
//!   a fetch ([`FetchReport`], [`FetchProgress`], [`Source`], [`PeerStats`],
//!   [`Fallback`]).
//! - `client.rs`: the fetching side: manifests held, the running fetch and
//!   manifest search, the scheduler driven, answers to our requests.
//! - `server.rs`: the serving side and its abuse limits: inbound requests,
//!   upload slots, busy and super-seeding answers, blocks and address bans,
//!   DHT record filtering.
//! - `events.rs`: the chunk events `storm --trace` reads (off by default).
//! - `dial.rs`: the neighbourhood (who is dialed, admitted, rotated out),
//!   our dials (capped, queued), seeding and DHT announcements, the DHT keys.

mod client;
mod config;
mod dial;
mod events;
mod handle;
mod server;
mod transport;
mod v2;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::Transport as _;
use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, mdns, noise, tcp, yamux};
use phase_content::ChunkStore;
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::codec::ChunkCodec;
use crate::limits::{DialQueue, IpBans, Target, ip_of};
use crate::metrics::Metrics;
use crate::neighbours::{NeighbourConfig, Neighbours, Origin};
use crate::protocol::{ABOVE_PROTOCOL, MAPS_PROTOCOL, MAX_NAME, PROTOCOL, Root};
use crate::scheduler::Input;
use client::{Fetch, Find, Held, Outbound};
use dial::{latest_key, root_key};
pub use events::MARK as CHUNK_EVENT_MARK;
use handle::Command;

use config::next_lookup_wait;
pub use config::{NodeConfig, load_or_create_key};
pub use handle::{
    Fallback, FetchProgress, FetchReport, Handle, PeerStats, Source, Span, span_by_chunks,
};
pub use v2::Protocol;

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
    stream: Toggle<libp2p_stream::Behaviour>,
}

/// An HTTP rescue answer for (root, chunk): its length and verdict, or why
/// the GET failed.
/// The verdict on one rescued chunk: (index, bytes and verdict, or why the request failed).
type RescueVerdict = (u32, Result<(usize, v2::Verdict), String>);

/// The verdicts on one rescue span's chunks.
type Rescued = (Root, Vec<RescueVerdict>);

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
    /// Who holds an upload slot ([`crate::serving`]), and each chunk upload's slot.
    policy: crate::serving::ServingPolicy<PeerId>,
    uploads: HashMap<request_response::InboundRequestId, crate::serving::SlotToken<PeerId>>,
    /// Chunk requests held until the chunk we asked for arrives
    /// ([`NodeConfig::promise`]).
    parked: Vec<server::Parked>,
    /// Per peer: start of the current one-second window and busy answers in it.
    busy_log: HashMap<PeerId, (Instant, u32)>,
    connected: HashSet<PeerId>,
    /// Connected peers that read `ChunksWithMap` (identify lists
    /// [`MAPS_PROTOCOL`]; [`NodeConfig::maps_with_chunks`]).
    maps_peers: HashSet<PeerId>,
    /// Connected peers that answer [`Request::LatestAbove`] (they list
    /// [`ABOVE_PROTOCOL`]).
    above_peers: HashSet<PeerId>,
    /// Peers that sent bytes failing verification, for the life of the
    /// process: the one ban list (schedulers forget a banned peer).
    banned: HashSet<PeerId>,
    blocked: HashMap<PeerId, Instant>,
    listen: Vec<Multiaddr>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    /// HTTP rescue answers, checked and stored off the loop.
    fb_tx: mpsc::Sender<Rescued>,
    /// Chunks the scheduler asked of the HTTP seed during this turn of the
    /// loop, sent as spans at its end ([`Node::rescue_flush`]).
    rescue: Vec<(Root, u32)>,
    fb_rx: mpsc::Receiver<Rescued>,
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
    /// Who we keep connected: at most K, rotated ([`crate::neighbours`]).
    nbrs: Neighbours<PeerId, Target>,
    /// The most libp2p connections established at once (neighbours, and
    /// connections about to be refused).
    connections_peak: usize,
    /// Protocol v2 sessions, with [`Protocol::V2`].
    wire: Option<v2::Wire>,
    wire_rx: Option<mpsc::Receiver<v2::Msg>>,
    wire_freed: Arc<tokio::sync::Notify>,
}

/// The DHT's protocol; a peer that does not list it in identify (a node
/// with the DHT off) is kept out of the routing table.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/phase/kad/1");

/// Requests in flight over all peers for a v2 fetch (see [`Node::spawn`]), at
/// 256 KiB chunks; `Held::new` scales it to the manifest's chunk size.
const V2_MAX_IN_FLIGHT: usize = 4;

impl Node {
    /// Builds the swarm, starts listening and dialing, and spawns the event
    /// loop on the current tokio runtime.
    pub fn spawn(mut cfg: NodeConfig, store: Arc<dyn ChunkStore>) -> Result<Handle, Error> {
        let v2_on = cfg.protocol == Protocol::V2;
        if v2_on {
            // A v2 peer is asked for as many chunks as its session pipelines.
            cfg.scheduler.per_peer_in_flight = cfg.session.depth.max(1);
            // And no more than a few at once over all peers: a request
            // queued at a busy peer holds its chunk from idle holders
            // (`sim --v2 --trace`, N = 1,000: 2.25 x T_min uncapped, 1.90 at 4).
            if cfg.scheduler.max_in_flight == usize::MAX {
                cfg.scheduler.max_in_flight = V2_MAX_IN_FLIGHT;
            }
        }
        let key = cfg
            .keypair
            .clone()
            .unwrap_or_else(Keypair::generate_ed25519);
        let peer_id = key.public().to_peer_id();
        events::log("me", peer_id, 0);
        let rr_cfg = request_response::Config::default()
            .with_request_timeout(cfg.request_timeout)
            // Above the flood limit, so a flood is seen (and the peer dropped)
            // rather than silently refused stream by stream.
            .with_max_concurrent_streams(cfg.flood_limit * 2);
        let (mdns_on, dht_on) = (cfg.mdns, cfg.dht);
        let maps_on = cfg.maps_with_chunks;
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
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)?;
                let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    transport::FreshPortDials(tcp)
                        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default()),
                )
            })
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
                        std::iter::once((StreamProtocol::new(PROTOCOL), ProtocolSupport::Full))
                            .chain(maps_on.then_some((
                                // Listed (identify) so peers know we read
                                // `ChunksWithMap`; we never open it.
                                StreamProtocol::new(MAPS_PROTOCOL),
                                ProtocolSupport::Inbound,
                            )))
                            .chain(std::iter::once((
                                // Listed so peers know we answer
                                // `LatestAbove`; never opened.
                                StreamProtocol::new(ABOVE_PROTOCOL),
                                ProtocolSupport::Inbound,
                            ))),
                        rr_cfg,
                    ),
                    kad: Toggle::from(kad),
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/phase/id/1".into(),
                        key.public(),
                    )),
                    mdns: Toggle::from(mdns),
                    stream: Toggle::from(v2_on.then(libp2p_stream::Behaviour::new)),
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
        let nbrs = Neighbours::new(
            NeighbourConfig::default()
                .with_max(cfg.max_neighbours)
                .with_dial_timeout(cfg.limits.dial_timeout),
        );
        let peers = cfg.peers.clone();
        let policy = crate::serving::ServingPolicy::new(server::serving_config(&cfg));
        let (wire, wire_rx) = match swarm.behaviour().stream.as_ref() {
            Some(b) => {
                let (w, rx) = v2::Wire::new(b, cfg.session.clone())?;
                (Some(w), Some(rx))
            }
            None => (None, None),
        };
        let wire_freed = wire
            .as_ref()
            .map_or_else(|| Arc::new(tokio::sync::Notify::new()), |w| w.freed.clone());
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
            policy,
            uploads: HashMap::new(),
            parked: Vec::new(),
            busy_log: HashMap::new(),
            connected: HashSet::new(),
            maps_peers: HashSet::new(),
            above_peers: HashSet::new(),
            banned: HashSet::new(),
            blocked: HashMap::new(),
            listen: Vec::new(),
            listen_waiters: Vec::new(),
            fb_tx,
            fb_rx,
            rescue: Vec::new(),
            last_provide: Instant::now(),
            epoch: Instant::now(),
            metrics,
            p2p_metrics,
            dials,
            kad_server,
            ip_bans,
            peer_ips: HashMap::new(),
            nbrs,
            connections_peak: 0,
            wire,
            wire_rx,
            wire_freed,
        };
        for addr in peers {
            node.dial_given(addr)?;
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
                Some((root, verdicts)) = self.fb_rx.recv() => self.on_fallback(root, verdicts),
                Some(m) = v2::recv(&mut self.wire_rx) => self.on_v2(m),
                _ = self.wire_freed.notified() => {}
                _ = tick.tick() => self.on_tick(),
            }
            self.v2_after();
            self.rescue_flush();
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
                let _ = r.send(self.dial_given(addr));
            }
            Command::Seed(m, r) => {
                let _ = r.send(self.seed(*m));
            }
            Command::FindManifest {
                channel,
                arch,
                pinned,
                wait,
                known,
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
                    best: known.map(|m| *m),
                    reply,
                };
                for p in self.connected.clone() {
                    self.ask_latest(&mut find, p);
                }
                self.find = Some(find);
                // Nobody to ask and a manifest known: the answer is ready.
                self.find_check();
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
        if !self.parked.is_empty() {
            self.release_parked(None);
        }
        self.neighbour_tick();
        self.v2_tick();
        let first = self.cfg.lookup_interval;
        let lookup = self.fetch.as_mut().and_then(|f| {
            if f.last_lookup.elapsed() < f.lookup_every {
                return None;
            }
            f.last_lookup = now;
            f.lookup_every = next_lookup_wait(f.lookup_every, first, f.lookup_found);
            f.lookup_found = false;
            Some(f.root)
        });
        if let Some(root) = lookup
            && let Some(kad) = self.kad()
        {
            kad.get_providers(root_key(&root));
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
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
                self.neighbour_dial_failed(peer_id, connection_id)
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
                    let inbound = !endpoint.is_dialer();
                    if !self.admit(peer_id, inbound, endpoint.get_remote_address()) {
                        return;
                    }
                    self.connected.insert(peer_id);
                    self.metrics.set_connected(self.connected.len());
                    tracing::debug!(peer = %peer_id, "connected");
                    if let Some(mut f) = self.find.take() {
                        self.ask_latest(&mut f, peer_id);
                        self.find = Some(f);
                    }
                    if self.wire.is_some() {
                        // Found by the scheduler once its session's hello arrives.
                        self.v2_connected(peer_id);
                    } else {
                        self.drive(Input::PeerFound(Source::Peer(peer_id)));
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.nbrs.closed(peer_id, self.now());
                self.fill_neighbours();
                self.peer_ips.remove(&peer_id);
                self.maps_peers.remove(&peer_id);
                self.above_peers.remove(&peer_id);
                if !self.connected.remove(&peer_id) {
                    // Refused at K: never a neighbour, nothing to undo.
                    return;
                }
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
                if self.cfg.maps_with_chunks
                    && self.connected.contains(&peer_id)
                    && info.protocols.iter().any(|p| p.as_ref() == MAPS_PROTOCOL)
                {
                    self.maps_peers.insert(peer_id);
                }
                if self.connected.contains(&peer_id)
                    && info.protocols.iter().any(|p| p.as_ref() == ABOVE_PROTOCOL)
                {
                    self.above_peers.insert(peer_id);
                }
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
                    let t = Target::Addr(crate::addr::with_peer(addr, peer));
                    self.candidate(t, Some(peer), Origin::Mdns);
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
                    let fetching = self.fetch.as_ref().map(|f| f.root);
                    if self.connected.contains(&p) && self.wire.is_some() {
                        if let Some(root) = fetching {
                            self.v2_open(p, root);
                        }
                    } else if self.connected.contains(&p) {
                        self.drive(Input::PeerFound(Source::Peer(p)));
                    } else {
                        if let Some(f) = self.fetch.as_mut() {
                            f.lookup_found = true;
                        }
                        // The query still knows its addresses.
                        self.candidate(Target::Peer(p), Some(p), Origin::Dht);
                    }
                }
            }
            _ => {}
        }
    }
}
