//! The neighbourhood: which peers a node keeps connected. A sans-I/O policy
//! like [`crate::scheduler`]: the caller reports candidates, connections and
//! bytes with the current time, and carries out what it answers (dial this,
//! refuse that, drop the other).
//!
//! Policy (the why is in `swarm/DESIGN.md`, "Neighbourhood"):
//! - at most [`NeighbourConfig::max`] (K) neighbours, so a storm of N nodes
//!   holds about N x K / 2 connections, never N x N / 2;
//! - candidates come from the caller's given peers (the seed's `/swarm`
//!   addresses, `--peer`), mDNS, DHT providers and identify; given peers are
//!   dialed first and always admitted (a less useful neighbour makes room);
//!   the queue of candidates is bounded;
//! - [`Neighbours::dial_next`] hands out candidates while neighbours plus
//!   dials pending are below K;
//! - every [`NeighbourConfig::rotate_every`] [`Neighbours::rotate`] drops the
//!   least useful neighbour (not a given one, held at least one period) when
//!   the node is at K and a candidate is waiting, so the freed slot tries
//!   someone new (BitTorrent's optimistic unchoke, at the connection level).
//!   Least useful: no request in flight to it (it holds nothing we lack),
//!   then the fewest bytes received from it in the last period or two, then
//!   the longest held;
//! - a connection that arrives at K (inbound, or a DHT walk's dial) is
//!   refused, unless some neighbour held at least one period can make room:
//!   while fetching, one that sent nothing in that time and has nothing we
//!   lack; once complete, the least useful of them (accept-then-rotate, so a
//!   newcomer is never locked out of a full swarm, and two complete nodes do
//!   not hold each other's slots for ever);
//! - a complete node (every chunk held, nothing fetching) downloads nothing:
//!   it dials nobody and rotates nobody on its own; it accepts inbound
//!   connections up to K, and beyond K as above, serving only. A seed is a
//!   complete node with a larger K.
//!
//! ```
//! use std::time::Duration;
//! use phase_swarm::neighbours::{Admit, Candidate, NeighbourConfig, Neighbours, Origin};
//!
//! let mut n: Neighbours<u32, &str> = Neighbours::new(NeighbourConfig::default().with_max(1));
//! let t = Duration::ZERO;
//! n.offer(Candidate { target: "a", peer: Some(1), origin: Origin::Mdns }, t);
//! n.offer(Candidate { target: "b", peer: Some(2), origin: Origin::Mdns }, t);
//! let c = n.dial_next(t, 0).expect("below K: dial one");
//! assert_eq!(n.admit(c.peer.unwrap(), false, Some(&c.target), t), Admit::Accept);
//! assert!(n.dial_next(t, 0).is_none(), "at K: no more dials");
//! assert_eq!(n.admit(3, true, None, t), Admit::Refuse, "inbound at K, nothing to rotate");
//! ```

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

/// Where a candidate (or a neighbour) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// Named by the caller: the seed's `/swarm` addresses, `--peer`,
    /// `Handle::dial`. Dialed first, always admitted, never rotated out.
    Given,
    /// Found by mDNS on the LAN.
    Mdns,
    /// A DHT provider record, or a DHT walk's own dial.
    Dht,
    /// An address a connected peer listed in identify.
    Identify,
    /// The peer connected to us.
    Inbound,
}

/// Something the node could connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<P, T> {
    /// What to dial.
    pub target: T,
    /// The peer, when the target names it.
    pub peer: Option<P>,
    /// Where it came from.
    pub origin: Origin,
}

/// The policy's tunables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourConfig {
    /// K: neighbours held at most (at least 1).
    pub max: usize,
    /// How often [`Neighbours::rotate`] may drop one; also the grace a new
    /// neighbour gets before it can be dropped.
    pub rotate_every: Duration,
    /// Candidates waiting at most; beyond, new ones (not given) are ignored.
    pub max_candidates: usize,
    /// How long a peer that was dropped, refused us or went away waits
    /// before it is dialed again; also the longest a given peer whose dials
    /// keep failing waits.
    pub retry_after: Duration,
    /// How long a given peer waits after its first failed dial; each
    /// failure in a row doubles it, up to [`NeighbourConfig::retry_after`].
    /// A given peer is one the user named, often a node that is still
    /// starting: a second try a second later finds it.
    pub given_retry_first: Duration,
    /// A dial handed out and not yet connected is forgotten after this long.
    pub dial_timeout: Duration,
}

