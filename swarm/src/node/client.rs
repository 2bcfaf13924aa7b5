//! The fetching side: the manifests held ([`Held`]), the running fetch and
//! manifest search, the scheduler's actions carried out, and the answers to
//! our requests (chunks verified and stored here).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use libp2p::PeerId;
use phase_content::{Hash, PublicKey, SignedManifest};
use tokio::sync::{oneshot, watch};

use super::dial::root_key;
use super::events;
#[cfg(test)]
use super::span_by_chunks;
use super::v2::{Verdict, check};
use super::{Fallback, FetchProgress, FetchReport, Node, PeerStats, RescueVerdict, Source, Span};
use crate::Error;
use crate::codec::Inbound;
use crate::protocol::{MAX_REQUEST_MAP_BYTES, Request, Response, Root, unpack_bits};
use crate::scheduler::{Action, Input, Scheduler, SchedulerConfig};

/// A manifest this node holds chunks of.
pub(super) struct Held {
    pub(super) manifest: SignedManifest,
    pub(super) hashes: Vec<Hash>,
    pub(super) lens: Vec<u64>,
    /// (name, first chunk, chunk count, size) per artifact.
    pub(super) artifacts: Vec<(String, usize, usize, u64)>,
    /// The one record of which chunks are held (what this node serves), and
    /// the fetch state while this root is being fetched.
    pub(super) sched: Scheduler<Source>,
    /// Verified bytes held per artifact.
    pub(super) done: Vec<u64>,
    pub(super) announced: bool,
    /// What this node has sent of each chunk (super-seeding once complete).
    pub(super) sent: crate::superseed::SendCounts,
    /// We held every chunk before any fetch of it here (seeded, or all in
    /// the store when the fetch began): only then do we super-seed.
    pub(super) seeded: bool,
}

/// The chunk size `SchedulerConfig::fallback_in_flight` and a capped
/// `max_in_flight` are given for.
const FALLBACK_CHUNK: u64 = 256 << 10;

/// The most bytes one rescue request asks for: consecutive chunks up to
/// the size the rescue was measured with (bootspeed: four 256 KiB GETs at
/// a time moved 16 MB in 0.66 s; the same in 64 KiB GETs took 1.3-1.9 s).
const RESCUE_SPAN: u64 = FALLBACK_CHUNK;

/// One rescue span fetched, cut into its chunks and each checked (and
/// stored): `each` is (index, length, already held) per chunk, in order.
fn rescue_span(
    fb: &dyn Fallback,
    store: &dyn phase_content::ChunkStore,
    span: &Span,
    each: &[(u32, u64, bool)],
) -> Vec<RescueVerdict> {
    let data = match fb.get_span(span) {
        Ok(d) => Bytes::from(d),
        Err(e) => return each.iter().map(|&(i, _, _)| (i, Err(e.clone()))).collect(),
    };
    if data.len() as u64 != span.len {
        // Not what was asked: the seed's answer as a whole is bad bytes.
        return each
            .iter()
            .map(|&(i, _, _)| (i, Ok((data.len(), Verdict::Bad))))
            .collect();
    }
    let mut at = 0usize;
    each.iter()
        .zip(&span.hashes)
        .map(|(&(i, len, held), hash)| {
            let n = len as usize;
            let piece = data.slice(at..at + n);
            at += n;
            (i, Ok((n, check(store, hash, piece, held))))
        })
        .collect()
}

impl Held {
    pub(super) fn new(manifest: SignedManifest, mut cfg: SchedulerConfig, rng_seed: u64) -> Self {
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
        // `fallback_in_flight` GETs and a capped `max_in_flight` are sized
        // for 256 KiB chunks (bootspeed's rescue at four of them; v2's cap of
        // 4); smaller chunks get as many more, so the same bytes stay in
        // flight (measured: v2 with 64 KiB chunks and a cap of 4 spent the
        // storm at 0.76-0.82 of the links, 1.76-1.84 x T_min; at 16,
        // 1.55-1.58 x). At most 64 requests either way.
        let largest = lens.iter().copied().max().unwrap_or(FALLBACK_CHUNK).max(1);
        let more = usize::try_from(FALLBACK_CHUNK / largest)
            .unwrap_or(1)
            .max(1);
        cfg.fallback_in_flight = cfg.fallback_in_flight.saturating_mul(more).min(64);
        if cfg.max_in_flight != usize::MAX {
            cfg.max_in_flight = cfg.max_in_flight.saturating_mul(more).min(64);
        }
        Held {
            manifest,
            hashes,
            lens,
            artifacts,
            sched: Scheduler::new(n, cfg, rng_seed),
            done,
            announced: false,
            sent: crate::superseed::SendCounts::new(n),
            seeded: false,
        }
    }

