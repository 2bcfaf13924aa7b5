//! The serving policy: a sans-I/O record of who holds an upload slot, and the
//! one place that decides how a chunk request is answered.
//!
//! The node's server and the simulator both call [`ServingPolicy::on_request`]
//! for every chunk request and carry out the [`Answer`]: upload the chunk
//! (holding the [`SlotToken`] until the upload ends or fails, then
//! [`ServingPolicy::on_done`]), or answer busy, or do-not-have. Like the
//! [`crate::scheduler`], it touches no network, no clock and no bytes; time
//! is passed in (only unchoke reservations use it).
//!
//! The order of the checks, defined here once:
//! 1. a chunk the caller does not hold: [`Answer::DoNotHave`];
//! 2. a complete node that super-seeds and has sent this chunk more often
//!    than its least-sent one ([`crate::superseed`]), while other peers
//!    hold, are kept or wait for its slots or were served within
//!    [`ServingConfig::idle_after`]: [`Answer::Withheld`] (an idle upload
//!    serves whatever it holds); with [`ServingConfig::second_ask`] on, not
//!    when the policy withheld this chunk from this peer before (the peer
//!    asks again because no other peer of its offers it): that request goes
//!    on to 3;
//! 3. the peer's own slots full, or all slots full, or (for a peer that holds
//!    none yet) as many peers served as allowed: [`Answer::Busy`];
//! 4. otherwise [`Answer::Serve`]: a slot is taken and the send is counted.
//!
//! Refusals on what is held come before busy because a busy answer says "ask
//! me again later": a peer that lacks or withholds the chunk would make the
//! client back off, keep believing the peer holds it and ask it again, while
//! a do-not-have makes it ask another holder at once. It matters most for a
//! super-seeding seed in a cold storm: the seed is the peer whose slots are
//! always full, so busy-first hides exactly the withholding that is meant to
//! send fetchers to each other. The holding check costs a bit lookup and no
//! slot. (Until this module the node answered busy first and the simulator
//! do-not-have first; swarm/DESIGN.md, "Serving policy".)
//!
//! The second ask is for protocol v2, whose fetcher asks a peer that withdrew
//! a chunk again once no other peer announces it (after a second; the node's
//! `v2_refresh`): without it a last fetcher whose neighbours are all
//! complete super-seeders could be refused for ever (their offer widens only
//! when every chunk has gone out once more). The policy remembers, per peer,
//! the chunks it withheld from it (a bitset of the manifest's chunk count,
//! dropped in [`ServingPolicy::on_peer_gone`]); chunk indices are those of one
//! manifest, so a policy that serves several leaves it off. A v1 fetcher
//! asks again only when a later have-map offers the chunk, and v1 keeps the
//! plain rule.
//!
//! For protocol v2 a busy answer is a choke: with [`ServingConfig::choke`] on,
//! the policy remembers the choked peers (at most
//! [`ServingConfig::max_waiting`], oldest first), and once a slot frees
//! [`ServingPolicy::unchoke_next`] names the one to unchoke and keeps that
//! slot for it for [`ServingConfig::unchoke_hold`], so another peer's request
//! cannot take it in the round trip before the unchoked peer's request
//! arrives (that peer would be choked again and wait its back-off). Protocol
//! v1 has no unchoke message: a busy client backs off and asks again.
//!
//! ```
//! use std::time::Duration;
//! use phase_swarm::serving::{Answer, Holding, ServingConfig, ServingPolicy};
//! use phase_swarm::superseed::SendCounts;
//!
//! let cfg = ServingConfig::default().with_slots(1).with_choke(true);
//! let mut p: ServingPolicy<&str> = ServingPolicy::new(cfg);
//! let mut sent = SendCounts::new(4);
//! fn held(sent: &mut SendCounts) -> Holding<'_> {
//!     Holding { held: true, complete: false, sent }
//! }
//!
//! let t = Duration::ZERO;
//! let Answer::Serve(token) = p.on_request("a", 0, held(&mut sent), t) else { panic!() };
//! assert_eq!(p.on_request("b", 1, held(&mut sent), t), Answer::Busy);
//! let lacks = Holding { held: false, complete: false, sent: &mut sent };
//! assert_eq!(p.on_request("b", 2, lacks, t), Answer::DoNotHave, "not busy: it lacks the chunk");
//! assert_eq!(p.unchoke_next(t), None, "no free slot yet");
//! p.on_done(token);
//! assert_eq!(p.unchoke_next(t), Some("b"));
//! assert_eq!(p.on_request("c", 1, held(&mut sent), t), Answer::Busy, "kept for b");
//! assert!(matches!(p.on_request("b", 1, held(&mut sent), t), Answer::Serve(_)));
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash as StdHash;
use std::time::Duration;

