//! Peers and records: our dials (capped and queued), seeding a manifest and
//! announcing it on the DHT, and the DHT keys used.

use std::time::Instant;

use libp2p::kad::{self, RecordKey};
use phase_content::{Hash, SignedManifest};

use super::Node;
use super::client::Held;
use crate::Error;
use crate::limits::{Offer, Target};
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