    /// Whether a complete holder offers only its least-sent chunks: it
    /// holds every chunk and held them before fetching here. A node that
    /// completed a fetch in a storm is one holder among many: offering
    /// only the chunks it sent least (it relayed the rest while fetching)
    /// left the last fetchers refused by every complete peer until each
    /// had been idle for `ServingConfig::idle_after` (N = 32: 4 nodes 2 s
    /// after the rest).
    pub(super) fn super_seeds(&self) -> bool {
        self.seeded && self.sched.is_done()
    }

    /// Marks chunk `i` held and counts its bytes, once.
    pub(super) fn mark(&mut self, i: usize) {
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

    pub(super) fn progress(&self, peers: usize) -> FetchProgress {
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
pub(super) struct Fetch {
    pub(super) root: Root,
    pub(super) start: Instant,
    pub(super) stats: BTreeMap<Source, PeerStats>,
    pub(super) bytes: u64,
    /// Peers banned while this fetch ran (the node's set holds them all).
    pub(super) banned: Vec<PeerId>,
    pub(super) fallback: Option<Arc<dyn Fallback>>,
    pub(super) progress: Option<watch::Sender<FetchProgress>>,
    pub(super) reply: oneshot::Sender<Result<FetchReport, Error>>,
    pub(super) last_lookup: Instant,
    /// The wait before the next lookup (`NodeConfig::lookup_interval`,
    /// doubled after each lookup that found nobody new).
    pub(super) lookup_every: std::time::Duration,
    /// A lookup since the last one found a provider we were not connected to.
    pub(super) lookup_found: bool,
}

pub(super) struct Find {
    pub(super) channel: String,
    pub(super) arch: String,
    pub(super) pinned: PublicKey,
    pub(super) deadline: Instant,
    pub(super) asked: HashSet<PeerId>,
    pub(super) outstanding: usize,
    pub(super) best: Option<SignedManifest>,
    pub(super) reply: oneshot::Sender<Result<SignedManifest, Error>>,
}

pub(super) enum Outbound {
    Chunk { root: Root, index: u32 },
    HaveMap { root: Root },
    Latest,
}

impl Node {
    pub(super) fn start_fetch(
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
        if held.sched.is_done() {
            held.seeded = true;
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
            lookup_every: self.cfg.lookup_interval,
            lookup_found: false,
        });
        if need_announce {
            self.announce(root);
        }
        if self.wire.is_some() {
            // Its peers are the sessions about it (opened now if missing).
            self.drive(Input::ProvidersFound(Vec::new()));
            self.v2_fetch_started(root);
            return;
        }
        let peers: Vec<Source> = self.connected.iter().map(|p| Source::Peer(*p)).collect();
        self.drive(Input::ProvidersFound(peers));
    }

    /// Feeds the running fetch's scheduler and carries out its actions.
    pub(super) fn drive(&mut self, mut input: Input<Source>) {
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
            | Input::MapWithChunk { peer: p, .. }
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
        match &input {
            Input::ChunkOk { peer, chunk } => events::log("got", peer, *chunk),
            Input::Busy { peer, chunk } => events::log("busy", peer, *chunk),
            Input::DoNotHave { peer, chunk } => events::log("dnh", peer, *chunk),
            Input::ChunkFailed { peer, chunk } => events::log("fail", peer, *chunk),
            _ => {}
        }
        let actions = h.sched.handle(input, now);
        for a in &actions {
            match a {
                Action::Request { peer, chunk } => events::log("req", peer, *chunk),
                Action::Done => events::log("done", "-", 0),
                _ => {}
            }
        }
        for a in actions {
            match a {
                Action::Request {
                    peer: Source::Peer(p),
                    chunk,
                } if self.wire.is_some() => self.v2_request(p, root, chunk),
                Action::Request {
                    peer: Source::Peer(p),
                    chunk,
                } => {
                    let req = self.chunk_request(p, root, chunk);
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .rr
                        .send_request(&p, Inbound::Ok(req));
                    self.outbound
                        .insert(id, (p, Outbound::Chunk { root, index: chunk }));
                }
                Action::Request {
                    peer: Source::HttpSeed,
                    chunk,
                } => self.rescue.push((root, chunk)),
                // A v2 peer pushes its haves.
                Action::AskHaveMap(Source::Peer(_)) if self.wire.is_some() => {}
                Action::AskHaveMap(Source::Peer(p)) => {
                    events::log("pull", p, 0);
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

    pub(super) fn finish_fetch(&mut self) {
        let Some(f) = self.fetch.take() else {
            return;
        };
        let report = FetchReport {
            wall: f.start.elapsed(),
            bytes: f.bytes,
            sources: f.stats,
            banned: f.banned,
            neighbours_peak: self.nbrs.peak(),
            connections_peak: self.connections_peak,
        };
        self.metrics.fetched(report.wall);
        if let (Some(p), Some(h)) = (&f.progress, self.held.get(&f.root)) {
            let _ = p.send(h.progress(self.connected.len()));
        }
        let _ = f.reply.send(Ok(report));
    }

    /// Sends the chunks asked of the HTTP seed in this turn of the loop:
    /// consecutive ones of one artifact together, up to [`RESCUE_SPAN`] bytes
    /// per request, so the rescue costs the same number of requests whatever
    /// the chunk size. The GET, the length check, the hashes and the store
    /// all run on a blocking thread; the loop only books the verdicts.
    pub(super) fn rescue_flush(&mut self) {
        if self.rescue.is_empty() {
            return;
        }
        let mut asked = std::mem::take(&mut self.rescue);
        asked.sort_unstable();
        asked.dedup();
        let Some(fb) = self.fetch.as_ref().and_then(|f| f.fallback.clone()) else {
            return;
        };
        let mut k = 0;
        while k < asked.len() {
            let (root, first) = asked[k];
            let Some(h) = self.held.get(&root) else {
                k += 1;
                continue;
            };
            let Some(&(ref name, a0, count, _)) = h
                .artifacts
                .iter()
                .find(|(_, a0, n, _)| (*a0..a0 + n).contains(&(first as usize)))
            else {
                k += 1;
                continue;
            };
            let chunk_size = h
                .manifest
                .manifest()
                .artifact(name)
                .map_or(0, |a| u64::from(a.chunk_size));
            // This chunk and the ones right after it in the same artifact.
            let mut chunks = vec![first];
            let mut len = h.lens[first as usize];
            while let Some(&(r, next)) = asked.get(k + chunks.len()) {
                let i = next as usize;
                if r != root
                    || next != first + chunks.len() as u32
                    || i >= a0 + count
                    || len + h.lens[i] > RESCUE_SPAN
                {
                    break;
                }
                chunks.push(next);
                len += h.lens[i];
            }
            k += chunks.len();
            let m = h.manifest.manifest();
            let span = Span {
                channel: m.channel.clone(),
                arch: m.arch.clone(),
                artifact: name.clone(),
                offset: (first as usize - a0) as u64 * chunk_size,
                len,
                hashes: chunks.iter().map(|&c| h.hashes[c as usize]).collect(),
            };
            let each: Vec<(u32, u64, bool)> = chunks
                .iter()
                .map(|&c| (c, h.lens[c as usize], h.sched.is_held(c)))
                .collect();
            let (store, tx, fb) = (self.store.clone(), self.fb_tx.clone(), fb.clone());
            tokio::spawn(async move {
                let verdicts =
                    tokio::task::spawn_blocking(move || rescue_span(&*fb, &*store, &span, &each))
                        .await
                        .unwrap_or_default();
                let _ = tx.send((root, verdicts)).await;
            });
        }
    }

    pub(super) fn on_fallback(&mut self, root: Root, verdicts: Vec<RescueVerdict>) {
        for (index, res) in verdicts {
            match res {
                Ok((len, verdict)) => {
                    self.chunk_checked(Source::HttpSeed, root, index, len, verdict);
                }
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
    }

    /// A chunk arrived from `src` (`None`: the answer was not a chunk at all).
    pub(super) fn on_chunk(&mut self, src: Source, root: Root, index: u32, data: Option<Vec<u8>>) {
        if matches!(src, Source::Peer(p) if self.banned.contains(&p)) {
            // A late answer from a banned peer: its bytes are not wanted.
            return;
        }
        let Some(held) = self.held.get_mut(&root) else {
            return;
        };
        let i = index as usize;
        let data = match data {
            Some(d) if i < held.hashes.len() && d.len() as u64 == held.lens[i] => d,
            _ => return self.chunk_checked(src, root, index, 0, Verdict::Bad),
        };
        // Verify exactly once (`check`, as for v2 pieces and rescue answers):
        // the store checks the hash before it keeps the bytes (as they are);
        // a duplicate (end-game) is still checked, so a liar is caught.
        let len = data.len();
        let verdict = check(
            self.store.as_ref(),
            &held.hashes[i],
            Bytes::from(data),
            held.sched.is_held(index),
        );
        self.chunk_checked(src, root, index, len, verdict);
    }

    pub(super) fn ask_latest(&mut self, find: &mut Find, p: PeerId) {
        if self.banned.contains(&p) || !find.asked.insert(p) {
            return;
        }
        let (channel, arch) = (find.channel.clone(), find.arch.clone());
        let req = match &find.best {
            // What we hold need not come back.
            Some(b) if self.above_peers.contains(&p) => Request::LatestAbove {
                channel,
                arch,
                sequence: b.manifest().sequence,
            },
            _ => Request::Latest { channel, arch },
        };
        let id = self
            .swarm
            .behaviour_mut()
            .rr
            .send_request(&p, Inbound::Ok(req));
        find.outstanding += 1;
        self.outbound.insert(id, (p, Outbound::Latest));
    }

    pub(super) fn find_check(&mut self) {
        let Some(f) = self.find.as_ref() else { return };
        let timed_out = Instant::now() >= f.deadline;
        if (f.best.is_some() && f.outstanding == 0) || timed_out {
            let Some(f) = self.find.take() else { return };
            let what = format!("{}/{}", f.channel, f.arch);
            let _ = f.reply.send(f.best.ok_or(Error::NoManifest { what }));
        }
    }

    /// A request for chunk `index` of `root` to `p`: with our have-map if
    /// `p` reads it ([`NodeConfig::maps_with_chunks`]).
    fn chunk_request(&self, p: PeerId, root: Root, index: u32) -> Request {
        match self.map_to_send(p, &root, MAX_REQUEST_MAP_BYTES) {
            Some((chunks, bits)) => Request::ChunkWithMap {
                root,
                index,
                chunks,
                bits,
            },
            None => Request::Chunk { root, index },
        }
    }

    pub(super) fn on_response(&mut self, peer: PeerId, what: Outbound, resp: Response) {
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
                    Response::ChunksWithMap {
                        mut pieces,
                        chunks,
                        bits,
                    } => {
                        // The chunk is handled as if it came alone; the map
                        // spares the next pull.
                        let data = (pieces.len() == 1 && pieces[0].index == index)
                            .then(|| pieces.remove(0).data);
                        self.on_chunk(src, root, index, data);
                        self.map_with_chunk(peer, root, index, chunks, &bits);
                    }
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

    /// A fallback serving `data` (chunks of 4 KiB), answering a span with
    /// `extra` bytes appended, or failing.
    struct Seed {
        data: Vec<u8>,
        extra: usize,
        fail: bool,
    }

    impl Fallback for Seed {
        fn get(&self, hash: &Hash) -> Result<Vec<u8>, String> {
            self.data
                .chunks(4096)
                .find(|c| Hash::of(c) == *hash)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| "no such chunk".to_owned())
        }
        fn get_span(&self, span: &Span) -> Result<Vec<u8>, String> {
            if self.fail {
                return Err("connection refused".into());
            }
            let at = span.offset as usize;
            let mut v = self.data[at..at + span.len as usize].to_vec();
            v.extend(std::iter::repeat_n(0, self.extra));
            Ok(v)
        }
    }

    #[test]
    fn a_rescue_span_is_cut_into_chunks_each_checked_and_stored() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let hashes = phase_content::chunk_hashes(&data, 4096);
        // Chunks 1 and 2 of the artifact (indices 5 and 6 in the manifest).
        let span = Span {
            channel: "stable".into(),
            arch: "x86_64".into(),
            artifact: "kernel".into(),
            offset: 4096,
            len: 4096 + (10_000 - 8192),
            hashes: hashes[1..].to_vec(),
        };
        let each = [(5, 4096, false), (6, 10_000 - 8192, false)];
        let store = phase_content::MemStore::new();
        let seed = Seed {
            data: data.clone(),
            extra: 0,
            fail: false,
        };
        let v = rescue_span(&seed, &store, &span, &each);
        assert_eq!(v.len(), 2);
        assert!(matches!(v[0], (5, Ok((4096, Verdict::Ok)))), "{v:?}");
        assert!(matches!(v[1], (6, Ok((1808, Verdict::Ok)))), "{v:?}");
        assert_eq!(
            phase_content::ChunkStore::get(&store, &hashes[2])
                .unwrap()
                .unwrap()[..],
            data[8192..]
        );
        // The default span (one get per chunk) gives the same bytes.
        assert_eq!(
            span_by_chunks(&seed, &span).unwrap(),
            seed.get_span(&span).unwrap()
        );

        // An answer longer than asked is bad bytes for every chunk of it.
        let long = Seed { extra: 1, ..seed };
        let v = rescue_span(&long, &store, &span, &each);
        assert!(
            v.iter().all(|(_, r)| matches!(r, Ok((_, Verdict::Bad)))),
            "{v:?}"
        );

        // A failed request fails every chunk (retried, not banned).
        let down = Seed { fail: true, ..long };
        let v = rescue_span(&down, &store, &span, &each);
        assert!(v.iter().all(|(_, r)| r.is_err()), "{v:?}");
    }
}