use crate::scheduler::{Bits, ChunkIndex, Time};
use crate::superseed::SendCounts;

/// Tunables. `Default` gives the node's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingConfig {
    /// Uploads at once over all peers.
    pub slots: usize,
    /// Uploads at once to one peer.
    pub per_peer: usize,
    /// Peers holding slots at once (the unchoked peers of BitTorrent).
    pub peers: usize,
    /// A complete node offers only its least-sent chunks ([`crate::superseed`]).
    pub super_seed: bool,
    /// Remember busy peers for [`ServingPolicy::unchoke_next`] (protocol v2).
    pub choke: bool,
    /// Choked peers remembered at most; past it a busy peer is not queued
    /// (it asks again after its back-off).
    pub max_waiting: usize,
    /// How long a slot freed for an unchoked peer is kept for it.
    pub unchoke_hold: Duration,
    /// A super-seeder that has served no other peer for this long counts as
    /// idle: it serves and advertises every chunk it holds.
    pub idle_after: Duration,
    /// A chunk withheld from a peer is not withheld from it again: its
    /// second ask gets busy or served (protocol v2; see the module doc).
    pub second_ask: bool,
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig {
            // Few uploads at once, each fast: a chunk reaches a fetcher (and
            // becomes servable there) sooner than when 16 share the link.
            slots: 6,
            // Below the global cap, so one peer (honest ones ask one at a
            // time) cannot take every upload slot.
            per_peer: 2,
            // No limit of its own: `slots` already bounds the peers served.
            peers: 6,
            super_seed: true,
            choke: false,
            max_waiting: 256,
            // Several round trips on a LAN; an unchoked peer with nothing
            // to ask costs the slot at most this long.
            unchoke_hold: Duration::from_millis(50),
            // Many chunk times on any link a storm runs on: a seed that is
            // asked at all is asked far more often than this.
            idle_after: Duration::from_secs(2),
            // v1 keeps the plain rule; the v2 models turn it on.
            second_ask: false,
        }
    }
}

impl ServingConfig {
    /// Sets [`ServingConfig::slots`] (at least 1); [`ServingConfig::peers`]
    /// follows it unless set after.
    pub fn with_slots(mut self, n: usize) -> Self {
        self.slots = n.max(1);
        self.peers = self.slots;
        self
    }
    /// Sets [`ServingConfig::per_peer`] (at least 1).
    pub fn with_per_peer(mut self, n: usize) -> Self {
        self.per_peer = n.max(1);
        self
    }
    /// Sets [`ServingConfig::peers`] (at least 1).
    pub fn with_peers(mut self, n: usize) -> Self {
        self.peers = n.max(1);
        self
    }
    /// Sets [`ServingConfig::super_seed`].
    pub fn with_super_seed(mut self, on: bool) -> Self {
        self.super_seed = on;
        self
    }
    /// Sets [`ServingConfig::choke`].
    pub fn with_choke(mut self, on: bool) -> Self {
        self.choke = on;
        self
    }
    /// Sets [`ServingConfig::max_waiting`].
    pub fn with_max_waiting(mut self, n: usize) -> Self {
        self.max_waiting = n;
        self
    }
    /// Sets [`ServingConfig::second_ask`].
    pub fn with_second_ask(mut self, on: bool) -> Self {
        self.second_ask = on;
        self
    }
    /// Sets [`ServingConfig::unchoke_hold`].
    pub fn with_unchoke_hold(mut self, d: Duration) -> Self {
        self.unchoke_hold = d;
        self
    }
}

/// What the caller holds of the manifest a request is about.
#[derive(Debug)]
pub struct Holding<'a> {
    /// The chunk asked for is held (verified and stored).
    pub held: bool,
    /// Every chunk of the manifest is held.
    pub complete: bool,
    /// What has been sent of each chunk of that manifest; a served request
    /// is counted here.
    pub sent: &'a mut SendCounts,
}

