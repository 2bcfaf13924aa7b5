//! The fetch scheduler: a sans-I/O state machine that decides which chunk to
//! ask which peer for.
//!
//! The caller feeds [`Input`]s (with the current time) into
//! [`Scheduler::handle`] and carries out the [`Action`]s it returns: send a
//! request, ask a peer for its have-map, ban a peer. The scheduler never
//! touches the network, the clock or the chunk bytes: the caller verifies a
//! chunk against the manifest and reports [`Input::ChunkOk`] or
//! [`Input::ChunkBad`]. The libp2p event loop drives it for real; a
//! discrete-event simulator can drive thousands of them. Given the same seed
//! and the same inputs it returns the same actions.
//!
//! Policy (the top-level DESIGN.md, decision 4):
//! - rarest-first: among the chunks a peer can give us, the one the fewest
//!   usable peers hold, random among equals;
//! - at most [`SchedulerConfig::per_peer_in_flight`] requests in flight per peer;
//! - a peer that answers "busy" or fails is backed off (exponentially for
//!   repeated failures) and dropped after too many failures in a row;
//! - end-game: once every missing chunk is in flight, idle peers duplicate the
//!   outstanding requests (at most [`SchedulerConfig::endgame_duplicates`]
//!   requests per chunk) so one slow peer cannot hold up the finish;
//! - a peer whose bytes fail verification is banned at once: the scheduler
//!   emits [`Action::Ban`] and forgets the peer; the caller keeps the ban list
//!   (it outlives fetches) and never reports that peer again;
//! - refusals count against a peer: "busy", "do not have" (for a chunk it
//!   claimed) and answers slower than [`SchedulerConfig::slow_answer`] make a
//!   streak, and each busy or slow answer in a streak doubles the peer's
//!   back-off (up to [`SchedulerConfig::max_busy_backoff`]); a prompt chunk
//!   ends the streak;
//! - an optional fallback source (the HTTP seed) is a rescue: while no peer
//!   has delivered a chunk promptly for [`SchedulerConfig::fallback_grace`] it
//!   takes any missing chunk with no request out, whatever peers claim; and a
//!   chunk that peers have refused for [`SchedulerConfig::stall_grace`] (no
//!   delivery, no new holder) goes to it even while others arrive, so peers
//!   that claim everything and answer busy, or trickle, cannot hold a fetch off;
//!   with no grace at all while the caller says it is alone (no peer connected,
//!   no dial in flight: [`Scheduler::set_alone`]), because then there is nobody
//!   to wait for.
//!
//! ```
//! use std::time::Duration;
//! use phase_swarm::scheduler::{Action, Input, Scheduler, SchedulerConfig};
//!
//! let cfg = SchedulerConfig::default().with_per_peer_in_flight(2);
//! let mut s: Scheduler<&str> = Scheduler::new(2, cfg, 7);
//! let t = Duration::ZERO;
//! s.handle(Input::PeerFound("a"), t);
//! let actions = s.handle(Input::HaveMap { peer: "a", have: vec![true, true] }, t);
//! let asked: Vec<u32> = actions
//!     .iter()
//!     .filter_map(|a| match a { Action::Request { chunk, .. } => Some(*chunk), _ => None })
//!     .collect();
//! assert_eq!(asked.len(), 2);
//! s.handle(Input::ChunkOk { peer: "a", chunk: 0 }, t);
//! let done = s.handle(Input::ChunkOk { peer: "a", chunk: 1 }, t);
//! assert!(done.contains(&Action::Done));
//! ```

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash as StdHash;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Time as the caller measures it: any monotonic clock's offset from an
/// arbitrary epoch (the simulator's virtual time, or `Instant - start`).
pub type Time = Duration;

/// Index of a chunk within a manifest: artifacts in manifest order, chunks in
/// order within each artifact.
pub type ChunkIndex = u32;

/// Tunables. `Default` gives the values the real node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests in flight to one peer at most (Kraken uses 3).
    pub per_peer_in_flight: usize,
    /// Requests in flight to all peers together at most (the fallback not
    /// counted). Chunks asked for wait at their server; past what keeps the
    /// download link busy they only sit in queues while other holders idle.
    pub max_in_flight: usize,
    /// Requests in flight to the fallback source at most.
    pub fallback_in_flight: usize,
    /// A request not answered within this is counted as failed.
    pub request_timeout: Duration,
    /// Back-off after a "busy" answer.
    pub busy_backoff: Duration,
    /// Back-off after the first failure; doubles per failure in a row.
    pub fail_backoff: Duration,
    /// Upper bound of the back-off.
    pub max_backoff: Duration,
    /// Failures in a row after which a peer is dropped.
    pub max_failures: u32,
    /// Requests per chunk at most during end-game (1 disables end-game).
    pub endgame_duplicates: usize,
    /// How often to re-ask a peer whose have-map is incomplete.
    pub have_refresh: Duration,
    /// The fallback source is not used before this much time has passed since
    /// the first input, so peers get a chance to report their have-maps.
    pub fallback_grace: Duration,
    /// A chunk answered later than this after its request is not progress
    /// (it does not hold off the rescue) and counts against the peer.
    pub slow_answer: Duration,
    /// Upper bound of the back-off after busy or slow answers in a row.
    pub max_busy_backoff: Duration,
    /// A chunk refused (busy, do-not-have, failed) this long ago, with no
    /// delivery and no new holder since, goes to the fallback source
    /// whatever peers claim.
    pub stall_grace: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            // One request per peer: in a cold storm every fetcher asks the seed,
            // and more in flight only splits the seed's upload into slower,
            // duplicated transfers (measured with the simulator, see
            // simulations/README.md); pipelining comes from asking many peers.
            per_peer_in_flight: 1,
            max_in_flight: usize::MAX,
            fallback_in_flight: 4,
            request_timeout: Duration::from_secs(10),
            busy_backoff: Duration::from_millis(250),
            fail_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_failures: 5,
            endgame_duplicates: 2,
            have_refresh: Duration::from_millis(500),
            fallback_grace: Duration::from_secs(2),
            // Honest uploads of a 256 KiB chunk, six at once on a 20 Mbit/s
            // link, take about 0.6 s.
            slow_answer: Duration::from_millis(1500),
            max_busy_backoff: Duration::from_secs(1),
            stall_grace: Duration::from_secs(4),
        }
    }
}

impl SchedulerConfig {
    /// Sets [`SchedulerConfig::per_peer_in_flight`].
    pub fn with_per_peer_in_flight(mut self, n: usize) -> Self {
        self.per_peer_in_flight = n.max(1);
        self
    }
    /// Sets [`SchedulerConfig::request_timeout`].
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    /// Sets [`SchedulerConfig::endgame_duplicates`].
    pub fn with_endgame_duplicates(mut self, n: usize) -> Self {
        self.endgame_duplicates = n.max(1);
        self
    }
    /// Sets [`SchedulerConfig::fallback_grace`].
    pub fn with_fallback_grace(mut self, d: Duration) -> Self {
        self.fallback_grace = d;
        self
    }
    /// Sets [`SchedulerConfig::slow_answer`].
    pub fn with_slow_answer(mut self, d: Duration) -> Self {
        self.slow_answer = d;
        self
    }
    /// Sets [`SchedulerConfig::stall_grace`].
    pub fn with_stall_grace(mut self, d: Duration) -> Self {
        self.stall_grace = d;
        self
    }
}

/// What happened, as reported by the caller.
///
/// Inputs about a peer the scheduler does not know (never found, or forgotten
/// after a ban or a [`Scheduler::reset`]) change nothing about that peer: a
/// `ChunkOk` still counts the chunk held, a `ChunkBad` still asks for a ban,
/// the rest are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input<P> {
    /// A peer that may hold chunks (a DHT provider, an mDNS or explicit peer).
    /// The scheduler asks for its have-map.
    PeerFound(P),
    /// Several providers at once (a DHT answer).
    ProvidersFound(Vec<P>),
    /// A peer's full have-map (bit `i` set: it holds chunk `i`). Replaces the
    /// previous one; a map of the wrong length is padded or cut.
    HaveMap {
        /// The peer.
        peer: P,
        /// One flag per chunk.
        have: Vec<bool>,
    },
    /// A peer's have-map that came unasked, with a chunk it sent: as
    /// [`Input::HaveMap`], and it counts as a pull, so the next
    /// [`Action::AskHaveMap`] for this peer waits
    /// [`SchedulerConfig::have_refresh`] from now.
    MapWithChunk {
        /// The peer.
        peer: P,
        /// One flag per chunk.
        have: Vec<bool>,
    },
    /// A peer now also holds `chunk`.
    Have {
        /// The peer.
        peer: P,
        /// The chunk.
        chunk: ChunkIndex,
    },
    /// The chunk arrived and matched its hash; the caller has stored it.
    ChunkOk {
        /// Who sent it.
        peer: P,
        /// Which chunk.
        chunk: ChunkIndex,
    },
    /// The chunk arrived and did NOT match its hash: the scheduler asks for
    /// a ban ([`Action::Ban`]) and forgets the peer.
    ChunkBad {
        /// Who sent it.
        peer: P,
        /// Which chunk.
        chunk: ChunkIndex,
    },
    /// The request failed (timeout, connection closed, protocol error).
    ChunkFailed {
        /// The peer asked.
        peer: P,
        /// The chunk asked for.
        chunk: ChunkIndex,
    },
    /// The peer said it does not have the chunk after all.
    DoNotHave {
        /// The peer asked.
        peer: P,
        /// The chunk asked for.
        chunk: ChunkIndex,
    },
    /// The peer is over its serving cap: back off.
    Busy {
        /// The peer asked.
        peer: P,
        /// The chunk asked for.
        chunk: ChunkIndex,
    },
    /// The peer takes requests again (it unchoked us): a back-off from an
    /// earlier `Busy` ends now.
    Unchoke(P),
    /// The peer disconnected or is otherwise unusable (not banned).
    PeerGone(P),
    /// Time passed: expire requests, end back-offs, refresh have-maps.
    Tick,
}

