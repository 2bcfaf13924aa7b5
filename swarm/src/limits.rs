//! What a node spends on strangers: connections, memory and dials, each
//! capped (the why of each number is in `swarm/DESIGN.md`, "Resource limits").
//!
//! [`Limits`] is part of [`crate::NodeConfig`]; the node turns it into
//! libp2p's `connection-limits` and `memory-connection-limits` behaviours and
//! a [`DialQueue`] that every dial it makes on its own (mDNS, the seed's
//! `/swarm` addresses, DHT providers) goes through.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::connection_limits::ConnectionLimits;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId};

/// Caps on connections, memory and dials. `Default` fits a seed of a storm
/// of 48 machines with room to spare.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Established connections a peer opened to us, over all peers.
    pub max_established_incoming: u32,
    /// Established connections we opened, over all peers.
    pub max_established_outgoing: u32,
    /// Established connections with one peer, both directions.
    pub max_established_per_peer: u32,
    /// Incoming connections still in their handshake (noise, yamux).
    pub max_pending_incoming: u32,
    /// Outgoing connections still being dialed or in their handshake
    /// (ours and the DHT's dials alike).
    pub max_pending_outgoing: u32,
    /// Above this much process memory (resident), new connections in either
    /// direction are refused; existing ones carry on.
    pub memory: Memory,
    /// Dials of our own (mDNS, `/swarm`, DHT providers, [`crate::Handle::dial`])
    /// in flight at once.
    pub max_dials_in_flight: usize,
    /// Dials waiting for one in flight to end; beyond it a dial is dropped
    /// (and counted).
    pub max_dials_waiting: usize,
    /// A dial that has neither connected nor failed after this long frees
    /// its slot anyway.
    pub dial_timeout: Duration,
    /// Offenders (blocked or banned peers) with this many different peer ids
    /// from one IP address within [`Limits::ip_ban_window`] get that address
    /// refused: a new identity costs nothing, an address does. 0: never.
    pub ip_ban_threshold: usize,
    /// The window of [`Limits::ip_ban_threshold`].
    pub ip_ban_window: Duration,
    /// How long new connections from such an address are refused (peers
    /// already connected from it stay).
    pub ip_ban_time: Duration,
}

/// The memory threshold of [`Limits::memory`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Memory {
    /// Resident bytes of the process.
    Bytes(usize),
    /// A fraction (0 to 1) of the machine's physical memory.
    FractionOfSystem(f64),
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // A seed of 48 machines takes 48 and each re-dial briefly holds
            // a second one; twice the 64 that needs.
            max_established_incoming: 128,
            // A node dials its neighbourhood (about 40 peers) plus the seed
            // and DHT walks.
            max_established_outgoing: 64,
            // Two: a simultaneous dial from both ends opens one each way.
            max_established_per_peer: 2,
            // A whole storm arriving in the same second.
            max_pending_incoming: 64,
            // Our own dials (16) plus the DHT's.
            max_pending_outgoing: 32,
            // Near the machine's limit new peers are the first thing to
            // give up; a booting machine's store is its largest cost.
            memory: Memory::FractionOfSystem(0.8),
            max_dials_in_flight: 16,
            max_dials_waiting: 64,
            dial_timeout: Duration::from_secs(15),
            // Above the handful of offenders one test or one flaky LAN
            // produces, far below what a Sybil flood needs.
            ip_ban_threshold: 8,
            ip_ban_window: Duration::from_secs(60),
            ip_ban_time: Duration::from_secs(120),
        }
    }
}

impl Limits {
    /// Sets the cap on established incoming connections.
    pub fn with_max_established_incoming(mut self, n: u32) -> Self {
        self.max_established_incoming = n;
        self
    }
    /// Sets the cap on established outgoing connections.
    pub fn with_max_established_outgoing(mut self, n: u32) -> Self {
        self.max_established_outgoing = n;
        self
    }
    /// Sets the cap on established connections per peer (at least 1).
    pub fn with_max_established_per_peer(mut self, n: u32) -> Self {
        self.max_established_per_peer = n.max(1);
        self
    }
    /// Sets the cap on incoming connections in their handshake.
    pub fn with_max_pending_incoming(mut self, n: u32) -> Self {
        self.max_pending_incoming = n;
        self
    }
    /// Sets the cap on outgoing connections being dialed.
    pub fn with_max_pending_outgoing(mut self, n: u32) -> Self {
        self.max_pending_outgoing = n;
        self
    }
    /// Sets the memory threshold above which connections are refused.
    pub fn with_memory(mut self, m: Memory) -> Self {
        self.memory = m;
        self
    }
    /// Sets how many of our own dials run at once (at least 1) and how many
    /// may wait.
    pub fn with_dials(mut self, in_flight: usize, waiting: usize) -> Self {
        self.max_dials_in_flight = in_flight.max(1);
        self.max_dials_waiting = waiting;
        self
    }