/// How to answer a chunk request.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Answer<P> {
    /// Upload it; give the token back with [`ServingPolicy::on_done`] when
    /// the upload has ended, well or not.
    Serve(SlotToken<P>),
    /// Over a cap: the peer should ask again later (v1), or is choked (v2).
    Busy,
    /// The chunk is not held.
    DoNotHave,
    /// Held but not offered (super-seeding): answer as do-not-have, so the
    /// peer asks someone else.
    Withheld,
}

/// One upload slot, held by the caller while the upload runs. Not `Clone`:
/// each slot is given back once. A token whose peer was dropped with
/// [`ServingPolicy::on_peer_gone`] is already free; giving it back is a no-op.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub struct SlotToken<P> {
    id: u64,
    peer: P,
}

impl<P> SlotToken<P> {
    /// The peer the slot serves.
    pub fn peer(&self) -> &P {
        &self.peer
    }
}

/// Upload slots in use and choked peers. `P` names a peer.
#[derive(Debug)]
pub struct ServingPolicy<P> {
    cfg: ServingConfig,
    /// Live slots by token id.
    live: HashMap<u64, P>,
    /// Live slots per peer; a peer with none has no entry.
    in_use: HashMap<P, usize>,
    next_id: u64,
    /// Choked peers, oldest first, each once.
    waiting: VecDeque<P>,
    /// Peers just unchoked, each with the slot kept for it until then.
    held_for: Vec<(P, Time)>,
    /// When each peer was last served (entries older than
    /// [`ServingConfig::idle_after`] are dropped as requests come).
    served_at: HashMap<P, Time>,
    /// With [`ServingConfig::second_ask`]: per peer, the chunks withheld
    /// from it (one bit per chunk of the manifest).
    withheld: HashMap<P, Bits>,
}

impl<P: Clone + Eq + StdHash + Debug> ServingPolicy<P> {
    /// No slot in use, nobody choked.
    pub fn new(cfg: ServingConfig) -> Self {
        ServingPolicy {
            cfg,
            live: HashMap::new(),
            in_use: HashMap::new(),
            next_id: 0,
            waiting: VecDeque::new(),
            held_for: Vec::new(),
            served_at: HashMap::new(),
            withheld: HashMap::new(),
        }
    }

    /// The tunables.
    pub fn config(&self) -> &ServingConfig {
        &self.cfg
    }

