//! Peers and records: the neighbourhood ([`crate::neighbours`]: who we dial,
//! admit, rotate out), our dials (capped and queued), seeding a manifest and
//! announcing it on the DHT, and the DHT keys used.

use std::time::Instant;

use libp2p::kad::{self, RecordKey};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use phase_content::{Hash, SignedManifest};

use super::Node;
use super::client::Held;
use super::handle::Source;
use crate::Error;
use crate::addr;
use crate::limits::{Offer, Target};
use crate::neighbours::{Admit, Candidate, Origin};
use crate::protocol::Root;

pub(super) fn root_key(root: &Root) -> RecordKey {
    RecordKey::new(root)
}

pub(super) fn latest_key(channel: &str, arch: &str) -> RecordKey {
    RecordKey::new(&format!("phase/latest/{channel}/{arch}"))
}

impl Node {
    pub(super) fn seed(&mut self, m: SignedManifest) -> Result<(), Error> {
        let root = *m.root().as_bytes();
        let mut held = Held::new(m, self.cfg.scheduler.clone(), self.cfg.rng_seed);
        for i in 0..held.hashes.len() {
            if self.store.has(&held.hashes[i]) {
                held.mark(i);
            }
        }
        held.seeded = true;
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
        self.v2_open_all(root);
        Ok(())
    }

    pub(super) fn announce(&mut self, root: Root) {
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

    /// Dials `t` now if fewer than the cap are in flight, else queues it;
    /// a dial the full queue cannot take is dropped (counted) with an error.
    pub(super) fn dial(&mut self, t: Target) -> Result<(), Error> {
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

    pub(super) fn dial_now(&mut self, t: &Target) -> Result<(), Error> {
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

    /// A peer the caller named (the seed's `/swarm`, `--peer`,
    /// [`crate::Handle::dial`]): dialed at once, whatever the neighbourhood
    /// holds, and admitted as given.
    pub(super) fn dial_given(&mut self, a: Multiaddr) -> Result<(), Error> {
        let peer = addr::peer_id(&a);
        let t = Target::Addr(a);
        self.nbrs.dialing_given(t.clone(), peer, self.now());
        self.dial(t)
    }

    /// A peer worth connecting to (mDNS, a DHT provider): dialed when the
    /// neighbourhood has room.
    pub(super) fn candidate(&mut self, t: Target, peer: Option<PeerId>, origin: Origin) {
        if peer.is_some_and(|p| self.connected.contains(&p)) {
            return;
        }
        let now = self.now();
        self.nbrs.offer(
            Candidate {
                target: t,
                peer,
                origin,
            },
            now,
        );
        self.fill_neighbours();
    }

    /// Dials candidates while neighbours plus our dials pending are below K.
    pub(super) fn fill_neighbours(&mut self) {
        let now = self.now();
        while let Some(c) = self.nbrs.dial_next(now, self.dials.pending()) {
            if let Err(e) = self.dial(c.target.clone()) {
                tracing::debug!(error = %e, "neighbour dial failed");
                self.nbrs.dial_failed(c.peer, Some(&c.target), now);
                // The queue is full: try again on a later tick.
                break;
            }
        }
    }

    /// A new peer's first connection: kept as a neighbour, kept in place of
    /// a less useful one, or closed (`false`: the caller stops there).
    pub(super) fn admit(&mut self, peer: PeerId, inbound: bool, remote: &Multiaddr) -> bool {
        let remote = Target::Addr(addr::with_peer(remote.clone(), peer));
        let established = self
            .swarm
            .network_info()
            .connection_counters()
            .num_established();
        self.connections_peak = self.connections_peak.max(established as usize);
        match self.nbrs.admit(peer, inbound, Some(&remote), self.now()) {
            Admit::Accept => true,
            Admit::Replace(v) => {
                tracing::debug!(peer = %v, new = %peer, "neighbour replaced");
                let _ = self.swarm.disconnect_peer_id(v);
                true
            }
            Admit::Refuse => {
                tracing::debug!(%peer, inbound, k = self.nbrs.max(), "at K neighbours: connection refused");
                let _ = self.swarm.disconnect_peer_id(peer);
                false
            }
        }
    }

    /// A dial of ours failed.
    pub(super) fn neighbour_dial_failed(&mut self, peer: Option<PeerId>, id: ConnectionId) {
        self.dial_ended(id);
        self.nbrs.dial_failed(peer, None, self.now());
        self.fill_neighbours();
    }

    /// Each tick: what each neighbour is worth, one rotation per period,
    /// and dials into free slots.
    pub(super) fn neighbour_tick(&mut self) {
        let complete = self.fetch.is_none() && !self.held.is_empty();
        self.nbrs.set_complete(complete);
        if let Some(f) = &self.fetch {
            let sched = self.held.get(&f.root).map(|h| &h.sched);
            for p in &self.connected {
                let s = Source::Peer(*p);
                let bytes = f.stats.get(&s).map_or(0, |st| st.bytes);
                let wanted = sched.is_some_and(|sc| sc.in_flight(&s) > 0);
                self.nbrs.observe(*p, bytes, wanted);
            }
        }
        if let Some(v) = self.nbrs.rotate(self.now()) {
            tracing::debug!(peer = %v, "rotating out the least useful neighbour");
            let _ = self.swarm.disconnect_peer_id(v);
        }
        self.fill_neighbours();
    }

    /// A connection was established or a dial failed: if it was one of our
    /// dials, its slot goes to the next waiting one.
    pub(super) fn dial_ended(&mut self, id: libp2p::swarm::ConnectionId) {
        if self.dials.ended(id) {
            self.pump_dials();
        }
    }

    /// Starts the waiting dials that fit now.
    pub(super) fn pump_dials(&mut self) {
        for t in self.dials.ready(Instant::now()) {
            if let Err(e) = self.dial_now(&t) {
                tracing::debug!(error = %e, "queued dial failed");
            }
        }
    }
}