impl Default for NeighbourConfig {
    fn default() -> Self {
        NeighbourConfig {
            max: 40,
            rotate_every: Duration::from_secs(10),
            max_candidates: 256,
            retry_after: Duration::from_secs(10),
            given_retry_first: Duration::from_secs(1),
            dial_timeout: Duration::from_secs(15),
        }
    }
}

impl NeighbourConfig {
    /// Sets K (at least 1).
    pub fn with_max(mut self, k: usize) -> Self {
        self.max = k.max(1);
        self
    }
    /// Sets the rotation period (and a new neighbour's grace).
    pub fn with_rotate_every(mut self, d: Duration) -> Self {
        self.rotate_every = d;
        self
    }
    /// Sets the bound on waiting candidates.
    pub fn with_max_candidates(mut self, n: usize) -> Self {
        self.max_candidates = n;
        self
    }
    /// Sets how long a dropped or refused peer waits before a new dial.
    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = d;
        self
    }
    /// Sets how long a dial handed out is remembered.
    pub fn with_dial_timeout(mut self, d: Duration) -> Self {
        self.dial_timeout = d;
        self
    }
}

/// What to do with a new connection ([`Neighbours::admit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit<P> {
    /// Keep it: a neighbour now.
    Accept,
    /// Keep it and close the connection to this neighbour, which made room.
    Replace(P),
    /// Close it: the node is at K.
    Refuse,
}

#[derive(Debug)]
struct Neighbour<T> {
    origin: Origin,
    since: Duration,
    /// What to dial to reach it again, when we know.
    target: Option<T>,
    /// Bytes received from it, as last reported.
    total: u64,
    /// `total` when the current period began.
    mark: u64,
    /// Bytes received in the period before.
    last_period: u64,
    /// A request of ours is in flight to it: it holds a chunk we lack.
    wanted: bool,
}

impl<T> Neighbour<T> {
    fn recent(&self) -> u64 {
        self.last_period + self.total.saturating_sub(self.mark)
    }
}

#[derive(Debug)]
struct Waiting<P, T> {
    cand: Candidate<P, T>,
    not_before: Duration,
}

/// The neighbourhood policy of one node. `P` names a peer, `T` is what the
/// node dials (an address, or a peer whose addresses it knows).
#[derive(Debug)]
pub struct Neighbours<P, T> {
    cfg: NeighbourConfig,
    waiting: VecDeque<Waiting<P, T>>,
    /// Dials handed out, not yet connected: their origin, and since when.
    dialing: VecDeque<(Candidate<P, T>, Duration)>,
    held: HashMap<P, Neighbour<T>>,
    /// Given targets whose dials failed, with how many failed in a row
    /// (bounded like the waiting candidates).
    given_failures: VecDeque<(T, u32)>,
    complete: bool,
    last_rotate: Duration,
    peak: usize,
    refused: u64,
    rotated: u64,
}