    /// Decides how to answer `peer`'s request for `chunk` (the order of the
    /// checks is in the module doc: not held, withheld unless it is the
    /// peer's second ask, busy, served) and takes a slot if it is served. A
    /// [`Answer::Withheld`] is remembered for the second ask when
    /// [`ServingConfig::second_ask`] is on.
    pub fn on_request(
        &mut self,
        peer: P,
        chunk: ChunkIndex,
        holding: Holding<'_>,
        now: Time,
    ) -> Answer<P> {
        self.expire(now);
        let i = chunk as usize;
        if !holding.held {
            return Answer::DoNotHave;
        }
        if self.cfg.super_seed
            && holding.complete
            && !holding.sent.offer(i)
            && self.contended(&peer, now)
            && !self.asked_again(&peer, i, holding.sent.chunks())
        {
            return Answer::Withheld;
        }
        if !self.admits(&peer) {
            if self.cfg.choke
                && self.waiting.len() < self.cfg.max_waiting
                && !self.waiting.contains(&peer)
            {
                self.waiting.push_back(peer);
            }
            return Answer::Busy;
        }
        holding.sent.record(i);
        let idle_after = self.cfg.idle_after;
        self.served_at
            .retain(|_, t| now.saturating_sub(*t) < idle_after);
        self.served_at.insert(peer.clone(), now);
        if self.cfg.choke {
            // Served: no longer choked, and the slot kept for it is taken.
            self.waiting.retain(|p| p != &peer);
            self.held_for.retain(|(p, _)| p != &peer);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.live.insert(id, peer.clone());
        *self.in_use.entry(peer.clone()).or_default() += 1;
        Answer::Serve(SlotToken { id, peer })
    }

    /// Whether a peer other than `peer` holds a slot, has one kept for it,
    /// waits for one or was served within [`ServingConfig::idle_after`].
    /// Super-seeding steers requests away from a contended
    /// upload; an idle one serves and advertises all it holds, or a last
    /// fetcher among complete nodes could wait forever for a chunk each of
    /// them has sent more often than its least-sent one (the offer widens
    /// only when every chunk has gone out once more, and nobody else asks).
    fn contended(&self, peer: &P, now: Time) -> bool {
        let other = |p: &P| p != peer;
        self.in_use.keys().any(other)
            || self.held_for.iter().any(|(p, _)| other(p))
            || self.waiting.iter().any(other)
            || self
                .served_at
                .iter()
                .any(|(p, t)| other(p) && now.saturating_sub(*t) < self.cfg.idle_after)
    }

    /// With [`ServingConfig::second_ask`]: whether chunk `i` (of `chunks`)
    /// was withheld from `peer` before; if not, it is marked withheld now.
    fn asked_again(&mut self, peer: &P, i: usize, chunks: usize) -> bool {
        if !self.cfg.second_ask || i >= chunks {
            return false;
        }
        let bits = self
            .withheld
            .entry(peer.clone())
            .or_insert_with(|| Bits::new(chunks));
        if i >= bits.len() {
            return false; // a bitset of another manifest's length
        }
        let again = bits.get(i);
        bits.put(i, true);
        again
    }

    /// Whether a request from `peer` would get a slot now: the slots and
    /// peer places kept for others count as taken.
    fn admits(&self, peer: &P) -> bool {
        let mine = self.in_use.get(peer).copied().unwrap_or(0);
        let kept = self.held_for.iter().filter(|(p, _)| p != peer);
        let kept_slots = kept.clone().count();
        let kept_places = kept.filter(|(p, _)| !self.in_use.contains_key(p)).count();
        mine < self.cfg.per_peer
            && self.live.len() + kept_slots < self.cfg.slots
            && (mine > 0 || self.in_use.len() + kept_places < self.cfg.peers)
    }

    fn expire(&mut self, now: Time) {
        let hold = self.cfg.unchoke_hold;
        self.held_for
            .retain(|(_, since)| now.saturating_sub(*since) < hold);
    }

    /// The upload of `token` ended (sent, failed or cancelled): its slot is
    /// free. With choking on, call [`ServingPolicy::unchoke_next`] after.
    pub fn on_done(&mut self, token: SlotToken<P>) {
        if self.live.remove(&token.id).is_some() {
            self.release(&token.peer, 1);
        }
    }

    fn release(&mut self, peer: &P, n: usize) {
        if let Some(c) = self.in_use.get_mut(peer) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.in_use.remove(peer);
            }
        }
    }

    /// `peer` disconnected (or was banned): its slots are free, it is no
    /// longer waiting, and the chunks withheld from it are forgotten. Its
    /// tokens, given back later, change nothing.
    pub fn on_peer_gone(&mut self, peer: &P) {
        self.served_at.remove(peer);
        self.withheld.remove(peer);
        self.live.retain(|_, p| p != peer);
        self.in_use.remove(peer);
        self.waiting.retain(|p| p != peer);
        self.held_for.retain(|(p, _)| p != peer);
    }

    /// The longest-waiting choked peer that a request would now admit, taken
    /// off the waiting list, with a slot kept for it until `now` +
    /// [`ServingConfig::unchoke_hold`]: the caller unchokes it. Call it after
    /// a slot frees, until it returns `None`.
    pub fn unchoke_next(&mut self, now: Time) -> Option<P> {
        self.expire(now);
        let i = self.waiting.iter().position(|p| self.admits(p))?;
        let p = self.waiting.remove(i)?;
        self.held_for.retain(|(q, _)| q != &p);
        self.held_for.push((p.clone(), now));
        Some(p)
    }

    /// The have-map to advertise to `to`: what is held, or, for a complete
    /// node that super-seeds while others contend for its upload, only the
    /// chunks it would serve now (its least-sent ones).
    pub fn advertise(
        &self,
        to: &P,
        held: &[bool],
        complete: bool,
        sent: &SendCounts,
        now: Time,
    ) -> Vec<bool> {
        if self.cfg.super_seed && complete && self.contended(to, now) {
            sent.offer_map()
        } else {
            held.to_vec()
        }
    }

    /// Slots in use over all peers.
    pub fn total(&self) -> usize {
        self.live.len()
    }

    /// Slots `peer` holds.
    pub fn in_use(&self, peer: &P) -> usize {
        self.in_use.get(peer).copied().unwrap_or(0)
    }

    /// Peers holding at least one slot.
    pub fn peers_served(&self) -> usize {
        self.in_use.len()
    }

    /// Choked peers waiting for an unchoke.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Time = Duration::ZERO;

    fn held(sent: &mut SendCounts) -> Holding<'_> {
        Holding {
            held: true,
            complete: false,
            sent,
        }
    }

    fn complete(sent: &mut SendCounts) -> Holding<'_> {
        Holding {
            held: true,
            complete: true,
            sent,
        }
    }

    fn serve<P: Debug>(a: Answer<P>) -> SlotToken<P> {
        match a {
            Answer::Serve(t) => t,
            other => panic!("not served: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_nodes() {
        let n = crate::NodeConfig::default();
        let c = ServingConfig::default();
        assert_eq!(
            (c.slots, c.per_peer, c.super_seed, c.choke),
            (n.max_serving, n.per_peer_serving, n.super_seed, false)
        );
    }

    #[test]
    fn caps_per_peer_and_over_all() {
        let mut p = ServingPolicy::new(ServingConfig::default().with_slots(3).with_per_peer(2));
        let mut s = SendCounts::new(8);
        let a1 = serve(p.on_request("a", 0, held(&mut s), T));
        let _a2 = serve(p.on_request("a", 1, held(&mut s), T));
        assert_eq!(
            p.on_request("a", 2, held(&mut s), T),
            Answer::Busy,
            "a's own cap"
        );
        let _b = serve(p.on_request("b", 2, held(&mut s), T));
        assert_eq!(
            p.on_request("c", 3, held(&mut s), T),
            Answer::Busy,
            "all slots"
        );
        assert_eq!((p.total(), p.in_use(&"a"), p.peers_served()), (3, 2, 2));
        p.on_done(a1);
        assert!(matches!(
            p.on_request("c", 3, held(&mut s), T),
            Answer::Serve(_)
        ));
        assert_eq!(p.waiting(), 0, "v1 (no choke) remembers nobody");
    }

    #[test]
    fn refusals_on_holding_come_before_busy() {
        let mut p = ServingPolicy::new(ServingConfig::default().with_slots(1));
        let mut s = SendCounts::new(2);
        let _t = serve(p.on_request("a", 0, held(&mut s), T));
        let lacks = Holding {
            held: false,
            complete: false,
            sent: &mut s,
        };
        assert_eq!(p.on_request("b", 1, lacks, T), Answer::DoNotHave);
        // Complete now: chunk 0 went out once, chunk 1 never.
        assert_eq!(p.on_request("b", 0, complete(&mut s), T), Answer::Withheld);
        assert_eq!(p.on_request("b", 1, complete(&mut s), T), Answer::Busy);
    }

    #[test]
    fn super_seeding_sends_each_chunk_once_before_any_twice() {
        let mut p = ServingPolicy::new(ServingConfig::default());
        let mut s = SendCounts::new(3);
        let t = serve(p.on_request("a", 0, complete(&mut s), T));
        // While "a" holds a slot, "b" is steered to the chunks not yet sent.
        assert_eq!(p.on_request("b", 0, complete(&mut s), T), Answer::Withheld);
        assert_eq!(
            p.advertise(&"b", &[true; 3], true, &s, T),
            vec![false, true, true]
        );
        assert_eq!(
            p.advertise(&"b", &[true; 3], false, &s, T),
            vec![true; 3],
            "still fetching"
        );
        let off = ServingPolicy::<&str>::new(ServingConfig::default().with_super_seed(false));
        assert_eq!(off.advertise(&"b", &[true; 3], true, &s, T), vec![true; 3]);
        p.on_done(t);
        // A node still fetching serves what it holds, and counts it.
        let t = serve(p.on_request("b", 0, held(&mut s), T));
        p.on_done(t);
        assert!(!s.offer(0) && s.offer(1));
    }

    #[test]
    fn an_idle_super_seeder_serves_and_advertises_everything() {
        let mut p = ServingPolicy::new(ServingConfig::default());
        let idle = T + p.config().idle_after;
        let mut s = SendCounts::new(3);
        let t = serve(p.on_request("a", 0, complete(&mut s), T));
        p.on_done(t);
        // "a" was served just now: "b" is steered to the chunks not yet sent.
        assert_eq!(
            p.advertise(&"b", &[true; 3], true, &s, T),
            vec![false, true, true]
        );
        // Nobody else served for `idle_after`: chunk 0, sent once while 1
        // and 2 never were, is offered and served to the only asker.
        assert_eq!(p.advertise(&"b", &[true; 3], true, &s, idle), vec![true; 3]);
        let t = serve(p.on_request("b", 0, complete(&mut s), idle));
        // "b"'s own slot is no contention for "b" ...
        assert_eq!(p.advertise(&"b", &[true; 3], true, &s, idle), vec![true; 3]);
        // ... but it is for "c".
        assert_eq!(
            p.advertise(&"c", &[true; 3], true, &s, idle),
            vec![false, true, true]
        );
        assert_eq!(
            p.on_request("c", 0, complete(&mut s), idle),
            Answer::Withheld
        );
        p.on_done(t);
    }

    #[test]
    fn a_withheld_chunk_asked_again_by_the_same_peer_is_not_withheld() {
        let cfg = ServingConfig::default().with_slots(1).with_second_ask(true);
        let mut p = ServingPolicy::new(cfg);
        let mut s = SendCounts::new(3);
        // "a" holds the only slot: chunk 0 (sent once) is off the offer.
        let a = serve(p.on_request("a", 0, complete(&mut s), T));
        assert_eq!(p.on_request("b", 0, complete(&mut s), T), Answer::Withheld);
        assert_eq!(
            p.on_request("c", 0, complete(&mut s), T),
            Answer::Withheld,
            "another peer's first ask"
        );
        assert_eq!(
            p.on_request("b", 0, complete(&mut s), T),
            Answer::Busy,
            "b's second ask goes on to the slot check"
        );
        p.on_done(a);
        let b = serve(p.on_request("b", 0, complete(&mut s), T));
        p.on_done(b);
        assert!(!s.offer(0), "still off the offer, sent twice");
        p.on_peer_gone(&"c");
        assert_eq!(
            p.on_request("c", 0, complete(&mut s), T),
            Answer::Withheld,
            "forgotten with the peer: a first ask again"
        );
        // Off (the default, v1): withheld however often it is asked.
        let mut plain = ServingPolicy::new(ServingConfig::default());
        let mut s = SendCounts::new(3);
        let a = serve(plain.on_request("a", 0, complete(&mut s), T));
        for _ in 0..2 {
            assert_eq!(
                plain.on_request("b", 0, complete(&mut s), T),
                Answer::Withheld
            );
        }
        plain.on_done(a);
    }

    #[test]
    fn peers_cap_limits_who_holds_slots() {
        let cfg = ServingConfig::default()
            .with_slots(4)
            .with_per_peer(2)
            .with_peers(1);
        let mut p = ServingPolicy::new(cfg);
        let mut s = SendCounts::new(4);
        let _a = serve(p.on_request("a", 0, held(&mut s), T));
        assert_eq!(p.on_request("b", 1, held(&mut s), T), Answer::Busy);
        let _a2 = serve(p.on_request("a", 1, held(&mut s), T));
    }

    #[test]
    fn unchokes_the_longest_waiting_and_keeps_the_slot_for_it() {
        let cfg = ServingConfig::default()
            .with_slots(1)
            .with_choke(true)
            .with_max_waiting(2)
            .with_unchoke_hold(Duration::from_millis(50));
        let mut p = ServingPolicy::new(cfg);
        let mut s = SendCounts::new(4);
        let ms = Duration::from_millis;
        let a = serve(p.on_request("a", 0, held(&mut s), T));
        for who in ["b", "c", "b", "d"] {
            assert_eq!(p.on_request(who, 1, held(&mut s), T), Answer::Busy);
        }
        assert_eq!(p.waiting(), 2, "b once, then c; d over the bound");
        assert_eq!(p.unchoke_next(T), None, "no slot free");
        p.on_done(a);
        assert_eq!(p.unchoke_next(T), Some("b"));
        assert_eq!(p.unchoke_next(T), None, "the one free slot is kept for b");
        assert_eq!(p.on_request("c", 1, held(&mut s), ms(10)), Answer::Busy);
        let b = serve(p.on_request("b", 1, held(&mut s), ms(20)));
        p.on_done(b);
        assert_eq!(p.unchoke_next(ms(20)), Some("c"));
        // c never asks: after the hold the slot is anybody's.
        assert_eq!(p.on_request("d", 2, held(&mut s), ms(69)), Answer::Busy);
        let _d = serve(p.on_request("d", 2, held(&mut s), ms(70)));
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn a_gone_peer_frees_its_slots_once() {
        let cfg = ServingConfig::default().with_slots(2).with_choke(true);
        let mut p = ServingPolicy::new(cfg);
        let mut s = SendCounts::new(4);
        let a = serve(p.on_request("a", 0, held(&mut s), T));
        let b = serve(p.on_request("b", 1, held(&mut s), T));
        assert_eq!(p.on_request("c", 2, held(&mut s), T), Answer::Busy);
        p.on_peer_gone(&"a");
        p.on_peer_gone(&"c");
        assert_eq!((p.total(), p.in_use(&"a"), p.waiting()), (1, 0, 0));
        let b2 = serve(p.on_request("b", 2, held(&mut s), T));
        p.on_done(a);
        assert_eq!(p.total(), 2, "a's stale token frees nothing");
        p.on_done(b);
        p.on_done(b2);
        assert_eq!((p.total(), p.peers_served()), (0, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Ask {
            peer: u8,
            chunk: u8,
            held: bool,
            complete: bool,
        },
        Done(usize),
        Gone(u8),
        Unchoke,
        Wait(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0u8..8, any::<bool>(), any::<bool>())
                .prop_map(|(peer, chunk, held, complete)| Op::Ask { peer, chunk, held, complete }),
            3 => any::<usize>().prop_map(Op::Done),
            1 => (0u8..6).prop_map(Op::Gone),
            1 => Just(Op::Unchoke),
            1 => any::<u8>().prop_map(Op::Wait),
        ]
    }

    proptest! {
        #[test]
        fn slots_stay_within_the_caps_and_return_to_zero(
            slots in 1usize..6,
            per_peer in 1usize..4,
            peers in 1usize..6,
            super_seed in any::<bool>(),
            choke in any::<bool>(),
            second_ask in any::<bool>(),
            ops in proptest::collection::vec(op(), 0..300),
        ) {
            let cfg = ServingConfig::default()
                .with_slots(slots)
                .with_per_peer(per_peer)
                .with_peers(peers)
                .with_super_seed(super_seed)
                .with_choke(choke)
                .with_second_ask(second_ask)
                .with_max_waiting(4);
            let mut p = ServingPolicy::new(cfg);
            let mut sent = SendCounts::new(8);
            let mut tokens: Vec<SlotToken<u8>> = Vec::new();
            let mut now = T;
            let mut withheld = std::collections::HashSet::new();
            for op in ops {
                match op {
                    Op::Ask { peer, chunk, held, complete } => {
                        let before = p.in_use(&peer);
                        let offered = sent.offer(chunk as usize);
                        let a = p.on_request(peer, chunk.into(), Holding { held, complete, sent: &mut sent }, now);
                        match a {
                            Answer::DoNotHave => prop_assert!(!held),
                            Answer::Withheld => {
                                prop_assert!(held && complete && super_seed && !offered);
                                let first = withheld.insert((peer, chunk));
                                prop_assert!(first || !second_ask, "withheld twice from one peer");
                            }
                            Answer::Busy => prop_assert!(held),
                            Answer::Serve(t) => {
                                prop_assert_eq!(p.in_use(&peer), before + 1);
                                tokens.push(t);
                            }
                        }
                    }
                    Op::Done(i) if !tokens.is_empty() => {
                        let t = tokens.swap_remove(i % tokens.len());
                        p.on_done(t);
                    }
                    Op::Done(_) => {}
                    Op::Wait(ms) => now += Duration::from_millis(ms.into()),
                    Op::Gone(peer) => {
                        p.on_peer_gone(&peer);
                        withheld.retain(|&(q, _)| q != peer);
                        prop_assert_eq!(p.in_use(&peer), 0);
                    }
                    Op::Unchoke => {
                        if let Some(w) = p.unchoke_next(now) {
                            prop_assert!(choke);
                            prop_assert!(p.in_use(&w) < per_peer && p.total() < slots);
                        }
                    }
                }
                prop_assert!(p.total() <= slots);
                prop_assert!(p.total() + p.held_for.len() <= slots, "kept slots are free slots");
                prop_assert!(p.peers_served() <= peers);
                for peer in 0..6u8 {
                    prop_assert!(p.in_use(&peer) <= per_peer);
                }
                let sum: usize = (0..6u8).map(|q| p.in_use(&q)).sum();
                prop_assert_eq!(sum, p.total());
                prop_assert!(p.waiting() <= 4);
            }
            for t in tokens {
                p.on_done(t);
            }
            prop_assert_eq!(p.total(), 0);
            prop_assert_eq!(p.peers_served(), 0);
        }
    }
}