/// What the caller should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask `peer` for `chunk`.
    Request {
        /// The peer (possibly the fallback source).
        peer: P,
        /// The chunk.
        chunk: ChunkIndex,
    },
    /// Ask `peer` for its have-map.
    AskHaveMap(P),
    /// Ban `peer`: it sent bytes that failed verification. The scheduler has
    /// forgotten it (its requests go to others); the caller keeps the ban,
    /// disconnects it and never reports it again (found again, it would be a
    /// fresh peer).
    Ban(P),
    /// Every chunk is held. Emitted once.
    Done,
}

/// A set of chunk indices below a fixed length, one bit each: the scheduler
/// walks the chunks a peer holds and it misses a word (64 chunks) at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bits {
    words: Vec<u64>,
    len: usize,
}

impl Bits {
    pub(crate) fn new(len: usize) -> Self {
        Bits {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Every index below `len` set.
    fn full(len: usize) -> Self {
        let mut b = Bits::new(len);
        b.words.fill(u64::MAX);
        if let Some(last) = b.words.last_mut()
            && !len.is_multiple_of(64)
        {
            *last = (1u64 << (len % 64)) - 1;
        }
        b
    }

    /// The flags as a set, padded with unset or cut to `len`.
    fn from_flags(flags: &[bool], len: usize) -> Self {
        let mut b = Bits::new(len);
        for (i, _) in flags.iter().take(len).enumerate().filter(|(_, f)| **f) {
            b.words[i / 64] |= 1 << (i % 64);
        }
        b
    }

    /// Indices below this can be set.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets or clears index `i` (below `len`).
    pub(crate) fn put(&mut self, i: usize, on: bool) {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        if on {
            self.words[w] |= b;
        } else {
            self.words[w] &= !b;
        }
    }

    fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The set indices, in ascending order.
    fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(w, &word)| ones_of(w, word))
    }
}

/// The indices of the bits set in `word`, word `w` of a [`Bits`], ascending.
fn ones_of(w: usize, mut word: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if word == 0 {
            return None;
        }
        let b = word.trailing_zeros() as usize;
        word &= word - 1;
        Some(w * 64 + b)
    })
}

#[derive(Debug, Clone)]
struct PeerState {
    have: Bits,
    have_count: usize,
    has_map: bool,
    in_flight: usize,
    backoff_until: Time,
    failures: u32,
    /// Busy, do-not-have and slow answers since the last prompt chunk.
    strikes: u32,
    last_map_ask: Option<Time>,
    /// When its last chunk arrived: with requests pipelined, an answer is
    /// timed from the later of its request and the answer before it.
    last_answer: Option<Time>,
    gone: bool,
}

impl PeerState {
    fn new(n: usize) -> Self {
        PeerState {
            have: Bits::new(n),
            have_count: 0,
            has_map: false,
            in_flight: 0,
            backoff_until: Duration::ZERO,
            failures: 0,
            strikes: 0,
            last_map_ask: None,
            last_answer: None,
            gone: false,
        }
    }
    fn usable(&self) -> bool {
        !self.gone
    }
}

/// The scheduler for one manifest's chunks. `P` names a peer.
///
/// Per input it does work in proportion to what changed, not to the number of
/// chunks: counts and sets that answer "what is missing and unrequested",
/// "how many requests are out" and "could a request have expired" are kept
/// as the inputs arrive (the randomized invariants test recounts them).
#[derive(Debug)]
pub struct Scheduler<P> {
    cfg: SchedulerConfig,
    n: usize,
    held: Vec<bool>,
    held_count: usize,
    /// The chunks not held.
    missing: Bits,
    /// The chunks not held with no request out.
    unrequested: Bits,
    unrequested_count: usize,
    /// Usable peers that hold each chunk.
    avail: Vec<u32>,
    /// Outstanding requests per chunk: (peer, deadline).
    pending: Vec<Vec<(P, Time)>>,
    /// No outstanding request's deadline is earlier than this (`Time::MAX`
    /// when none has been made since the last look): a tick before it has
    /// nothing to expire.
    deadline_floor: Time,
    /// Per chunk: since when peers have refused it without delivering it
    /// (the stall clock of the rescue), and the most holders it has had.
    refused_since: Vec<Option<Time>>,
    avail_max: Vec<u32>,
    /// Peers in the order they were found (for deterministic iteration), with
    /// their state at the same position; `index` finds a peer's position.
    order: Vec<P>,
    peers: Vec<PeerState>,
    index: HashMap<P, usize>,
    /// Per peer position: from when it can be asked for a chunk (its
    /// back-off's end), `Time::MAX` while it cannot (gone, no have-map yet,
    /// at its cap): `fill` reads these few bytes instead of every state.
    gate: Vec<Time>,
    /// Requests in flight to all peers together (the fallback not counted).
    peers_in_flight: usize,
    /// Scratch lists of peer positions for `fill`, kept to save allocations.
    scratch: [Vec<usize>; 3],
    fallback: Option<P>,
    fallback_in_flight: usize,
    fallback_failures: u32,
    fallback_backoff_until: Time,
    started: Option<Time>,
    /// When a peer (not the fallback) last delivered a good chunk.
    last_peer_chunk: Option<Time>,
    /// The caller's word: no peer connected and no dial in flight.
    alone: bool,
    /// When the caller last stopped being alone: the grace restarts there.
    joined: Option<Time>,
    rng: ChaCha8Rng,
    done_sent: bool,
}

impl<P: Clone + Eq + StdHash + Debug> Scheduler<P> {
    /// A scheduler for `chunks` chunks, none held yet, with its random
    /// choices drawn from a generator seeded with `seed`.
    pub fn new(chunks: usize, cfg: SchedulerConfig, seed: u64) -> Self {
        Scheduler {
            cfg,
            n: chunks,
            held: vec![false; chunks],
            held_count: 0,
            missing: Bits::full(chunks),
            unrequested: Bits::full(chunks),
            unrequested_count: chunks,
            avail: vec![0; chunks],
            pending: vec![Vec::new(); chunks],
            deadline_floor: Time::MAX,
            refused_since: vec![None; chunks],
            avail_max: vec![0; chunks],
            order: Vec::new(),
            peers: Vec::new(),
            index: HashMap::new(),
            gate: Vec::new(),
            peers_in_flight: 0,
            scratch: Default::default(),
            fallback: None,
            fallback_in_flight: 0,
            fallback_failures: 0,
            fallback_backoff_until: Duration::ZERO,
            started: None,
            last_peer_chunk: None,
            alone: false,
            joined: None,
            rng: ChaCha8Rng::seed_from_u64(seed),
            done_sent: false,
        }
    }

    /// Sets a fallback source (the HTTP seed) that holds every chunk and is
    /// asked only for chunks no usable peer holds.
    pub fn with_fallback(mut self, fallback: P) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// Sets or clears the fallback source for what follows.
    pub fn set_fallback(&mut self, fallback: Option<P>) {
        self.fallback = fallback;
    }

    /// Forgets every peer, request, back-off and timer, and the fallback's
    /// state, keeping which chunks are held and the random generator: the
    /// start of a new fetch that resumes from what an earlier one verified.
    /// Answers to requests made before still count (see [`Input`]).
    pub fn reset(&mut self) {
        self.avail.fill(0);
        self.pending.iter_mut().for_each(Vec::clear);
        for i in 0..self.n {
            self.sync_unrequested(i);
        }
        self.deadline_floor = Time::MAX;
        self.refused_since.fill(None);
        self.avail_max.fill(0);
        self.peers.clear();
        self.order.clear();
        self.index.clear();
        self.gate.clear();
        self.peers_in_flight = 0;
        self.fallback_in_flight = 0;
        self.fallback_failures = 0;
        self.fallback_backoff_until = Duration::ZERO;
        self.started = None;
        self.last_peer_chunk = None;
        self.joined = None;
        self.done_sent = false;
    }

    /// Tells the scheduler whether its caller is alone: no peer connected and
    /// no dial in flight (or every dial failed). While alone, the fallback is
    /// used at once: there is nobody to give a grace period to (the top-level
    /// DESIGN.md, decision 11). When that ends at `now` (a dial or a
    /// connection), the grace period starts again from `now`, so the new peer
    /// has time to report its have-map. The scheduler cannot tell on its own:
    /// it hears of a peer only once connected, and of its chunks only once
    /// its have-map arrives, but a dial in flight is a peer on its way.
    pub fn set_alone(&mut self, alone: bool, now: Time) {
        if self.alone && !alone {
            self.joined = Some(now);
        }
        self.alone = alone;
    }

    /// Whether the caller said it is alone (see [`Scheduler::set_alone`]).
    pub fn is_alone(&self) -> bool {
        self.alone
    }

    /// When the fallback's grace period started, if it applies at all.
    fn grace_from(&self) -> Option<Time> {
        if self.alone {
            return None;
        }
        let s = self.last_peer_chunk.or(self.started)?;
        Some(self.joined.map_or(s, |j| j.max(s)))
    }

    /// Marks a chunk held that did not come through [`Input::ChunkOk`]: found
    /// in the local store, or verified and stored by the caller before it
    /// reports the input.
    pub fn mark_held(&mut self, chunk: ChunkIndex) {
        self.set_held(chunk as usize);
    }

    /// Records chunk `i` held (if it is in range and was not).
    fn set_held(&mut self, i: usize) {
        if i < self.n && !self.held[i] {
            self.held[i] = true;
            self.held_count += 1;
            self.missing.put(i, false);
            self.sync_unrequested(i);
        }
    }