    /// Sets the address ban: `threshold` offending peer ids from one IP
    /// within `window` refuse it for `time` (threshold 0: never).
    pub fn with_ip_ban(mut self, threshold: usize, window: Duration, time: Duration) -> Self {
        self.ip_ban_threshold = threshold;
        self.ip_ban_window = window;
        self.ip_ban_time = time;
        self
    }

    pub(crate) fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits::default()
            .with_max_established_incoming(Some(self.max_established_incoming))
            .with_max_established_outgoing(Some(self.max_established_outgoing))
            .with_max_established_per_peer(Some(self.max_established_per_peer))
            .with_max_pending_incoming(Some(self.max_pending_incoming))
            .with_max_pending_outgoing(Some(self.max_pending_outgoing))
    }

    pub(crate) fn memory_limits(&self) -> libp2p::memory_connection_limits::Behaviour {
        use libp2p::memory_connection_limits::Behaviour;
        match self.memory {
            Memory::Bytes(n) => Behaviour::with_max_bytes(n),
            Memory::FractionOfSystem(f) => Behaviour::with_max_percentage(f.clamp(0.0, 1.0)),
        }
    }
}

/// Something to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// An address (with or without `/p2p/`).
    Addr(Multiaddr),
    /// A peer whose addresses the behaviours know (the DHT query that found it).
    Peer(PeerId),
}

impl Target {
    pub(crate) fn opts(&self) -> DialOpts {
        match self {
            Target::Addr(a) => DialOpts::from(a.clone()),
            Target::Peer(p) => DialOpts::from(*p),
        }
    }
}

/// What [`DialQueue::offer`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Dial it now (then report the connection id with [`DialQueue::started`]).
    Now(Target),
    /// It waits for a slot (or was already waiting).
    Queued,
    /// The queue is full: dropped.
    Dropped,
}

/// A bounded number of dials in flight and a bounded queue behind them.
/// Sans-I/O: the node dials, and tells the queue when a dial started and
/// ended; time is passed in.
#[derive(Debug)]
pub(crate) struct DialQueue {
    max_in_flight: usize,
    max_waiting: usize,
    timeout: Duration,
    in_flight: HashMap<ConnectionId, Instant>,
    waiting: VecDeque<Target>,
    dropped: u64,
}

impl DialQueue {
    pub(crate) fn new(l: &Limits) -> Self {
        DialQueue {
            max_in_flight: l.max_dials_in_flight.max(1),
            max_waiting: l.max_dials_waiting,
            timeout: l.dial_timeout,
            in_flight: HashMap::new(),
            waiting: VecDeque::new(),
            dropped: 0,
        }
    }

    /// A new dial: now, later, or never.
    pub(crate) fn offer(&mut self, t: Target) -> Offer {
        if self.in_flight.len() < self.max_in_flight && self.waiting.is_empty() {
            return Offer::Now(t);
        }
        if self.waiting.contains(&t) {
            return Offer::Queued;
        }
        if self.waiting.len() >= self.max_waiting {
            self.dropped += 1;
            return Offer::Dropped;
        }
        self.waiting.push_back(t);
        Offer::Queued
    }

    /// A dial the node started.
    pub(crate) fn started(&mut self, id: ConnectionId, now: Instant) {
        self.in_flight.insert(id, now);
    }

    /// A connection was established or a dial failed; `true` if it was ours.
    pub(crate) fn ended(&mut self, id: ConnectionId) -> bool {
        self.in_flight.remove(&id).is_some()
    }

    /// Frees the slots of dials older than the timeout; then hands out the
    /// waiting targets that now fit.
    pub(crate) fn ready(&mut self, now: Instant) -> Vec<Target> {
        let timeout = self.timeout;
        self.in_flight
            .retain(|_, since| now.saturating_duration_since(*since) < timeout);
        let free = self.max_in_flight.saturating_sub(self.in_flight.len());
        let n = free.min(self.waiting.len());
        self.waiting.drain(..n).collect()
    }

