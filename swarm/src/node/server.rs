//! The serving side: inbound requests answered, chunk requests as the
//! serving policy ([`crate::serving`]) decides (do-not-have, super-seeding,
//! busy past the upload slots), and the abuse limits (flood, malformed requests, stalled readers, offences per
//! address, foreign DHT records).

use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::kad;
use libp2p::request_response::{self, ResponseChannel};

use super::client::{Held, Outbound};
use super::events;
use super::{Node, NodeConfig, Source};
use crate::codec::Inbound;
use crate::protocol::{
    MAX_PIGGYBACK_MAP_BYTES, Piece, Request, Response, Root, pack_bits, unpack_bits,
};
use crate::scheduler::Input;
use crate::serving::{Answer, Holding, ServingConfig};

/// The serving policy's tunables from the node's (v1: no choking).
pub(super) fn serving_config(cfg: &NodeConfig) -> ServingConfig {
    ServingConfig::default()
        .with_slots(cfg.max_serving)
        .with_per_peer(cfg.per_peer_serving)
        .with_super_seed(cfg.super_seed)
}

/// Requests held for chunks on their way at most at once; more are answered
/// at once.
pub(super) const MAX_PARKED: usize = 64;

/// How long a request waits for a chunk on its way: about two answers of a
/// busy seed (a request to it took 0.33 s in the median of a 16-node storm).
pub(super) const PARK_MAX: Duration = Duration::from_secs(1);

/// A chunk request held until the chunk arrives ([`NodeConfig::promise`]).
pub(super) struct Parked {
    peer: PeerId,
    root: Root,
    index: u32,
    id: request_response::InboundRequestId,
    channel: ResponseChannel<Response>,
    since: Instant,
}