impl<P, T> Neighbours<P, T>
where
    P: Copy + Eq + Hash + Ord,
    T: Clone + PartialEq,
{
    /// An empty neighbourhood.
    pub fn new(cfg: NeighbourConfig) -> Self {
        let cfg = NeighbourConfig {
            max: cfg.max.max(1),
            ..cfg
        };
        Neighbours {
            cfg,
            waiting: VecDeque::new(),
            dialing: VecDeque::new(),
            held: HashMap::new(),
            given_failures: VecDeque::new(),
            complete: false,
            last_rotate: Duration::ZERO,
            peak: 0,
            refused: 0,
            rotated: 0,
        }
    }

    /// K.
    pub fn max(&self) -> usize {
        self.cfg.max
    }

    /// Neighbours now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// No neighbour.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether `p` is a neighbour.
    pub fn contains(&self, p: &P) -> bool {
        self.held.contains_key(p)
    }

    /// The most neighbours held at once so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Connections refused at K so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Neighbours dropped by rotation (or to make room) so far.
    pub fn rotated(&self) -> u64 {
        self.rotated
    }

    /// Candidates waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Says whether the node holds everything it wants (nothing to fetch):
    /// then it dials and rotates nobody.
    pub fn set_complete(&mut self, complete: bool) {
        self.complete = complete;
    }

    fn known(&self, c: &Candidate<P, T>) -> bool {
        let same =
            |o: &Candidate<P, T>| o.target == c.target || (c.peer.is_some() && o.peer == c.peer);
        c.peer.is_some_and(|p| self.held.contains_key(&p))
            || self.waiting.iter().any(|w| same(&w.cand))
            || self.dialing.iter().any(|(d, _)| same(d))
    }

    /// A peer worth connecting to; `false` if it is already a neighbour,
    /// waiting or being dialed, or the queue is full. A given candidate goes
    /// to the front (pushing the last one out if full).
    pub fn offer(&mut self, c: Candidate<P, T>, now: Duration) -> bool {
        self.offer_at(c, now)
    }

    fn offer_at(&mut self, c: Candidate<P, T>, not_before: Duration) -> bool {
        if self.known(&c) {
            return false;
        }
        if c.origin == Origin::Given {
            if self.waiting.len() >= self.cfg.max_candidates.max(1) {
                self.waiting.pop_back();
            }
            self.waiting.push_front(Waiting {
                cand: c,
                not_before,
            });
            return true;
        }
        if self.waiting.len() >= self.cfg.max_candidates {
            return false;
        }
        self.waiting.push_back(Waiting {
            cand: c,
            not_before,
        });
        true
    }

    /// A given peer the caller dials itself at once: remembered as being
    /// dialed, so its connection is admitted as given.
    pub fn dialing_given(&mut self, target: T, peer: Option<P>, now: Duration) {
        self.waiting
            .retain(|w| w.cand.target != target && (peer.is_none() || w.cand.peer != peer));
        self.push_dialing(
            Candidate {
                target,
                peer,
                origin: Origin::Given,
            },
            now,
        );
    }

    fn push_dialing(&mut self, c: Candidate<P, T>, now: Duration) {
        // Bounded: dials are handed out at most K at a time, but a failed one
        // the caller never reports lingers until its timeout.
        if self.dialing.len() >= 2 * self.cfg.max + 16 {
            self.dialing.pop_front();
        }
        self.dialing.push_back((c, now));
    }

    fn expire(&mut self, now: Duration) {
        let t = self.cfg.dial_timeout;
        self.dialing
            .retain(|(_, since)| now.saturating_sub(*since) < t);
    }

    /// The next candidate to dial, if neighbours plus `pending` dials (the
    /// caller's dials in flight or queued) are below K and the node is still
    /// fetching. Given candidates first, then in the order they came.
    pub fn dial_next(&mut self, now: Duration, pending: usize) -> Option<Candidate<P, T>> {
        self.expire(now);
        if self.held.len() + pending >= self.cfg.max {
            return None;
        }
        let i = self.waiting.iter().position(|w| {
            w.not_before <= now && (!self.complete || w.cand.origin == Origin::Given)
        })?;
        let w = self.waiting.remove(i)?;
        self.push_dialing(w.cand.clone(), now);
        Some(w.cand)
    }

    /// A dial failed: a given one is tried again after
    /// [`NeighbourConfig::given_retry_first`], doubled for each failure in
    /// a row up to [`NeighbourConfig::retry_after`]; others come back when
    /// rediscovered.
    pub fn dial_failed(&mut self, peer: Option<P>, target: Option<&T>, now: Duration) {
        let hit = self.dialing.iter().position(|(d, _)| {
            (peer.is_some() && d.peer == peer) || target.is_some_and(|t| *t == d.target)
        });
        if let Some(i) = hit
            && let Some((c, _)) = self.dialing.remove(i)
            && c.origin == Origin::Given
        {
            let wait = self.given_failed(&c.target);
            self.offer_at(c, now + wait);
        }
    }

    /// Counts one more failed dial of given `t`; returns the wait before
    /// the next.
    fn given_failed(&mut self, t: &T) -> Duration {
        let fails = match self.given_failures.iter_mut().find(|(g, _)| g == t) {
            Some((_, n)) => {
                *n = n.saturating_add(1);
                *n
            }
            None => {
                if self.given_failures.len() >= self.cfg.max_candidates.max(1) {
                    self.given_failures.pop_front();
                }
                self.given_failures.push_back((t.clone(), 1));
                1
            }
        };
        let doubled = self
            .cfg
            .given_retry_first
            .saturating_mul(1u32 << (fails - 1).min(16));
        doubled.min(self.cfg.retry_after)
    }

    fn victim(&self, now: Duration, grace: bool, idle_only: bool) -> Option<P> {
        self.held
            .iter()
            .filter(|(_, n)| n.origin != Origin::Given)
            .filter(|(_, n)| !grace || now.saturating_sub(n.since) >= self.cfg.rotate_every)
            .filter(|(_, n)| !idle_only || (!n.wanted && n.recent() == 0))
            .min_by_key(|(p, n)| (n.wanted, n.recent(), n.since, **p))
            .map(|(p, _)| *p)
    }

    /// A connection with `peer` was established (`inbound`: it dialed us;
    /// `remote` is the dialed target if it was ours). Accept, replace a
    /// neighbour, or refuse (the caller closes it).
    pub fn admit(&mut self, peer: P, inbound: bool, remote: Option<&T>, now: Duration) -> Admit<P> {
        if self.held.contains_key(&peer) {
            return Admit::Accept;
        }
        let hit = self.dialing.iter().position(|(d, _)| {
            d.peer == Some(peer) || (!inbound && remote.is_some_and(|r| *r == d.target))
        });
        let dialed = hit.and_then(|i| self.dialing.remove(i)).map(|(c, _)| c);
        if let Some(c) = &dialed {
            self.given_failures.retain(|(g, _)| *g != c.target);
        }
        let mut queued = None;
        self.waiting.retain(|w| {
            let same = w.cand.peer == Some(peer);
            if same && queued.is_none() {
                queued = Some(w.cand.clone());
            }
            !same
        });
        let origin = match (&dialed, inbound) {
            (Some(c), _) => c.origin,
            (None, true) => Origin::Inbound,
            (None, false) => Origin::Dht,
        };
        let target = dialed
            .map(|c| c.target)
            .or_else(|| queued.map(|c| c.target))
            .or_else(|| (!inbound).then(|| remote.cloned()).flatten());
        let decision = if self.held.len() < self.cfg.max {
            Admit::Accept
        } else if origin == Origin::Given {
            match self.victim(now, false, false) {
                Some(v) => Admit::Replace(v),
                // Only given peers held: a given one is never refused.
                None => Admit::Accept,
            }
        } else if let Some(v) = self.victim(now, true, !self.complete) {
            Admit::Replace(v)
        } else {
            Admit::Refuse
        };
        match &decision {
            Admit::Refuse => {
                self.refused += 1;
                // Ours, refused because inbound ones filled K meanwhile: later.
                if let Some(t) = target
                    && !inbound
                {
                    self.offer_at(
                        Candidate {
                            target: t,
                            peer: Some(peer),
                            origin,
                        },
                        now + self.cfg.retry_after,
                    );
                }
                return decision;
            }
            Admit::Replace(v) => {
                let v = *v;
                self.drop_neighbour(v, now);
            }
            Admit::Accept => {}
        }
        self.held.insert(
            peer,
            Neighbour {
                origin,
                since: now,
                target,
                total: 0,
                mark: 0,
                last_period: 0,
                wanted: false,
            },
        );
        self.peak = self.peak.max(self.held.len());
        decision
    }

    fn drop_neighbour(&mut self, p: P, now: Duration) {
        if let Some(n) = self.held.remove(&p) {
            self.rotated += 1;
            if let Some(t) = n.target {
                self.offer_at(
                    Candidate {
                        target: t,
                        peer: Some(p),
                        origin: n.origin,
                    },
                    now + self.cfg.retry_after,
                );
            }
        }
    }

    /// The last connection with `peer` closed. A neighbour we can dial
    /// again waits [`NeighbourConfig::retry_after`] first.
    pub fn closed(&mut self, peer: P, now: Duration) {
        if let Some(n) = self.held.remove(&peer)
            && let Some(t) = n.target
        {
            self.offer_at(
                Candidate {
                    target: t,
                    peer: Some(peer),
                    origin: n.origin,
                },
                now + self.cfg.retry_after,
            );
        }
    }

    /// How useful neighbour `peer` is now: the verified bytes received from
    /// it so far (a running total), and whether a request of ours is in
    /// flight to it.
    pub fn observe(&mut self, peer: P, total_bytes: u64, wanted: bool) {
        if let Some(n) = self.held.get_mut(&peer) {
            n.total = n.total.max(total_bytes);
            n.wanted = wanted;
        }
    }

    /// Once every [`NeighbourConfig::rotate_every`]: the neighbour to drop
    /// (the caller closes it), if the node is fetching, at K, and a
    /// candidate is ready to take the slot. Starts a new period either way.
    pub fn rotate(&mut self, now: Duration) -> Option<P> {
        if now.saturating_sub(self.last_rotate) < self.cfg.rotate_every {
            return None;
        }
        self.last_rotate = now;
        // Chosen on the periods just ended, then a new one begins.
        let ready = self.waiting.iter().any(|w| w.not_before <= now);
        let v = (!self.complete && ready && self.held.len() >= self.cfg.max)
            .then(|| self.victim(now, true, false))
            .flatten();
        for n in self.held.values_mut() {
            n.last_period = n.total.saturating_sub(n.mark);
            n.mark = n.total;
        }
        if let Some(v) = v {
            self.drop_neighbour(v, now);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    type N = Neighbours<u32, u32>;

    fn cand(p: u32, origin: Origin) -> Candidate<u32, u32> {
        Candidate {
            target: p,
            peer: Some(p),
            origin,
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn full(k: usize) -> N {
        let mut n = N::new(NeighbourConfig::default().with_max(k));
        for p in 0..k as u32 {
            n.offer(cand(p, Origin::Mdns), s(0));
        }
        while let Some(c) = n.dial_next(s(0), 0) {
            assert_eq!(
                n.admit(c.peer.unwrap(), false, Some(&c.target), s(0)),
                Admit::Accept
            );
        }
        assert_eq!(n.len(), k);
        n
    }

    #[test]
    fn dials_while_below_k_counting_pending_dials() {
        let mut n = N::new(NeighbourConfig::default().with_max(3));
        for p in 0..10 {
            assert!(n.offer(cand(p, Origin::Mdns), s(0)));
        }
        assert!(!n.offer(cand(4, Origin::Dht), s(0)), "already waiting");
        assert!(n.dial_next(s(0), 3).is_none(), "three dials pending");
        assert_eq!(n.dial_next(s(0), 2).unwrap().peer, Some(0));
        n.admit(0, false, Some(&0), s(0));
        assert_eq!(n.dial_next(s(0), 1).unwrap().peer, Some(1));
        assert!(n.dial_next(s(0), 2).is_none());
    }

    #[test]
    fn given_candidates_go_first_and_are_always_admitted() {
        let mut n = full(2);
        n.offer(cand(9, Origin::Mdns), s(0));
        n.offer(cand(7, Origin::Given), s(0));
        n.closed(0, s(1));
        assert_eq!(n.dial_next(s(1), 0).unwrap().origin, Origin::Given);
        // At K again before the given one connects: it still gets in.
        assert_eq!(n.admit(5, true, None, s(1)), Admit::Accept);
        assert_eq!(n.admit(7, false, Some(&7), s(2)), Admit::Replace(1));
        assert!(n.contains(&7) && n.len() == 2);
        // And it is never rotated out.
        n.offer(cand(8, Origin::Mdns), s(30));
        assert_eq!(n.rotate(s(30)), Some(5));
    }

    #[test]
    fn rotation_drops_the_least_useful_when_a_candidate_waits() {
        let mut n = full(3);
        n.observe(0, 5_000, false);
        n.observe(1, 100, false);
        n.observe(2, 9_000, true);
        assert_eq!(n.rotate(s(10)), None, "no candidate waiting");
        n.offer(cand(9, Origin::Dht), s(10));
        // The period that just ended: 1 sent the least.
        n.observe(0, 6_000, false);
        n.observe(1, 100, false);
        assert_eq!(n.rotate(s(15)), None, "not a period yet");
        assert_eq!(n.rotate(s(20)), Some(1));
        assert!(!n.contains(&1));
        assert_eq!(n.dial_next(s(20), 0).unwrap().peer, Some(9));
        // The dropped one comes back only after retry_after.
        assert!(n.dial_next(s(20), 0).is_none());
    }

    #[test]
    fn a_peer_with_a_request_in_flight_outranks_bytes() {
        let mut n = full(2);
        n.observe(0, 1_000_000, false);
        n.observe(1, 0, true);
        n.offer(cand(9, Origin::Mdns), s(0));
        assert_eq!(n.rotate(s(10)), Some(0));
    }

    #[test]
    fn new_neighbours_get_a_period_of_grace() {
        let mut n = full(2);
        n.offer(cand(9, Origin::Mdns), s(0));
        assert_eq!(n.rotate(s(5)), None);
        n.closed(0, s(6));
        n.admit(3, true, None, s(6));
        // 1 is held 10 s, 3 only 4 s: 1 goes though 3 sent nothing either.
        n.observe(1, 10, false);
        assert_eq!(n.rotate(s(10)), Some(1));
    }

    #[test]
    fn inbound_at_k_is_refused_unless_an_idle_neighbour_makes_room() {
        let mut n = full(2);
        assert_eq!(n.admit(5, true, None, s(1)), Admit::Refuse, "in grace");
        n.observe(0, 10, false);
        n.observe(1, 0, true);
        assert_eq!(n.admit(5, true, None, s(11)), Admit::Refuse, "none idle");
        n.observe(1, 0, false);
        assert_eq!(n.admit(5, true, None, s(11)), Admit::Replace(1));
        assert_eq!(n.refused(), 2);
    }

    #[test]
    fn a_complete_node_serves_only() {
        let mut n = full(2);
        n.set_complete(true);
        n.offer(cand(9, Origin::Mdns), s(0));
        n.closed(0, s(0));
        assert!(n.dial_next(s(0), 0).is_none(), "dials nobody");
        assert_eq!(
            n.admit(6, true, None, s(20)),
            Admit::Accept,
            "inbound up to K"
        );
        // Beyond K, one held a period makes room (1 was held 20 s, 6 is new).
        assert_eq!(n.admit(7, true, None, s(20)), Admit::Replace(1));
        assert_eq!(
            n.admit(8, true, None, s(25)),
            Admit::Refuse,
            "both in grace"
        );
        n.offer(cand(10, Origin::Dht), s(20));
        assert_eq!(n.rotate(s(30)), None, "rotates nobody");
    }

    #[test]
    fn the_candidate_queue_is_bounded() {
        let mut n = N::new(
            NeighbourConfig::default()
                .with_max(1)
                .with_max_candidates(4),
        );
        for p in 0..10 {
            n.offer(cand(p, Origin::Mdns), s(0));
        }
        assert_eq!(n.waiting(), 4);
        assert!(n.offer(cand(99, Origin::Given), s(0)));
        assert_eq!(n.waiting(), 4);
        assert_eq!(n.dial_next(s(0), 0).unwrap().peer, Some(99));
    }

    #[test]
    fn a_failed_given_dial_is_retried_later() {
        let mut n = N::new(NeighbourConfig::default().with_max(4));
        n.dialing_given(1, Some(1), s(0));
        n.dial_failed(Some(1), None, s(0));
        assert!(n.dial_next(Duration::from_millis(900), 0).is_none());
        assert_eq!(n.dial_next(s(1), 0).unwrap().origin, Origin::Given);
    }

    #[test]
    fn a_given_peer_that_keeps_failing_waits_twice_as_long_each_time_up_to_retry_after() {
        let mut n = N::new(NeighbourConfig::default().with_max(4));
        n.dialing_given(1, Some(1), s(0));
        let mut now = s(0);
        let mut waits = Vec::new();
        for _ in 0..6 {
            n.dial_failed(Some(1), None, now);
            let mut t = now;
            let c = loop {
                t += Duration::from_millis(100);
                if let Some(c) = n.dial_next(t, 0) {
                    break c;
                }
                assert!(t < now + s(60), "never retried");
            };
            assert_eq!(c.peer, Some(1));
            waits.push((t - now).as_millis());
            now = t;
        }
        assert_eq!(waits, vec![1000, 2000, 4000, 8000, 10_000, 10_000]);
        // Connected at last: the next failure starts again at a second.
        assert_eq!(n.admit(1, false, Some(&1), now), Admit::Accept);
        n.closed(1, now);
        let closed_at = now;
        let back = loop {
            now += Duration::from_millis(100);
            if let Some(c) = n.dial_next(now, 0) {
                break c;
            }
            assert!(
                now < closed_at + s(60),
                "never dialed again after the close"
            );
        };
        n.dial_failed(back.peer, None, now);
        assert!(n.dial_next(now + Duration::from_millis(900), 0).is_none());
        assert!(n.dial_next(now + s(1), 0).is_some());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Offer(u32, bool),
        Dial(usize),
        Connect(u32, bool),
        Fail(u32),
        Close(u32),
        Bytes(u32, u64, bool),
        Rotate,
        Complete(bool),
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..40, any::<bool>()).prop_map(|(p, g)| Op::Offer(p, g)),
            (0usize..4).prop_map(Op::Dial),
            (0u32..40, any::<bool>()).prop_map(|(p, i)| Op::Connect(p, i)),
            (0u32..40).prop_map(Op::Fail),
            (0u32..40).prop_map(Op::Close),
            (0u32..40, 0u64..1 << 20, any::<bool>()).prop_map(|(p, b, w)| Op::Bytes(p, b, w)),
            Just(Op::Rotate),
            any::<bool>().prop_map(Op::Complete),
            (0u64..15_000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        /// Whatever happens, no more than K neighbours unless given ones
        /// alone exceed K, the peak is the true peak, queues stay bounded,
        /// a refused or dropped peer is no neighbour, and a given one is
        /// never refused nor rotated out.
        #[test]
        fn never_more_than_k(k in 1usize..6, ops in proptest::collection::vec(op(), 1..300)) {
            let mut n = N::new(NeighbourConfig::default().with_max(k).with_max_candidates(16));
            let mut now = Duration::ZERO;
            let mut peak = 0;
            for o in ops {
                match o {
                    Op::Offer(p, g) => {
                        let c = cand(p, if g { Origin::Given } else { Origin::Mdns });
                        n.offer(c, now);
                    }
                    Op::Dial(pend) => {
                        let held = n.len();
                        if let Some(c) = n.dial_next(now, pend) {
                            prop_assert!(held + pend < k, "dialed at {held} held + {pend} pending, K {k}");
                            prop_assert!(!n.contains(&c.peer.unwrap()));
                        }
                    }
                    Op::Connect(p, inbound) => {
                        let origins: HashMap<u32, Origin> = n.held.iter().map(|(p, x)| (*p, x.origin)).collect();
                        let was_given = !inbound && n.dialing.iter().any(|(d, _)| d.peer == Some(p) && d.origin == Origin::Given);
                        match n.admit(p, inbound, Some(&p), now) {
                            Admit::Refuse => {
                                prop_assert!(!was_given, "a given peer was refused");
                                prop_assert!(!n.contains(&p));
                            }
                            Admit::Replace(v) => {
                                prop_assert!(!n.contains(&v) && n.contains(&p));
                                prop_assert_ne!(origins[&v], Origin::Given, "a given neighbour made room");
                            }
                            Admit::Accept => prop_assert!(n.contains(&p)),
                        }
                    }
                    Op::Fail(p) => n.dial_failed(Some(p), None, now),
                    Op::Close(p) => { n.closed(p, now); prop_assert!(!n.contains(&p)); }
                    Op::Bytes(p, b, w) => n.observe(p, b, w),
                    Op::Rotate => {
                        let before = n.len();
                        let origins: HashMap<u32, Origin> = n.held.iter().map(|(p, x)| (*p, x.origin)).collect();
                        if let Some(v) = n.rotate(now) {
                            prop_assert!(!n.contains(&v));
                            prop_assert!(before >= k, "rotated at {before} of K {k}");
                            prop_assert_ne!(origins[&v], Origin::Given, "a given neighbour rotated out");
                        }
                    }
                    Op::Complete(c) => n.set_complete(c),
                    Op::Wait(ms) => now += Duration::from_millis(ms),
                }
                let given_held = n.held.values().filter(|x| x.origin == Origin::Given).count();
                prop_assert!(n.len() <= k.max(given_held), "{} neighbours, K {k}", n.len());
                peak = peak.max(n.len());
                prop_assert_eq!(n.peak(), peak);
                prop_assert!(n.waiting() <= 16);
                prop_assert!(n.dialing.len() <= 2 * k + 16);
            }
        }
    }
}