    /// Dials in flight or waiting.
    pub(crate) fn pending(&self) -> usize {
        self.in_flight.len() + self.waiting.len()
    }

    /// Dials dropped because the queue was full, since the start.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Dials in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// The IP address of a connection's remote address, if it has one.
pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a)),
        _ => None,
    })
}

/// Offences counted per remote IP address as well as per peer id. Sans-I/O:
/// the node reports offences and asks; time is passed in.
#[derive(Debug)]
pub(crate) struct IpBans {
    threshold: usize,
    window: Duration,
    ban: Duration,
    /// Per address: the distinct offending peers seen in the window and when.
    offences: HashMap<IpAddr, Vec<(PeerId, Instant)>>,
    /// Refused addresses and until when.
    banned: HashMap<IpAddr, Instant>,
}

/// Addresses tracked at once; beyond, offences from new addresses are not
/// counted (the per-peer block still applies).
const MAX_IPS: usize = 4096;

impl IpBans {
    pub(crate) fn new(l: &Limits) -> Self {
        IpBans {
            threshold: l.ip_ban_threshold,
            window: l.ip_ban_window,
            ban: l.ip_ban_time,
            offences: HashMap::new(),
            banned: HashMap::new(),
        }
    }

    /// `peer`, connected from `ip`, offended. `true` if `ip` is refused from now.
    pub(crate) fn offence(&mut self, ip: IpAddr, peer: PeerId, now: Instant) -> bool {
        if self.threshold == 0 || self.is_banned(ip, now) {
            return false;
        }
        if !self.offences.contains_key(&ip) && self.offences.len() >= MAX_IPS {
            self.expire(now);
            if self.offences.len() >= MAX_IPS {
                return false;
            }
        }
        let window = self.window;
        let seen = self.offences.entry(ip).or_default();
        seen.retain(|(_, t)| now.saturating_duration_since(*t) < window);
        if !seen.iter().any(|(p, _)| *p == peer) {
            seen.push((peer, now));
        }
        if seen.len() < self.threshold {
            return false;
        }
        self.offences.remove(&ip);
        if self.banned.len() >= MAX_IPS {
            self.expire(now);
        }
        if self.banned.len() < MAX_IPS {
            self.banned.insert(ip, now + self.ban);
        }
        true
    }

    /// Whether new connections from `ip` are refused at `now`.
    pub(crate) fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        self.banned.get(&ip).is_some_and(|until| *until > now)
    }

    /// Forgets what has aged out.
    pub(crate) fn expire(&mut self, now: Instant) {
        self.banned.retain(|_, until| *until > now);
        let window = self.window;
        self.offences.retain(|_, seen| {
            seen.retain(|(_, t)| now.saturating_duration_since(*t) < window);
            !seen.is_empty()
        });
    }
}

/// The DHT's record store: provider records only (the event loop never
/// stores a value record), a bounded number of keys and of providers per key.
pub(crate) fn kad_store() -> libp2p::kad::store::MemoryStoreConfig {
    libp2p::kad::store::MemoryStoreConfig {
        // Value records are refused before they reach the store.
        max_records: 16,
        max_value_bytes: 1024,
        // Keys with providers, ours and others': two per manifest (its root
        // and its channel's `latest` key), for a few dozen manifests.
        max_provided_keys: 256,
        // More than Kademlia's 20, so a few Sybils do not fill a root's
        // list, and small enough that one answer stays far below the 16 KiB
        // Kademlia message cap.
        max_providers_per_key: 32,
    }
}