impl Node {
    pub(super) fn block(&mut self, peer: PeerId, why: &str) {
        tracing::warn!(%peer, why, "dropping peer");
        self.blocked
            .insert(peer, Instant::now() + self.cfg.block_time);
        self.ip_offence(peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// A protocol offence: counted under `reason` in `bans_total` and the
    /// peer blocked (which counts against its address too).
    pub(super) fn offence(&mut self, peer: PeerId, reason: &'static str, why: &str) {
        self.metrics.banned(reason);
        self.block(peer, why);
    }

    /// One more answer we refused `peer` (busy, refused, or a request it
    /// should not have made) within the current second. More than
    /// `flood_busy` in one second is a flood: the peer is blocked and this
    /// returns true. v1 and v2 count into the same log.
    pub(super) fn refusal(&mut self, peer: PeerId, why: &str) -> bool {
        let now = Instant::now();
        let e = self.busy_log.entry(peer).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            *e = (now, 0);
        }
        e.1 += 1;
        if e.1 > self.cfg.flood_busy {
            self.offence(peer, "flood", why);
            return true;
        }
        false
    }

    /// Counts an offence of `peer` against its address too: a new identity
    /// costs nothing, a new address does.
    pub(super) fn ip_offence(&mut self, peer: PeerId) {
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

    /// Record filtering: a provider record of one of our keys is kept (up
    /// to the store's bounds); value records are never stored.
    pub(super) fn on_kad_inbound(&mut self, request: kad::InboundRequest) {
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

    pub(super) fn on_rr(&mut self, ev: request_response::Event<Inbound, Response>) {
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
                        self.offence(peer, "malformed", "malformed or oversize request");
                        return;
                    }
                };
                let n = self.serving.entry(peer).or_default();
                *n += 1;
                let n = *n;
                self.inbound.insert(request_id, peer);
                if n > self.cfg.flood_limit {
                    self.offence(peer, "flood", "request flood");
                    return;
                }
                // The asker's map came with its request: it spares our pull.
                let request = match request {
                    Request::ChunkWithMap {
                        root,
                        index,
                        chunks,
                        bits,
                    } => {
                        self.map_with_chunk(peer, root, index, chunks, &bits);
                        Request::Chunk { root, index }
                    }
                    r => r,
                };
                // A chunk on its way to us: the request waits for it.
                if let Request::Chunk { root, index } = &request
                    && self.cfg.promise
                    && n <= self.cfg.per_peer_serving
                    && self.parked.len() < MAX_PARKED
                    && self.held.get(root).is_some_and(|h| {
                        (*index as usize) < h.hashes.len()
                            && h.sched.is_coming(*index, &Source::Peer(peer))
                    })
                {
                    self.parked.push(Parked {
                        peer,
                        root: *root,
                        index: *index,
                        id: request_id,
                        channel,
                        since: Instant::now(),
                    });
                    self.metrics.waiting(self.parked.len());
                    return;
                }
                let resp = self.answer(peer, request, request_id);
                // Busy and refused answers alike: an honest peer backs off
                // after one, and never sends what we refuse. So does any
                // request beyond its share of slots, whatever the answer (it
                // may be a cheap do-not-have): honest peers ask one at a time.
                if (n > self.cfg.per_peer_serving
                    || matches!(resp, Response::Busy | Response::Refused(_)))
                    && self.refusal(peer, "request flood (kept asking while told busy)")
                {
                    return;
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
                    self.offence(peer, "unread", "asked for chunks and did not read them");
                }
            }
            Event::ResponseSent { request_id, .. } => self.inbound_done(request_id),
        }
    }

    pub(super) fn inbound_done(&mut self, id: request_response::InboundRequestId) {
        if let Some(token) = self.uploads.remove(&id) {
            self.policy.on_done(token);
            if !self.parked.is_empty() {
                // A slot freed: a held request for a chunk we hold takes it.
                self.release_parked(None);
            }
        }
        if let Some(peer) = self.inbound.remove(&id)
            && let Some(n) = self.serving.get_mut(&peer)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.serving.remove(&peer);
            }
        }
    }

    /// Answers the held requests for `chunk` of `root` (it arrived), or
    /// with `None` every held request that can be answered now. A request
    /// whose chunk is held is served under the usual policy; one that would
    /// be answered busy keeps waiting for a slot. One held [`PARK_MAX`], or
    /// whose chunk is no longer on its way (our request failed and went
    /// nowhere else), gets its answer as it stands (do-not-have, busy).
    pub(super) fn release_parked(&mut self, chunk: Option<(Root, u32)>) {
        let mut keep = Vec::new();
        for p in std::mem::take(&mut self.parked) {
            if chunk.is_some_and(|c| c != (p.root, p.index)) {
                keep.push(p);
                continue;
            }
            if self.banned.contains(&p.peer) || self.blocked.contains_key(&p.peer) {
                continue; // blocked while it waited: not answered
            }
            let expired = p.since.elapsed() >= PARK_MAX;
            let (held, coming) = self.held.get(&p.root).map_or((false, false), |h| {
                (
                    h.sched.is_held(p.index),
                    h.sched.is_coming(p.index, &Source::Peer(p.peer)),
                )
            });
            if !expired && !held && coming {
                keep.push(p);
                continue;
            }
            let req = Request::Chunk {
                root: p.root,
                index: p.index,
            };
            let resp = self.answer(p.peer, req, p.id);
            if !expired && matches!(resp, Response::Busy) {
                keep.push(p);
                continue;
            }
            self.metrics.held(resp.pieces().is_some());
            self.metrics.answered(&resp);
            self.respond(p.channel, resp);
        }
        keep.append(&mut self.parked);
        self.parked = keep;
        self.metrics.waiting(self.parked.len());
    }

    /// The newest manifest held for `channel`/`arch`, if newer than `above`.
    fn latest(&self, channel: &str, arch: &str, above: Option<u64>) -> Response {
        self.held
            .values()
            .map(|h| &h.manifest)
            .filter(|m| m.manifest().channel == channel && m.manifest().arch == arch)
            .max_by_key(|m| m.manifest().sequence)
            .filter(|m| above.is_none_or(|s| m.manifest().sequence > s))
            .map_or(Response::DoNotHave, |m| {
                Response::Manifest(m.envelope().to_vec())
            })
    }

    pub(super) fn respond(&mut self, ch: ResponseChannel<Response>, r: Response) {
        let _ = self.swarm.behaviour_mut().rr.send_response(ch, r);
    }

    pub(super) fn read_chunk(&self, held: &Held, i: usize) -> Option<Vec<u8>> {
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

    /// Our have-map of `root` as `peer` is told it (a pull's answer, or the
    /// map sent with a chunk): what we hold, what is on its way to us
    /// (promised, not from `peer`), cut to what a super-seeding complete node
    /// offers. `None` if we hold nothing of `root`.
    fn have_map_for(&self, peer: PeerId, root: &Root) -> Option<(u32, Vec<u8>)> {
        let h = self.held.get(root)?;
        let promised: Vec<bool>;
        let have = if self.cfg.promise && !h.sched.is_done() {
            let asker = Source::Peer(peer);
            promised = (0..h.hashes.len() as u32)
                .map(|i| h.sched.is_held(i) || h.sched.is_coming(i, &asker))
                .collect();
            &promised
        } else {
            h.sched.held()
        };
        let bits =
            pack_bits(
                &self
                    .policy
                    .advertise(&peer, have, h.super_seeds(), &h.sent, self.now()),
            );
        Some((h.hashes.len() as u32, bits))
    }

    /// Our have-map of `root` to send `peer` with a chunk or a request: if
    /// it reads them ([`crate::protocol::MAPS_PROTOCOL`]) and the map is at
    /// most `max` bytes.
    pub(super) fn map_to_send(
        &self,
        peer: PeerId,
        root: &Root,
        max: usize,
    ) -> Option<(u32, Vec<u8>)> {
        if !self.maps_peers.contains(&peer) {
            return None;
        }
        self.have_map_for(peer, root)
            .filter(|(_, bits)| bits.len() <= max)
    }

    /// `peer`'s have-map of `root` that came with chunk `index` (its request
    /// or its answer): fed to our fetch of `root` as a pull's answer would
    /// be, if we fetch it and the map fits the manifest.
    pub(super) fn map_with_chunk(
        &mut self,
        peer: PeerId,
        root: Root,
        index: u32,
        chunks: u32,
        bits: &[u8],
    ) {
        if !self.cfg.maps_with_chunks || self.fetch.as_ref().is_none_or(|f| f.root != root) {
            return;
        }
        let n = self.held.get(&root).map(|h| h.hashes.len());
        if n != Some(chunks as usize) {
            return;
        }
        if let Some(have) = unpack_bits(chunks, bits) {
            events::log("map", peer, index);
            self.drive(Input::MapWithChunk {
                peer: Source::Peer(peer),
                have,
            });
        }
    }

    /// The answer to request `id`; a chunk upload's slot is kept in
    /// `uploads` until [`Node::inbound_done`].
    pub(super) fn answer(
        &mut self,
        peer: PeerId,
        req: Request,
        id: request_response::InboundRequestId,
    ) -> Response {
        let refused = |s: &str| Response::Refused(s.to_owned());
        match req {
            Request::HaveMap { root } => match self.have_map_for(peer, &root) {
                Some((chunks, bits)) => Response::HaveMap { chunks, bits },
                None => Response::DoNotHave,
            },
            Request::Manifest { root } => match self.held.get(&root) {
                Some(h) => Response::Manifest(h.manifest.envelope().to_vec()),
                None => Response::DoNotHave,
            },
            Request::Latest { channel, arch } => self.latest(&channel, &arch, None),
            Request::LatestAbove {
                channel,
                arch,
                sequence,
            } => self.latest(&channel, &arch, Some(sequence)),
            Request::Chunk { root, index } => {
                let now = self.now();
                let Some(h) = self.held.get_mut(&root) else {
                    return Response::DoNotHave;
                };
                let i = index as usize;
                if i >= h.hashes.len() {
                    tracing::debug!(%peer, index, "chunk index out of range");
                    return refused("chunk index out of range");
                }
                let holding = Holding {
                    held: h.sched.is_held(index),
                    complete: h.super_seeds(),
                    sent: &mut h.sent,
                };
                let token = match self.policy.on_request(peer, index, holding, now) {
                    Answer::Serve(t) => t,
                    Answer::Busy => return Response::Busy,
                    // Withheld: sent more often than others, let peers serve it.
                    Answer::DoNotHave | Answer::Withheld => return Response::DoNotHave,
                };
                match self.held.get(&root).and_then(|h| self.read_chunk(h, i)) {
                    Some(data) => {
                        events::log("serve", peer, index);
                        self.uploads.insert(id, token);
                        let pieces = vec![Piece { index, data }];
                        match self.map_to_send(peer, &root, MAX_PIGGYBACK_MAP_BYTES) {
                            Some((chunks, bits)) => Response::ChunksWithMap {
                                pieces,
                                chunks,
                                bits,
                            },
                            None => Response::Chunks(pieces),
                        }
                    }
                    None => {
                        self.policy.on_done(token);
                        Response::DoNotHave
                    }
                }
            }
            // (Its map was read on arrival.)
            Request::ChunkWithMap { root, index, .. } => {
                self.answer(peer, Request::Chunk { root, index }, id)
            }
            // Nothing asks for ranges (the scheduler asks chunk by chunk),
            // and one range holds an upload slot eight times as long as a
            // chunk: refused. The variant stays so the wire numbering does.
            Request::Range { .. } => refused("range requests are not served; ask chunk by chunk"),
        }
    }
}