    /// Brings chunk `i`'s place in `unrequested` (not held, no request out)
    /// and the count of those up to date after a change to either.
    fn sync_unrequested(&mut self, i: usize) {
        let now = !self.held[i] && self.pending[i].is_empty();
        if self.unrequested.get(i) != now {
            self.unrequested.put(i, now);
            if now {
                self.unrequested_count += 1;
            } else {
                self.unrequested_count -= 1;
            }
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.n
    }

    /// Number of chunks held.
    pub fn held_count(&self) -> usize {
        self.held_count
    }

    /// Whether `chunk` is held.
    pub fn is_held(&self, chunk: ChunkIndex) -> bool {
        self.held.get(chunk as usize).copied().unwrap_or(false)
    }

    /// The have-map of this node (what it can serve).
    pub fn held(&self) -> &[bool] {
        &self.held
    }

    /// Whether `chunk` is not held yet but on its way: a request for it is
    /// out to a peer other than `asker` (the HTTP fallback counts). A node
    /// can promise such a chunk to `asker` before the bytes arrive; one it
    /// asked `asker` for is not promised back to it.
    pub fn is_coming(&self, chunk: ChunkIndex, asker: &P) -> bool {
        let i = chunk as usize;
        !self.is_held(chunk)
            && self
                .pending
                .get(i)
                .is_some_and(|reqs| reqs.iter().any(|(p, _)| p != asker))
    }

    /// Whether every chunk is held.
    pub fn is_done(&self) -> bool {
        self.held_count == self.n
    }

    /// Whether `peer` announced `chunk` (its have-map or a `Have`) and has
    /// not refused it since.
    pub fn peer_has(&self, peer: &P, chunk: ChunkIndex) -> bool {
        let i = chunk as usize;
        i < self.n && self.peer(peer).is_some_and(|st| st.have.get(i))
    }

    /// How many peers (not gone) announce `chunk`.
    pub fn holders(&self, chunk: ChunkIndex) -> usize {
        self.avail.get(chunk as usize).map_or(0, |&a| a as usize)
    }

    /// Whether `peer` is known: found, and not forgotten since (a ban, a
    /// reset).
    pub fn knows(&self, peer: &P) -> bool {
        self.index.contains_key(peer)
    }

    /// The state of a known peer.
    fn peer(&self, peer: &P) -> Option<&PeerState> {
        self.index.get(peer).map(|&k| &self.peers[k])
    }

    /// The state of a known peer, to change.
    fn peer_mut(&mut self, peer: &P) -> Option<&mut PeerState> {
        self.index.get(peer).map(|&k| &mut self.peers[k])
    }

    /// Requests in flight to `peer`.
    pub fn in_flight(&self, peer: &P) -> usize {
        if self.fallback.as_ref() == Some(peer) {
            return self.fallback_in_flight;
        }
        self.peer(peer).map_or(0, |p| p.in_flight)
    }

    /// The earliest time after `now` at which a [`Input::Tick`] could change
    /// anything (a request deadline, a back-off's end, a have-map refresh,
    /// the end of the fallback's grace period), if any.
    pub fn next_wakeup(&self, now: Time) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut min = |x: Time| {
            if x > now {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for reqs in &self.pending {
            for (_, d) in reqs {
                min(*d);
            }
        }
        for p in self.peers.iter().filter(|p| p.usable()) {
            min(p.backoff_until);
            if let Some(at) = p.last_map_ask
                && p.have_count < self.n
            {
                min(at + self.cfg.have_refresh);
            }
        }
        if self.fallback.is_some() && self.started.is_some() {
            if let Some(s) = self.grace_from() {
                min(s + self.cfg.fallback_grace);
            }
            min(self.fallback_backoff_until);
            for i in self.missing.ones() {
                if let Some(r) = self.refused_since[i] {
                    min(r + self.cfg.stall_grace);
                }
            }
        }
        t
    }

    /// Feeds one input at time `now`; returns what to do.
    pub fn handle(&mut self, input: Input<P>, now: Time) -> Vec<Action<P>> {
        self.started.get_or_insert(now);
        let mut out = Vec::new();
        match input {
            Input::PeerFound(p) => self.found(p, now, &mut out),
            Input::ProvidersFound(ps) => {
                for p in ps {
                    self.found(p, now, &mut out);
                }
            }
            Input::HaveMap { peer, have } => self.have_map(peer, have),
            Input::MapWithChunk { peer, have } => {
                if let Some(&k) = self.index.get(&peer) {
                    self.peers[k].last_map_ask = Some(now);
                }
                self.have_map(peer, have);
            }
            Input::Have { peer, chunk } => {
                let i = chunk as usize;
                if i < self.n
                    && let Some(&k) = self.index.get(&peer)
                    && !self.peers[k].have.get(i)
                {
                    let st = &mut self.peers[k];
                    st.have.put(i, true);
                    st.have_count += 1;
                    st.has_map = true;
                    if st.usable() {
                        self.avail[i] += 1;
                        self.claimed(i);
                    }
                    self.regate(k);
                }
            }
            Input::ChunkOk { peer, chunk } => {
                let is_fallback = self.fallback.as_ref() == Some(&peer);
                let sent = self.sent_at(&peer, chunk);
                self.finish(&peer, chunk);
                // Only a prompt answer is progress: a peer that trickles
                // chunks must not keep the rescue away. A pipelined request
                // waits behind the ones before it, so its clock starts at the
                // peer's previous answer when that came later.
                let last = self
                    .peer_mut(&peer)
                    .and_then(|st| st.last_answer.replace(now));
                let prompt = sent.is_some_and(|t| {
                    let from = last.map_or(t, |l| l.max(t));
                    now.saturating_sub(from) <= self.cfg.slow_answer
                });
                if !is_fallback {
                    if prompt {
                        self.last_peer_chunk = Some(now);
                    } else {
                        self.strike(&peer, now, true);
                    }
                }
                if self.fallback.as_ref() == Some(&peer) {
                    self.fallback_failures = 0;
                }
                let i = chunk as usize;
                self.set_held(i);
                if let Some(&k) = self.index.get(&peer) {
                    let st = &mut self.peers[k];
                    st.failures = 0;
                    if prompt {
                        st.strikes = 0;
                    }
                    if i < self.n && !st.have.get(i) {
                        st.have.put(i, true);
                        st.have_count += 1;
                        if st.usable() {
                            self.avail[i] += 1;
                        }
                    }
                }
            }
            Input::ChunkBad { peer, chunk } => {
                self.finish(&peer, chunk);
                self.ban(peer, &mut out);
            }
            Input::ChunkFailed { peer, chunk } => {
                if self.finish(&peer, chunk) {
                    self.refused(chunk, now);
                    self.failed(&peer, now);
                }
            }
            Input::DoNotHave { peer, chunk } => {
                if self.finish(&peer, chunk) {
                    self.refused(chunk, now);
                }
                let i = chunk as usize;
                if let Some(&k) = self.index.get(&peer)
                    && i < self.n
                    && self.peers[k].have.get(i)
                {
                    let st = &mut self.peers[k];
                    st.have.put(i, false);
                    st.have_count -= 1;
                    if st.usable() {
                        self.avail[i] -= 1;
                    }
                    // It claimed the chunk: a streak of these backs it off.
                    self.strike(&peer, now, false);
                }
            }
            Input::Busy { peer, chunk } => {
                if self.finish(&peer, chunk) {
                    self.refused(chunk, now);
                }
                self.strike(&peer, now, true);
            }
            Input::Unchoke(p) => {
                if let Some(&k) = self.index.get(&p) {
                    let st = &mut self.peers[k];
                    st.backoff_until = st.backoff_until.min(now);
                    self.regate(k);
                }
            }
            Input::PeerGone(p) => self.gone(&p),
            Input::Tick => self.tick(now, &mut out),
        }
        self.fill(now, &mut out);
        if self.is_done() && !self.done_sent {
            self.done_sent = true;
            out.push(Action::Done);
        }
        out
    }

    /// The position of peer `p`, added (last in the order) if it is new.
    fn peer_entry(&mut self, p: P) -> usize {
        if let Some(&k) = self.index.get(&p) {
            return k;
        }
        let k = self.peers.len();
        self.order.push(p.clone());
        self.peers.push(PeerState::new(self.n));
        self.gate.push(Time::MAX);
        self.index.insert(p, k);
        k
    }

    fn found(&mut self, p: P, now: Time, out: &mut Vec<Action<P>>) {
        if self.fallback.as_ref() == Some(&p) {
            return;
        }
        let k = self.peer_entry(p.clone());
        let st = &mut self.peers[k];
        if st.gone {
            // Seen again: give it a fresh start but keep what we knew.
            st.gone = false;
            st.failures = 0;
            let have = st.have.clone();
            for i in have.ones() {
                self.avail[i] += 1;
                self.claimed(i);
            }
            self.regate(k);
        }
        let st = &mut self.peers[k];
        if !st.has_map && st.last_map_ask.is_none() {
            st.last_map_ask = Some(now);
            out.push(Action::AskHaveMap(p));
        }
    }

    fn have_map(&mut self, peer: P, have: Vec<bool>) {
        let Some(&k) = self.index.get(&peer) else {
            return;
        };
        let have = Bits::from_flags(&have, self.n);
        let st = &mut self.peers[k];
        let usable = st.usable();
        st.have_count = have.count();
        st.has_map = true;
        let old = std::mem::replace(&mut st.have, have);
        self.regate(k);
        if usable {
            let new = &self.peers[k].have;
            for (w, (&was, &is)) in old.words.iter().zip(new.words.iter()).enumerate() {
                for i in ones_of(w, was ^ is) {
                    if is & (1 << (i % 64)) != 0 {
                        self.avail[i] += 1;
                        if self.avail[i] > self.avail_max[i] {
                            self.avail_max[i] = self.avail[i];
                            self.refused_since[i] = None;
                        }
                    } else {
                        self.avail[i] -= 1;
                    }
                }
            }
        }
    }

    /// When the outstanding request (peer, chunk) was sent, if there is one.
    fn sent_at(&self, peer: &P, chunk: ChunkIndex) -> Option<Time> {
        let reqs = self.pending.get(chunk as usize)?;
        let (_, deadline) = reqs.iter().find(|(p, _)| p == peer)?;
        Some(deadline.saturating_sub(self.cfg.request_timeout))
    }

    /// A peer refused chunk `chunk` (or its request failed): start its stall
    /// clock unless it is running.
    fn refused(&mut self, chunk: ChunkIndex, now: Time) {
        if let Some(r) = self.refused_since.get_mut(chunk as usize) {
            r.get_or_insert(now);
        }
    }

    /// Chunk `i` gained a holder: a holder it never had before (the chunk is
    /// spreading) restarts its stall clock; a peer re-claiming it does not.
    fn claimed(&mut self, i: usize) {
        if self.avail[i] > self.avail_max[i] {
            self.avail_max[i] = self.avail[i];
            self.refused_since[i] = None;
        }
    }

    /// One more busy, do-not-have or slow answer in a row from `peer`; a busy
    /// or slow one (`back_off`) backs the peer off, doubling per strike.
    fn strike(&mut self, peer: &P, now: Time, back_off: bool) {
        let (base, max) = (self.cfg.busy_backoff, self.cfg.max_busy_backoff);
        if let Some(&k) = self.index.get(peer) {
            let st = &mut self.peers[k];
            st.strikes = st.strikes.saturating_add(1);
            if back_off {
                let shift = st.strikes.saturating_sub(1).min(16);
                let d = (base * (1u32 << shift)).min(max.max(base));
                st.backoff_until = st.backoff_until.max(now + d);
                self.regate(k);
            }
        }
    }

    /// Removes the outstanding request (peer, chunk); true if there was one.
    fn finish(&mut self, peer: &P, chunk: ChunkIndex) -> bool {
        let i = chunk as usize;
        let Some(reqs) = self.pending.get_mut(i) else {
            return false;
        };
        let Some(pos) = reqs.iter().position(|(p, _)| p == peer) else {
            return false;
        };
        reqs.swap_remove(pos);
        self.sync_unrequested(i);
        if self.fallback.as_ref() == Some(peer) {
            self.fallback_in_flight = self.fallback_in_flight.saturating_sub(1);
        } else if let Some(&k) = self.index.get(peer) {
            let st = &mut self.peers[k];
            if st.in_flight > 0 {
                st.in_flight -= 1;
                self.peers_in_flight -= 1;
                self.regate(k);
            }
        }
        true
    }

    fn failed(&mut self, peer: &P, now: Time) {
        let (max_f, base, max_b) = (
            self.cfg.max_failures,
            self.cfg.fail_backoff,
            self.cfg.max_backoff,
        );
        if self.fallback.as_ref() == Some(peer) {
            // Never dropped (it is the last resort), but backed off.
            self.fallback_failures += 1;
            let shift = self.fallback_failures.saturating_sub(1).min(16);
            self.fallback_backoff_until = now + (base * (1u32 << shift)).min(max_b);
            return;
        }
        let mut drop = false;
        if let Some(&k) = self.index.get(peer) {
            let st = &mut self.peers[k];
            st.failures += 1;
            let shift = st.failures.saturating_sub(1).min(16);
            st.backoff_until = now + (base * (1u32 << shift)).min(max_b);
            drop = st.failures >= max_f;
            self.regate(k);
        }
        if drop {
            self.gone(peer);
        }
    }

    fn unuse(&mut self, peer: &P) {
        if let Some(&k) = self.index.get(peer)
            && self.peers[k].usable()
        {
            for i in self.peers[k].have.ones() {
                self.avail[i] -= 1;
            }
        }
    }

    fn gone(&mut self, peer: &P) {
        self.unuse(peer);
        self.cancel_all(peer);
        if let Some(&k) = self.index.get(peer) {
            self.peers[k].gone = true;
            self.regate(k);
        }
    }

    /// Drops every outstanding request to `peer`.
    fn forget_requests(&mut self, peer: &P) {
        for i in 0..self.n {
            let reqs = &mut self.pending[i];
            let before = reqs.len();
            reqs.retain(|(p, _)| p != peer);
            if reqs.len() != before {
                self.sync_unrequested(i);
            }
        }
    }

    fn cancel_all(&mut self, peer: &P) {
        self.forget_requests(peer);
        if let Some(&k) = self.index.get(peer) {
            let st = &mut self.peers[k];
            self.peers_in_flight -= st.in_flight;
            st.in_flight = 0;
            self.regate(k);
        }
    }

    fn ban(&mut self, peer: P, out: &mut Vec<Action<P>>) {
        if self.fallback.as_ref() == Some(&peer) {
            // The fallback lied: stop using it as well.
            self.fallback = None;
            self.forget_requests(&peer);
            out.push(Action::Ban(peer));
            return;
        }
        // Its requests become unrequested and go to others in `fill`.
        self.unuse(&peer);
        self.cancel_all(&peer);
        if let Some(k) = self.index.remove(&peer) {
            self.order.remove(k);
            self.peers.remove(k);
            self.gate.remove(k);
            for (j, p) in self.order.iter().enumerate().skip(k) {
                self.index.insert(p.clone(), j);
            }
        }
        out.push(Action::Ban(peer));
    }

    fn tick(&mut self, now: Time, out: &mut Vec<Action<P>>) {
        // Requests live far shorter than their timeout, so most ticks come
        // before the earliest deadline and have nothing to look at.
        if now >= self.deadline_floor {
            let mut expired = Vec::new();
            for (i, reqs) in self.pending.iter().enumerate() {
                for (p, d) in reqs {
                    if *d <= now {
                        expired.push((p.clone(), i as ChunkIndex));
                    }
                }
            }
            for (p, c) in expired {
                if self.finish(&p, c) {
                    self.refused(c, now);
                    self.failed(&p, now);
                }
            }
            self.deadline_floor = self
                .pending
                .iter()
                .flatten()
                .map(|(_, d)| *d)
                .min()
                .unwrap_or(Time::MAX);
        }
        for (p, st) in self.order.iter().zip(self.peers.iter_mut()) {
            if !st.usable() || st.have_count == self.n {
                continue;
            }
            let due = st
                .last_map_ask
                .is_none_or(|at| at + self.cfg.have_refresh <= now);
            if due {
                st.last_map_ask = Some(now);
                out.push(Action::AskHaveMap(p.clone()));
            }
        }
    }

    /// Whether the peer at position `k` can be asked for a chunk now: usable,
    /// its have-map known, not backed off, under its cap.
    fn can_ask(&self, k: usize, now: Time) -> bool {
        self.gate[k] <= now
    }

    /// Brings the peer at position `k`'s entry in `gate` up to date after a
    /// change to what [`Scheduler::can_ask`] looks at.
    fn regate(&mut self, k: usize) {
        let st = &self.peers[k];
        self.gate[k] = if st.usable() && st.has_map && st.in_flight < self.cfg.per_peer_in_flight {
            st.backoff_until
        } else {
            Time::MAX
        };
    }

    /// Picks the rarest chunk the peer at position `k` holds that is missing
    /// and has fewer than `max_req` requests out (not one of them to it),
    /// random among equals.
    fn pick(&mut self, k: usize, max_req: usize) -> Option<usize> {
        let (st, peer) = (&self.peers[k], &self.order[k]);
        // With one request per chunk at most, only the unrequested qualify.
        let wanted = if max_req <= 1 {
            &self.unrequested
        } else {
            &self.missing
        };
        let mut best: Option<(usize, (usize, u32))> = None;
        let mut ties = 0u32;
        for (w, (&h, &m)) in st.have.words.iter().zip(wanted.words.iter()).enumerate() {
            for i in ones_of(w, h & m) {
                let reqs = &self.pending[i];
                if reqs.len() >= max_req || reqs.iter().any(|(p, _)| p == peer) {
                    continue;
                }
                // Fewest outstanding requests first, then rarest.
                let key = (reqs.len(), self.avail[i]);
                match best {
                    Some((_, b)) if key > b => {}
                    Some((_, b)) if key == b => {
                        ties += 1;
                        if self.rng.gen_range(0..ties) == 0 {
                            best = Some((i, key));
                        }
                    }
                    _ => {
                        best = Some((i, key));
                        ties = 1;
                    }
                }
            }
        }
        best.map(|(i, _)| i)
    }

    fn request(&mut self, peer: P, i: usize, now: Time, out: &mut Vec<Action<P>>) {
        let deadline = now + self.cfg.request_timeout;
        self.pending[i].push((peer.clone(), deadline));
        self.sync_unrequested(i);
        self.deadline_floor = self.deadline_floor.min(deadline);
        if self.fallback.as_ref() == Some(&peer) {
            self.fallback_in_flight += 1;
        } else if let Some(&k) = self.index.get(&peer) {
            self.peers[k].in_flight += 1;
            self.peers_in_flight += 1;
            self.regate(k);
        }
        out.push(Action::Request {
            peer,
            chunk: i as ChunkIndex,
        });
    }

    fn fill(&mut self, now: Time, out: &mut Vec<Action<P>>) {
        if self.is_done() {
            return;
        }
        let mut total = self.peers_in_flight;
        // Nothing can be asked (no chunk without a request and no end-game,
        // or the cap reached): neither round below would run, so the peer
        // order is not drawn (most calls in a big storm; it saves the draws).
        if total >= self.cfg.max_in_flight
            || (self.unrequested_count == 0 && self.cfg.endgame_duplicates <= 1)
        {
            self.fill_fallback(now, out);
            return;
        }
        let [mut order, mut active, mut next] = std::mem::take(&mut self.scratch);
        // Visit peers in a random order each round so no peer is always first.
        order.clear();
        order.extend((0..self.gate.len()).filter(|&k| self.can_ask(k, now)));
        for k in (1..order.len()).rev() {
            let j = self.rng.gen_range(0..=k);
            order.swap(k, j);
        }
        // Round-robin one request per peer at a time, so the rarest chunks
        // spread over peers instead of the first peer taking its whole cap.
        for max_req in [1, self.cfg.endgame_duplicates.max(1)] {
            if max_req > 1 && self.unrequested_count > 0 {
                break; // end-game only when every missing chunk is in flight
            }
            // Nothing to pick (no chunk without a request, or the cap
            // reached): every peer would drop out of the round at once.
            if (max_req <= 1 && self.unrequested_count == 0) || total >= self.cfg.max_in_flight {
                continue;
            }
            active.clear();
            active.extend_from_slice(&order);
            while !active.is_empty() {
                next.clear();
                for &k in &active {
                    let ok = total < self.cfg.max_in_flight && self.can_ask(k, now);
                    if !ok {
                        continue;
                    }
                    if let Some(i) = self.pick(k, max_req) {
                        self.request(self.order[k].clone(), i, now, out);
                        total += 1;
                        next.push(k);
                    }
                }
                std::mem::swap(&mut active, &mut next);
            }
        }
        self.scratch = [order, active, next];
        self.fill_fallback(now, out);
    }

    fn fill_fallback(&mut self, now: Time, out: &mut Vec<Action<P>>) {
        let Some(fb) = self.fallback.clone() else {
            return;
        };
        // The fallback is a rescue, not a source: while no peer has
        // delivered anything promptly for the grace period (at the start, or
        // when the swarm stalls), it takes any chunk with no request out,
        // whatever peers claim; otherwise only chunks peers have refused for
        // the stall grace. Used more freely, a super-seeding seed (which
        // offers few chunks at a time) would be bypassed over HTTP. Alone, there
        // is nobody to wait for.
        if now < self.fallback_backoff_until {
            return;
        }
        let stalled =
            self.alone || now >= self.grace_from().unwrap_or(now) + self.cfg.fallback_grace;
        // Only chunks not held with no request out qualify, in index order.
        let mut w = 0;
        while self.fallback_in_flight < self.cfg.fallback_in_flight
            && w < self.unrequested.words.len()
        {
            let mut word = self.unrequested.words[w];
            while word != 0 && self.fallback_in_flight < self.cfg.fallback_in_flight {
                let i = w * 64 + word.trailing_zeros() as usize;
                word &= word - 1;
                let refused =
                    self.refused_since[i].is_some_and(|t| now >= t + self.cfg.stall_grace);
                if stalled || refused {
                    self.request(fb.clone(), i, now, out);
                }
            }
            w += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const T0: Time = Duration::ZERO;

    fn ms(n: u64) -> Time {
        Duration::from_millis(n)
    }

    fn reqs(actions: &[Action<&'static str>]) -> Vec<(&'static str, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Request { peer, chunk } => Some((*peer, *chunk)),
                _ => None,
            })
            .collect()
    }

    /// The tunables these tests were written against (4 in flight, 500 ms
    /// refresh), independent of the production defaults.
    fn test_cfg() -> SchedulerConfig {
        SchedulerConfig {
            per_peer_in_flight: 4,
            have_refresh: Duration::from_millis(500),
            ..SchedulerConfig::default()
        }
    }

    fn sched(n: usize) -> Scheduler<&'static str> {
        Scheduler::new(n, test_cfg(), 1)
    }

    fn add(
        s: &mut Scheduler<&'static str>,
        p: &'static str,
        have: Vec<bool>,
    ) -> Vec<Action<&'static str>> {
        let a = s.handle(Input::PeerFound(p), T0);
        assert!(a.contains(&Action::AskHaveMap(p)));
        s.handle(Input::HaveMap { peer: p, have }, T0)
    }

    #[test]
    fn asks_for_have_map_once_then_requests() {
        let mut s = sched(3);
        let a = s.handle(Input::PeerFound("a"), T0);
        assert_eq!(a, vec![Action::AskHaveMap("a")]);
        assert!(s.handle(Input::PeerFound("a"), T0).is_empty());
        let a = s.handle(
            Input::HaveMap {
                peer: "a",
                have: vec![true; 3],
            },
            T0,
        );
        assert_eq!(reqs(&a).len(), 3);
    }

    #[test]
    fn per_peer_cap_is_respected() {
        let mut s = Scheduler::new(20, test_cfg().with_per_peer_in_flight(3), 1);
        let a = add(&mut s, "a", vec![true; 20]);
        assert_eq!(reqs(&a).len(), 3);
        assert_eq!(s.in_flight(&"a"), 3);
        let (_, c) = reqs(&a)[0];
        let a = s.handle(
            Input::ChunkOk {
                peer: "a",
                chunk: c,
            },
            T0,
        );
        assert_eq!(reqs(&a).len(), 1, "one slot freed, one new request");
        assert_eq!(s.in_flight(&"a"), 3);
    }

    #[test]
    fn total_in_flight_cap_is_respected() {
        let cfg = SchedulerConfig {
            max_in_flight: 3,
            ..test_cfg()
        };
        let mut s: Scheduler<&'static str> = Scheduler::new(10, cfg, 1);
        let t = ms(0);
        let mut asked = Vec::new();
        for p in ["a", "b", "c", "d", "e"] {
            s.handle(Input::PeerFound(p), t);
            let have = vec![true; 10];
            asked.extend(reqs(&s.handle(Input::HaveMap { peer: p, have }, t)));
        }
        assert_eq!(asked.len(), 3, "{asked:?}");
        let (p, c) = asked[0];
        let more = reqs(&s.handle(Input::ChunkOk { peer: p, chunk: c }, t));
        assert_eq!(more.len(), 1, "one freed, one asked: {more:?}");
    }

    #[test]
    fn rarest_first() {
        let mut s = Scheduler::new(4, test_cfg().with_per_peer_in_flight(1), 5);
        // Chunk 3 is held by one peer only; the others by both.
        add(&mut s, "b", vec![true, true, true, false]);
        // b already has one request out (cap 1); now "a" arrives with all.
        let a = add(&mut s, "a", vec![true, true, true, true]);
        assert_eq!(reqs(&a), vec![("a", 3)]);
    }

    #[test]
    fn spreads_distinct_chunks_over_peers() {
        let mut s = sched(8);
        s.handle(Input::PeerFound("a"), T0);
        s.handle(Input::PeerFound("b"), T0);
        let mut all = reqs(&s.handle(
            Input::HaveMap {
                peer: "a",
                have: vec![true; 8],
            },
            T0,
        ));
        all.extend(reqs(&s.handle(
            Input::HaveMap {
                peer: "b",
                have: vec![true; 8],
            },
            T0,
        )));
        assert_eq!(all.len(), 8);
        let mut chunks: Vec<u32> = all.iter().map(|(_, c)| *c).collect();
        chunks.sort();
        chunks.dedup();
        assert_eq!(chunks.len(), 8, "no duplicates before end-game: {all:?}");
    }

    #[test]
    fn random_tie_break_depends_on_seed_and_is_deterministic() {
        let first = |seed| {
            let mut s = Scheduler::new(64, test_cfg().with_per_peer_in_flight(1), seed);
            s.handle(Input::PeerFound("a"), T0);
            reqs(&s.handle(
                Input::HaveMap {
                    peer: "a",
                    have: vec![true; 64],
                },
                T0,
            ))[0]
                .1
        };
        assert_eq!(first(1), first(1));
        let distinct: std::collections::HashSet<u32> = (0..20).map(first).collect();
        assert!(distinct.len() > 5, "{distinct:?}");
    }

    #[test]
    fn bad_chunk_bans_and_rerequests_elsewhere() {
        let mut s = sched(1);
        let a = add(&mut s, "liar", vec![true]);
        assert_eq!(reqs(&a), vec![("liar", 0)]);
        let a = add(&mut s, "honest", vec![true]);
        assert!(reqs(&a).is_empty() || reqs(&a) == vec![("honest", 0)]);
        let a = s.handle(
            Input::ChunkBad {
                peer: "liar",
                chunk: 0,
            },
            T0,
        );
        assert!(a.contains(&Action::Ban("liar")));
        assert!(!s.knows(&"liar"), "a banned peer is forgotten");
        assert_eq!(s.avail[0], 1, "only the honest peer counts as a holder");
        // Honest peer gets (or already has) the request; the liar never again.
        let a2 = s.handle(Input::Tick, ms(1));
        let all: Vec<_> = reqs(&a).into_iter().chain(reqs(&a2)).collect();
        assert!(all.iter().all(|(p, _)| *p == "honest"));
        assert_eq!(s.in_flight(&"honest"), 1);
        // A late answer from the liar does not bring it back.
        let a = s.handle(
            Input::HaveMap {
                peer: "liar",
                have: vec![true],
            },
            ms(2),
        );
        assert!(reqs(&a).is_empty());
        assert!(!s.knows(&"liar"));
        assert_eq!(s.avail[0], 1);
        // Another bad chunk asks for the ban again (the caller's ban set
        // makes that idempotent) and changes nothing else.
        let a = s.handle(
            Input::ChunkBad {
                peer: "liar",
                chunk: 0,
            },
            ms(2),
        );
        assert_eq!(a, vec![Action::Ban("liar")]);
        let a = s.handle(
            Input::ChunkOk {
                peer: "honest",
                chunk: 0,
            },
            ms(3),
        );
        assert!(a.contains(&Action::Done));
    }

    #[test]
    fn unchoke_ends_a_busy_back_off_at_once() {
        let mut s = Scheduler::new(1, test_cfg(), 1);
        add(&mut s, "a", vec![true]);
        let busy = Input::Busy {
            peer: "a",
            chunk: 0,
        };
        assert!(reqs(&s.handle(busy, ms(10))).is_empty(), "backed off");
        assert_eq!(reqs(&s.handle(Input::Unchoke("a"), ms(20))), vec![("a", 0)]);
        // An unchoke from a peer it does not know changes nothing.
        assert!(s.handle(Input::Unchoke("b"), ms(21)).is_empty());
    }

    #[test]
    fn busy_backs_off_then_retries() {
        let mut s = Scheduler::new(1, test_cfg(), 1);
        add(&mut s, "a", vec![true]);
        let a = s.handle(
            Input::Busy {
                peer: "a",
                chunk: 0,
            },
            ms(10),
        );
        assert!(reqs(&a).is_empty(), "backed off");
        assert_eq!(s.next_wakeup(ms(10)), Some(ms(260)));
        assert!(reqs(&s.handle(Input::Tick, ms(100))).is_empty());
        assert_eq!(reqs(&s.handle(Input::Tick, ms(260))), vec![("a", 0)]);
    }

    #[test]
    fn busy_peer_load_moves_to_another() {
        let mut s = Scheduler::new(1, test_cfg().with_endgame_duplicates(1), 1);
        add(&mut s, "seed", vec![true]);
        add(&mut s, "peer", vec![true]);
        let first = s.pending[0][0].0;
        let other = if first == "seed" { "peer" } else { "seed" };
        let a = s.handle(
            Input::Busy {
                peer: first,
                chunk: 0,
            },
            ms(1),
        );
        assert_eq!(reqs(&a), vec![(other, 0)]);
    }

    #[test]
    fn timeout_fails_and_backs_off_exponentially_then_drops() {
        let cfg = SchedulerConfig {
            request_timeout: ms(100),
            fail_backoff: ms(10),
            max_failures: 3,
            endgame_duplicates: 1,
            ..test_cfg()
        };
        let mut s = Scheduler::new(1, cfg, 1);
        add(&mut s, "a", vec![true]);
        let a = s.handle(Input::Tick, ms(100));
        assert!(reqs(&a).is_empty());
        assert_eq!(s.in_flight(&"a"), 0);
        let a = s.handle(Input::Tick, ms(110));
        assert_eq!(reqs(&a), vec![("a", 0)]);
        s.handle(
            Input::ChunkFailed {
                peer: "a",
                chunk: 0,
            },
            ms(120),
        );
        assert!(
            reqs(&s.handle(Input::Tick, ms(135))).is_empty(),
            "20 ms back-off"
        );
        assert_eq!(reqs(&s.handle(Input::Tick, ms(140))), vec![("a", 0)]);
        s.handle(
            Input::ChunkFailed {
                peer: "a",
                chunk: 0,
            },
            ms(150),
        );
        // Third failure in a row: dropped.
        assert!(reqs(&s.handle(Input::Tick, ms(10_000))).is_empty());
        // Found again: usable again.
        let a = s.handle(Input::PeerFound("a"), ms(10_001));
        assert_eq!(reqs(&a), vec![("a", 0)]);
    }

    #[test]
    fn stale_failure_after_timeout_is_ignored() {
        let cfg = SchedulerConfig {
            request_timeout: ms(100),
            ..test_cfg()
        };
        let mut s = Scheduler::new(2, cfg, 1);
        add(&mut s, "a", vec![true, false]);
        s.handle(Input::Tick, ms(100));
        // The late failure report for the expired request does not count twice.
        s.handle(
            Input::ChunkFailed {
                peer: "a",
                chunk: 0,
            },
            ms(101),
        );
        assert_eq!(s.peer(&"a").unwrap().failures, 1);
        // A late success is still welcome.
        s.handle(
            Input::ChunkOk {
                peer: "a",
                chunk: 0,
            },
            ms(102),
        );
        assert!(s.is_held(0));
    }

    #[test]
    fn end_game_duplicates_last_chunks() {
        let mut s = sched(2);
        let a = add(&mut s, "slow", vec![true, true]);
        assert_eq!(reqs(&a).len(), 2);
        let a = add(&mut s, "fast", vec![true, true]);
        let dup = reqs(&a);
        assert_eq!(dup.len(), 2, "both outstanding chunks duplicated: {dup:?}");
        assert!(dup.iter().all(|(p, _)| *p == "fast"));
        s.handle(
            Input::ChunkOk {
                peer: "fast",
                chunk: 0,
            },
            T0,
        );
        let a = s.handle(
            Input::ChunkOk {
                peer: "fast",
                chunk: 1,
            },
            T0,
        );
        assert!(a.contains(&Action::Done));
        // The slow duplicates arriving later are harmless.
        let a = s.handle(
            Input::ChunkOk {
                peer: "slow",
                chunk: 0,
            },
            T0,
        );
        assert!(a.is_empty());
        assert_eq!(s.in_flight(&"slow"), 1);
    }

    #[test]
    fn end_game_respects_duplicate_limit() {
        let mut s = Scheduler::new(1, test_cfg().with_endgame_duplicates(2), 1);
        add(&mut s, "a", vec![true]);
        add(&mut s, "b", vec![true]);
        let a = add(&mut s, "c", vec![true]);
        assert!(reqs(&a).is_empty());
        assert_eq!(s.pending[0].len(), 2);
    }

    #[test]
    fn no_end_game_while_chunks_unrequested() {
        let mut s = Scheduler::new(3, test_cfg().with_per_peer_in_flight(1), 1);
        add(&mut s, "a", vec![true, true, false]);
        // b holds only what a is already fetching... and chunk 1 is free.
        let a = add(&mut s, "b", vec![true, true, false]);
        let r = reqs(&a);
        assert_eq!(r.len(), 1);
        assert_ne!(s.pending[r[0].1 as usize].len(), 2);
    }

    #[test]
    fn do_not_have_updates_map() {
        let mut s = sched(2);
        add(&mut s, "a", vec![true, false]);
        add(&mut s, "b", vec![true, true]);
        let a = s.handle(
            Input::DoNotHave {
                peer: "a",
                chunk: 0,
            },
            T0,
        );
        assert!(reqs(&a).iter().all(|(p, _)| *p == "b"));
        assert!(!s.peer(&"a").unwrap().have.get(0));
        assert_eq!(s.avail[0], 1);
    }

    #[test]
    fn have_updates_enable_requests() {
        let mut s = sched(2);
        add(&mut s, "a", vec![false, false]);
        let a = s.handle(
            Input::Have {
                peer: "a",
                chunk: 1,
            },
            T0,
        );
        assert_eq!(reqs(&a), vec![("a", 1)]);
    }

    #[test]
    fn peer_gone_frees_its_requests() {
        let mut s = Scheduler::new(1, test_cfg().with_endgame_duplicates(1), 1);
        add(&mut s, "a", vec![true]);
        add(&mut s, "b", vec![true]);
        let first = s.pending[0][0].0;
        let other = if first == "a" { "b" } else { "a" };
        let a = s.handle(Input::PeerGone(first), ms(5));
        assert_eq!(reqs(&a), vec![(other, 0)]);
        assert_eq!(s.avail[0], 1);
    }

    #[test]
    fn fallback_only_after_grace_and_only_for_unheld_chunks() {
        let cfg = test_cfg().with_fallback_grace(ms(1000));
        let mut s = Scheduler::new(3, cfg, 1).with_fallback("http");
        let a = add(&mut s, "a", vec![true, false, false]);
        assert_eq!(reqs(&a), vec![("a", 0)]);
        assert!(reqs(&s.handle(Input::Tick, ms(999))).is_empty());
        let a = s.handle(Input::Tick, ms(1000));
        assert_eq!(reqs(&a), vec![("http", 1), ("http", 2)]);
        assert_eq!(s.in_flight(&"http"), 2);
        s.handle(
            Input::ChunkOk {
                peer: "http",
                chunk: 1,
            },
            ms(1001),
        );
        s.handle(
            Input::ChunkOk {
                peer: "http",
                chunk: 2,
            },
            ms(1001),
        );
        let a = s.handle(
            Input::ChunkOk {
                peer: "a",
                chunk: 0,
            },
            ms(1002),
        );
        assert!(a.contains(&Action::Done));
    }

    #[test]
    fn fallback_at_once_while_alone_grace_again_once_a_peer_is_on_its_way() {
        let cfg = test_cfg().with_fallback_grace(ms(1000));
        let mut s = Scheduler::new(8, cfg, 1).with_fallback("http");
        // Nobody connected, nothing dialling: the rescue starts at once.
        s.set_alone(true, T0);
        let a = s.handle(Input::Tick, T0);
        assert_eq!(
            reqs(&a),
            vec![("http", 0), ("http", 1), ("http", 2), ("http", 3)]
        );
        assert_eq!(
            s.next_wakeup(T0),
            Some(test_cfg().request_timeout),
            "no grace timer, only the requests' deadlines"
        );
        // A dial starts at 100 ms: the grace period runs again from there,
        // although no have-map (and no peer) has reached the scheduler yet.
        s.set_alone(false, ms(100));
        let ok = |c| Input::ChunkOk {
            peer: "http",
            chunk: c,
        };
        assert!(reqs(&s.handle(ok(0), ms(110))).is_empty(), "grace");
        assert_eq!(s.next_wakeup(ms(110)), Some(ms(1100)));
        assert!(reqs(&s.handle(Input::Tick, ms(1099))).is_empty());
        assert_eq!(reqs(&s.handle(Input::Tick, ms(1100))), vec![("http", 4)]);
        // Every dial failed: nobody to wait for again.
        s.set_alone(true, ms(1200));
        assert_eq!(reqs(&s.handle(ok(1), ms(1201))), vec![("http", 5)]);
    }

    #[test]
    fn not_alone_keeps_the_grace_even_before_any_peer_is_known() {
        // A dial to the seed's swarm node is in flight: its chunks must come
        // over the swarm, not over HTTP while the connection is being set up.
        let cfg = test_cfg().with_fallback_grace(ms(1000));
        let mut s = Scheduler::new(4, cfg, 1).with_fallback("http");
        s.set_alone(false, T0);
        assert!(reqs(&s.handle(Input::Tick, T0)).is_empty());
        assert!(reqs(&s.handle(Input::Tick, ms(500))).is_empty());
        let a = add(&mut s, "seed", vec![true; 4]);
        assert_eq!(reqs(&a).len(), 4);
        assert!(reqs(&a).iter().all(|(p, _)| *p == "seed"), "{a:?}");
    }

    #[test]
    fn fallback_alone_fetches_everything() {
        let cfg = test_cfg().with_fallback_grace(Duration::ZERO);
        let mut s = Scheduler::new(10, cfg, 1).with_fallback("http");
        let mut out = s.handle(Input::Tick, T0);
        let mut n = 0;
        while !out.contains(&Action::Done) {
            let r = reqs(&out);
            assert!(r.len() <= 4);
            let mut next = Vec::new();
            for (p, c) in r {
                n += 1;
                next.extend(s.handle(Input::ChunkOk { peer: p, chunk: c }, T0));
            }
            out = next;
        }
        assert_eq!(n, 10);
    }

    #[test]
    fn failing_fallback_backs_off() {
        let cfg = SchedulerConfig {
            fail_backoff: ms(100),
            fallback_in_flight: 1,
            ..test_cfg().with_fallback_grace(Duration::ZERO)
        };
        let mut s = Scheduler::new(1, cfg, 1).with_fallback("http");
        assert_eq!(reqs(&s.handle(Input::Tick, T0)), vec![("http", 0)]);
        let a = s.handle(
            Input::ChunkFailed {
                peer: "http",
                chunk: 0,
            },
            ms(1),
        );
        assert!(reqs(&a).is_empty(), "no hot retry loop");
        assert_eq!(s.next_wakeup(ms(1)), Some(ms(101)));
        assert_eq!(reqs(&s.handle(Input::Tick, ms(101))), vec![("http", 0)]);
        s.handle(
            Input::ChunkFailed {
                peer: "http",
                chunk: 0,
            },
            ms(102),
        );
        assert!(reqs(&s.handle(Input::Tick, ms(250))).is_empty(), "doubled");
        assert_eq!(reqs(&s.handle(Input::Tick, ms(302))), vec![("http", 0)]);
        let a = s.handle(
            Input::ChunkOk {
                peer: "http",
                chunk: 0,
            },
            ms(303),
        );
        assert!(a.contains(&Action::Done));
    }

    #[test]
    fn fallback_takes_over_when_only_holder_is_banned() {
        let cfg = test_cfg().with_fallback_grace(ms(1));
        let mut s = Scheduler::new(1, cfg, 1).with_fallback("http");
        add(&mut s, "liar", vec![true]);
        let a = s.handle(
            Input::ChunkBad {
                peer: "liar",
                chunk: 0,
            },
            ms(1),
        );
        assert!(a.contains(&Action::Ban("liar")));
        assert_eq!(reqs(&a), vec![("http", 0)]);
    }

    /// Drives `s` in 10 ms steps until done or `until`: `answer(peer, chunk,
    /// sent, now)` says what a peer replies (`None`: not yet); the fallback
    /// answers at once. Returns the chunks the fallback gave, and the end time.
    fn drive(
        s: &mut Scheduler<&'static str>,
        first: Vec<Action<&'static str>>,
        until: Time,
        mut answer: impl FnMut(&'static str, u32, Time, Time) -> Option<Input<&'static str>>,
    ) -> (Vec<u32>, Time) {
        let mut waiting: Vec<(&'static str, u32, Time)> = Vec::new();
        let mut http = Vec::new();
        let mut t = T0;
        let mut todo = first;
        loop {
            while let Some(a) = todo.pop() {
                if let Action::Request { peer, chunk } = a {
                    if peer == "http" {
                        http.push(chunk);
                        todo.extend(s.handle(Input::ChunkOk { peer, chunk }, t));
                    } else {
                        waiting.push((peer, chunk, t));
                    }
                }
            }
            let mut k = 0;
            while k < waiting.len() {
                let (p, c, at) = waiting[k];
                if let Some(input) = answer(p, c, at, t) {
                    waiting.remove(k);
                    todo.extend(s.handle(input, t));
                } else {
                    k += 1;
                }
            }
            if !todo.is_empty() {
                continue;
            }
            if s.is_done() || t >= until {
                return (http, t);
            }
            t += ms(10);
            todo.extend(s.handle(Input::Tick, t));
        }
    }

    /// Every peer claims every chunk and answers busy: after the grace the
    /// rescue takes claimed chunks, and busy answers in a row back off more.
    #[test]
    fn busy_forever_claimers_do_not_hold_off_the_rescue() {
        let cfg = test_cfg()
            .with_per_peer_in_flight(1)
            .with_fallback_grace(ms(2000));
        let mut s = Scheduler::new(4, cfg, 1).with_fallback("http");
        let mut first = add(&mut s, "a", vec![true; 4]);
        first.extend(add(&mut s, "b", vec![true; 4]));
        let mut asked_a = Vec::new();
        let (http, t) = drive(&mut s, first, ms(10_000), |peer, chunk, sent, _| {
            if peer == "a" {
                asked_a.push(sent);
            }
            Some(Input::Busy { peer, chunk })
        });
        assert!(s.is_done(), "done by {t:?}");
        assert_eq!(http.len(), 4, "the rescue took every chunk: {http:?}");
        assert!(t <= ms(2100), "right after the grace: {t:?}");
        // 250, 500, 1000 (capped) ms apart: 4 asks in 2 s, not 8.
        assert!(asked_a.len() <= 4, "busy streak backs off: {asked_a:?}");
        let gaps: Vec<_> = asked_a.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
    }

    /// A peer that answers each request 1.9 s late keeps delivering, but slow
    /// answers are not progress: the rescue starts after the grace.
    #[test]
    fn slow_trickle_is_not_progress() {
        let cfg = test_cfg()
            .with_per_peer_in_flight(1)
            .with_fallback_grace(ms(2000));
        let mut s = Scheduler::new(8, cfg, 1).with_fallback("http");
        let first = add(&mut s, "t", vec![true; 8]);
        let (http, t) = drive(&mut s, first, ms(20_000), |peer, chunk, sent, now| {
            (now >= sent + ms(1900)).then_some(Input::ChunkOk { peer, chunk })
        });
        assert!(s.is_done(), "done by {t:?}");
        assert!(http.len() >= 5, "the rescue took most chunks: {http:?}");
        // The trickle alone would need 8 x 1.9 s.
        assert!(t < ms(4000), "finished soon after the grace: {t:?}");
    }

    /// A peer with 8 requests pipelined that answers them one after another,
    /// a chunk every 0.5 s, is delivering: requests late in its queue wait
    /// longer than `slow_answer` from when they were sent, yet the rescue
    /// stays away and the peer serves every chunk.
    #[test]
    fn a_pipelined_peer_answering_steadily_is_progress() {
        let cfg = test_cfg()
            .with_per_peer_in_flight(8)
            .with_fallback_grace(ms(2000))
            .with_slow_answer(ms(1500));
        let mut s = Scheduler::new(16, cfg, 1).with_fallback("http");
        let first = add(&mut s, "t", vec![true; 16]);
        let mut next: Option<Time> = None;
        let (http, t) = drive(&mut s, first, ms(20_000), |peer, chunk, _, now| {
            // One answer per 0.5 s, in request order.
            if next.is_none_or(|n| now >= n) {
                next = Some(now + ms(500));
                Some(Input::ChunkOk { peer, chunk })
            } else {
                None
            }
        });
        assert!(s.is_done(), "done by {t:?}");
        assert!(
            http.is_empty(),
            "the rescue took chunks from a steady peer: {http:?}"
        );
    }

    /// A peer that hands out one chunk promptly every 1.9 s and answers busy
    /// otherwise keeps the swarm "delivering"; chunks it refused go to the
    /// rescue after the stall grace anyway.
    #[test]
    fn refused_chunks_go_to_the_rescue_after_the_stall_grace() {
        let cfg = test_cfg()
            .with_per_peer_in_flight(1)
            .with_fallback_grace(ms(2000))
            .with_stall_grace(ms(3000));
        let mut s = Scheduler::new(16, cfg, 1).with_fallback("http");
        let first = add(&mut s, "t", vec![true; 16]);
        let mut last_gift: Option<Time> = None;
        let (http, t) = drive(&mut s, first, ms(40_000), |peer, chunk, _, now| {
            if last_gift.is_none_or(|g| now >= g + ms(1900)) {
                last_gift = Some(now);
                Some(Input::ChunkOk { peer, chunk })
            } else {
                Some(Input::Busy { peer, chunk })
            }
        });
        assert!(s.is_done(), "done by {t:?}");
        assert!(
            http.len() >= 8,
            "the rescue took the refused chunks: {http:?}"
        );
        // At one chunk per 1.9 s the trickle alone would need 30 s.
        assert!(t < ms(10_000), "{t:?}");
    }

    /// A new holder of a chunk restarts its stall clock (it is spreading);
    /// a peer that drops and re-claims it does not.
    #[test]
    fn stall_clock_restarts_only_for_new_holders() {
        let cfg = test_cfg().with_stall_grace(ms(1000));
        let mut s = Scheduler::new(1, cfg, 1).with_fallback("http");
        add(&mut s, "a", vec![true]);
        s.handle(
            Input::Busy {
                peer: "a",
                chunk: 0,
            },
            ms(10),
        );
        assert_eq!(s.refused_since[0], Some(ms(10)));
        s.handle(
            Input::HaveMap {
                peer: "a",
                have: vec![false],
            },
            ms(20),
        );
        s.handle(
            Input::HaveMap {
                peer: "a",
                have: vec![true],
            },
            ms(30),
        );
        assert_eq!(s.refused_since[0], Some(ms(10)), "re-claim: clock runs on");
        add(&mut s, "b", vec![true]);
        assert_eq!(s.refused_since[0], None, "a new holder restarts it");
    }

    #[test]
    fn a_map_with_a_chunk_counts_as_a_pull() {
        let mut s = sched(3);
        add(&mut s, "a", vec![true, false, false]);
        // At 400 ms a's map comes with a chunk: it now holds chunk 1 too,
        // and the next pull waits 500 ms from then.
        s.handle(
            Input::MapWithChunk {
                peer: "a",
                have: vec![true, true, false],
            },
            ms(400),
        );
        assert!(s.peer_has(&"a", 1));
        assert!(
            !s.handle(Input::Tick, ms(899))
                .contains(&Action::AskHaveMap("a"))
        );
        assert!(
            s.handle(Input::Tick, ms(900))
                .contains(&Action::AskHaveMap("a"))
        );
    }

    #[test]
    fn refreshes_incomplete_have_maps() {
        let mut s = sched(2);
        add(&mut s, "a", vec![true, false]);
        assert!(
            !s.handle(Input::Tick, ms(499))
                .contains(&Action::AskHaveMap("a"))
        );
        assert!(
            s.handle(Input::Tick, ms(500))
                .contains(&Action::AskHaveMap("a"))
        );
        // A complete map is not refreshed.
        add(&mut s, "b", vec![true, true]);
        assert!(
            !s.handle(Input::Tick, ms(5000))
                .contains(&Action::AskHaveMap("b"))
        );
    }

    /// The counts and sets kept as inputs arrive equal a recount from what
    /// they summarise.
    fn assert_bookkeeping<P: Clone + Eq + StdHash + Debug>(s: &Scheduler<P>) {
        let n = s.n;
        assert_eq!(s.held_count, s.held.iter().filter(|h| **h).count());
        let mut unrequested = 0;
        for i in 0..n {
            assert_eq!(s.missing.get(i), !s.held[i], "missing {i}");
            let u = !s.held[i] && s.pending[i].is_empty();
            assert_eq!(s.unrequested.get(i), u, "unrequested {i}");
            unrequested += usize::from(u);
            for (_, d) in &s.pending[i] {
                assert!(*d >= s.deadline_floor, "deadline under the floor");
            }
            let holders = s
                .peers
                .iter()
                .filter(|st| st.usable() && st.have.get(i))
                .count();
            assert_eq!(s.avail[i] as usize, holders, "holders of {i}");
        }
        assert_eq!(s.unrequested_count, unrequested);
        // No stray bits past the last chunk either.
        assert_eq!(s.unrequested.count(), unrequested);
        assert_eq!(s.missing.count(), n - s.held_count);
        assert_eq!(s.order.len(), s.peers.len());
        assert_eq!(s.index.len(), s.peers.len());
        assert_eq!(s.gate.len(), s.peers.len());
        let mut total = 0;
        for (k, (p, st)) in s.order.iter().zip(&s.peers).enumerate() {
            assert_eq!(s.index.get(p), Some(&k), "position of {p:?}");
            let askable = st.usable() && st.has_map && st.in_flight < s.cfg.per_peer_in_flight;
            let gate = if askable { st.backoff_until } else { Time::MAX };
            assert_eq!(s.gate[k], gate, "gate of {p:?}");
            assert_eq!(st.have.len, n);
            assert_eq!(st.have_count, st.have.count(), "have count of {p:?}");
            assert!(st.have.count() <= n);
            let asked = s.pending.iter().flatten().filter(|(q, _)| q == p).count();
            if s.fallback.as_ref() != Some(p) {
                assert_eq!(st.in_flight, asked, "in flight to {p:?}");
            }
            total += st.in_flight;
        }
        assert_eq!(s.peers_in_flight, total);
    }

    #[test]
    fn bits_walk_set_indices_in_order() {
        for n in [0, 1, 63, 64, 65, 130, 206] {
            let full = Bits::full(n);
            assert_eq!(full.count(), n);
            assert_eq!(full.ones().collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
            let flags: Vec<bool> = (0..n + 3).map(|i| i % 3 == 0 || i == 64).collect();
            let b = Bits::from_flags(&flags, n);
            let want: Vec<usize> = (0..n).filter(|&i| flags[i]).collect();
            assert_eq!(b.ones().collect::<Vec<_>>(), want, "n = {n}");
            assert_eq!(b.count(), want.len());
            assert!((0..n + 70).all(|i| b.get(i) == (i < n && flags[i])));
        }
    }

    #[test]
    fn bookkeeping_survives_reset_bans_and_departures() {
        let mut s = sched(70).with_fallback("http");
        let mut have = vec![true; 70];
        have[3] = false;
        add(&mut s, "a", have);
        add(&mut s, "b", vec![true; 90]);
        add(&mut s, "liar", vec![true; 10]);
        assert_bookkeeping(&s);
        assert!(s.pending.iter().any(|r| !r.is_empty()), "requests out");
        s.handle(Input::Tick, ms(1));
        assert_bookkeeping(&s);
        let (c, first) = s
            .pending
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.first().map(|(p, _)| (i as u32, *p)))
            .unwrap();
        s.handle(
            Input::ChunkOk {
                peer: first,
                chunk: c,
            },
            ms(2),
        );
        s.handle(Input::PeerGone("b"), ms(3));
        assert_bookkeeping(&s);
        s.handle(Input::PeerFound("b"), ms(4));
        assert_bookkeeping(&s);
        let liar = s
            .pending
            .iter()
            .flatten()
            .find(|(p, _)| *p == "liar")
            .cloned();
        if let Some((_, d)) = liar {
            let c = s
                .pending
                .iter()
                .position(|r| r.iter().any(|(_, e)| *e == d));
            s.handle(
                Input::ChunkBad {
                    peer: "liar",
                    chunk: c.unwrap() as u32,
                },
                ms(5),
            );
            assert!(!s.knows(&"liar"));
        }
        assert_bookkeeping(&s);
        // Every request times out at once.
        s.handle(Input::Tick, ms(20_000));
        assert_bookkeeping(&s);
        s.reset();
        assert_bookkeeping(&s);
        assert!(s.is_held(c));
        s.mark_held(69);
        assert_bookkeeping(&s);
    }

    #[test]
    fn mark_held_and_empty_manifest() {
        let mut s = sched(2);
        s.mark_held(0);
        s.mark_held(1);
        assert_eq!(s.handle(Input::Tick, T0), vec![Action::Done]);
        assert!(s.handle(Input::Tick, T0).is_empty(), "Done only once");
        let mut e: Scheduler<&str> = sched(0);
        assert_eq!(e.handle(Input::Tick, T0), vec![Action::Done]);
    }

    #[test]
    fn out_of_range_inputs_are_ignored() {
        let mut s = sched(2);
        add(&mut s, "a", vec![true; 7]);
        for inp in [
            Input::Have {
                peer: "a",
                chunk: 99,
            },
            Input::ChunkOk {
                peer: "a",
                chunk: 99,
            },
            Input::ChunkFailed {
                peer: "a",
                chunk: 99,
            },
            Input::DoNotHave {
                peer: "a",
                chunk: 99,
            },
            Input::Busy {
                peer: "zz",
                chunk: 99,
            },
        ] {
            s.handle(inp, T0);
        }
        assert_eq!(s.peer(&"a").unwrap().have.len, 2);
    }

    /// Random runs of a little swarm: every chunk ends up held, caps hold at
    /// every step, liars are banned and never asked again (even when late
    /// answers about them still arrive), and the same seed gives the same run.
    #[test]
    fn random_runs_complete_and_respect_invariants() {
        fn run(seed: u64) -> (Vec<String>, usize) {
            let n = 40;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let peers = ["p0", "p1", "p2", "p3", "liar"];
            let cfg = test_cfg().with_fallback_grace(ms(50));
            let mut s = Scheduler::new(n, cfg.clone(), seed).with_fallback("http");
            let mut log = Vec::new();
            let mut inflight: Vec<(&'static str, u32)> = Vec::new();
            let mut now = T0;
            let mut banned = false;
            for p in peers {
                let have: Vec<bool> = (0..n).map(|_| rng.gen_bool(0.6)).collect();
                s.handle(Input::PeerFound(p), now);
                let a = s.handle(Input::HaveMap { peer: p, have }, now);
                inflight.extend(reqs(&a));
            }
            for step in 0..100_000 {
                if s.is_done() {
                    return (log, step);
                }
                now += ms(rng.gen_range(0..20));
                let a = if banned && rng.gen_bool(0.05) {
                    // Like the node, the harness never reports the banned peer
                    // as found again; answers it had in flight still arrive.
                    let c = rng.gen_range(0..n as u32);
                    let late = match rng.gen_range(0..4) {
                        0 => Input::HaveMap {
                            peer: "liar",
                            have: vec![true; n],
                        },
                        1 => Input::Have {
                            peer: "liar",
                            chunk: c,
                        },
                        2 => Input::Busy {
                            peer: "liar",
                            chunk: c,
                        },
                        _ => Input::ChunkFailed {
                            peer: "liar",
                            chunk: c,
                        },
                    };
                    s.handle(late, now)
                } else if rng.gen_bool(0.04) {
                    // What honest peers also do: announce, retract, leave, come back.
                    let p = peers[rng.gen_range(0..4)];
                    let c = rng.gen_range(0..n as u32);
                    let inp = match rng.gen_range(0..6) {
                        0 => Input::Have { peer: p, chunk: c },
                        1 => Input::DoNotHave { peer: p, chunk: c },
                        2 => Input::PeerGone(p),
                        3 => Input::PeerFound(p),
                        4 => Input::Unchoke(p),
                        _ => Input::HaveMap {
                            peer: p,
                            have: (0..n).map(|_| rng.gen_bool(0.7)).collect(),
                        },
                    };
                    s.handle(inp, now)
                } else if inflight.is_empty() || rng.gen_bool(0.05) {
                    s.handle(Input::Tick, now)
                } else {
                    let k = rng.gen_range(0..inflight.len());
                    let (p, c) = inflight.swap_remove(k);
                    let inp = if p == "liar" {
                        Input::ChunkBad { peer: p, chunk: c }
                    } else {
                        match rng.gen_range(0..10) {
                            0 => Input::Busy { peer: p, chunk: c },
                            1 => Input::ChunkFailed { peer: p, chunk: c },
                            _ => Input::ChunkOk { peer: p, chunk: c },
                        }
                    };
                    s.handle(inp, now)
                };
                for act in &a {
                    log.push(format!("{act:?}"));
                    match act {
                        Action::Request { peer, .. } | Action::AskHaveMap(peer) => {
                            assert!(
                                !(banned && *peer == "liar"),
                                "banned peers are never asked again"
                            );
                        }
                        Action::Ban(p) => {
                            assert_eq!(*p, "liar", "only the liar is banned");
                            assert!(!s.knows(p), "a banned peer is forgotten");
                            banned = true;
                        }
                        Action::Done => {}
                    }
                }
                inflight.extend(reqs(&a));
                for p in peers {
                    assert!(s.in_flight(&p) <= cfg.per_peer_in_flight);
                }
                assert!(s.in_flight(&"http") <= cfg.fallback_in_flight);
                if let Some(w) = s.next_wakeup(now) {
                    assert!(w > now, "wake-ups are in the future");
                }
                for r in &s.pending {
                    assert!(r.len() <= cfg.endgame_duplicates);
                }
                assert_bookkeeping(&s);
            }
            panic!("seed {seed}: not done; held {}/{n}", s.held_count());
        }
        for seed in 0..30 {
            let (a, _) = run(seed);
            let (b, _) = run(seed);
            assert_eq!(a, b, "deterministic for seed {seed}");
            assert!(
                a.iter().any(|l| l.contains("Ban(\"liar\")")),
                "seed {seed}: the liar was asked and banned"
            );
        }
    }
}