/// Whether a provider record's key is one this swarm uses: a manifest root
/// (32 bytes) or a `phase/latest/CHANNEL/ARCH` key.
pub(crate) fn provider_key_ok(key: &[u8]) -> bool {
    const LATEST: &[u8] = b"phase/latest/";
    key.len() == 32
        || (key.starts_with(LATEST)
            && key.len() <= LATEST.len() + 2 * crate::protocol::MAX_NAME + 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(port: u16) -> Target {
        Target::Addr(format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap())
    }

    #[test]
    fn dials_beyond_the_caps_wait_then_drop() {
        let l = Limits::default().with_dials(2, 3);
        let mut q = DialQueue::new(&l);
        let t0 = Instant::now();
        let started: Vec<ConnectionId> = (1..=2).map(ConnectionId::new_unchecked).collect();
        for port in [1, 2] {
            assert_eq!(q.offer(addr(port)), Offer::Now(addr(port)));
        }
        for id in &started {
            q.started(*id, t0);
        }
        assert_eq!(q.in_flight(), 2);
        // Full: three wait (one offered twice waits once), the rest drop.
        for port in [3, 4, 4, 5] {
            assert_eq!(q.offer(addr(port)), Offer::Queued);
        }
        assert_eq!(q.offer(addr(6)), Offer::Dropped);
        assert_eq!(q.offer(addr(7)), Offer::Dropped);
        assert_eq!(q.dropped(), 2);
        assert!(q.ready(t0).is_empty(), "no slot is free");
        // One ends: exactly one waiting dial goes, in order.
        assert!(q.ended(started[0]));
        assert!(!q.ended(started[0]), "ended once");
        assert_eq!(q.ready(t0), vec![addr(3)]);
        // A new offer queues behind the waiting ones, not ahead of them.
        q.started(ConnectionId::new_unchecked(10), t0);
        assert_eq!(q.offer(addr(8)), Offer::Queued);
        // A dial that hangs past the timeout frees its slot.
        let later = t0 + l.dial_timeout;
        assert_eq!(q.ready(later), vec![addr(4), addr(5)]);
        assert_eq!(q.ready(later), vec![addr(8)]);
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn only_this_swarms_provider_keys_are_kept() {
        assert!(provider_key_ok(&[7; 32]));
        assert!(provider_key_ok(b"phase/latest/stable/x86_64"));
        assert!(!provider_key_ok(&[7; 33]));
        assert!(!provider_key_ok(b"/ipfs/some-other-swarm"));
        let long = format!(
            "phase/latest/{}",
            "a".repeat(2 * crate::protocol::MAX_NAME + 2)
        );
        assert!(!provider_key_ok(long.as_bytes()));
    }

    #[test]
    fn many_identities_offending_from_one_address_get_it_refused() {
        let l = Limits::default().with_ip_ban(3, Duration::from_secs(10), Duration::from_secs(30));
        let mut b = IpBans::new(&l);
        let t0 = Instant::now();
        let (one, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let ids: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        // The same identity offending again does not count twice.
        assert!(!b.offence(one, ids[0], t0));
        assert!(!b.offence(one, ids[0], t0));
        assert!(!b.offence(one, ids[1], t0));
        // Offences older than the window are forgotten.
        let late = t0 + Duration::from_secs(10);
        assert!(!b.offence(one, ids[2], late));
        assert!(!b.is_banned(one, late));
        assert!(!b.offence(one, ids[3], late));
        // Three identities within the window (ids[1] again, its first
        // offence aged out): refused, and only that address.
        assert!(b.offence(one, ids[1], late));
        assert!(b.is_banned(one, late));
        assert!(!b.is_banned(other, late));
        assert!(!b.offence(other, ids[0], late));
        // For the ban time only.
        assert!(b.is_banned(one, late + Duration::from_secs(29)));
        assert!(!b.is_banned(one, late + Duration::from_secs(30)));
        b.expire(late + Duration::from_secs(30));
        assert!(b.banned.is_empty() && b.offences.is_empty());
        // Threshold 0: never.
        let mut never =
            IpBans::new(&l.with_ip_ban(0, Duration::from_secs(1), Duration::from_secs(1)));
        assert!(ids.iter().all(|p| !never.offence(one, *p, t0)));
    }

    #[test]
    fn ip_of_reads_v4_and_v6() {
        let a: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let b: Multiaddr = "/ip6/::1/tcp/4001".parse().unwrap();
        let c: Multiaddr = "/dns4/example.org/tcp/1".parse().unwrap();
        assert_eq!(ip_of(&a), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(ip_of(&b), Some("::1".parse().unwrap()));
        assert_eq!(ip_of(&c), None);
    }

    #[test]
    fn default_limits_fit_a_storm_of_48() {
        let l = Limits::default();
        assert!(l.max_established_incoming >= 64);
        assert!(l.max_pending_incoming >= 49);
        assert!(l.max_pending_outgoing as usize >= l.max_dials_in_flight);
        assert!(l.max_established_per_peer >= 2);
    }
}
