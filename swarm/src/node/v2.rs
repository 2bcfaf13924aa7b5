//! The node's side of protocol v2 (`/phase/swarm/2`, [`crate::v2`]): one
//! session per connected peer and root, driven from the node's event loop.
//!
//! Everything a session reports reaches the loop through one bounded channel
//! ([`Msg`]), tagged with the peer and root; so do the results of work the
//! loop hands off (piece verification, store reads), so the loop never hashes
//! or reads the store for v2. See the crate's `DESIGN.md`, "Protocol v2",
//! "In the node".

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::{AsyncReadExt, FutureExt, StreamExt};
use libp2p::PeerId;
use phase_content::{ChunkStore, Hash};
use tokio::sync::{Notify, Semaphore, mpsc};

use super::{Node, Source};
use crate::protocol::Root;
use crate::scheduler::Input;
use crate::v2::{CommandError, End, Event, Local, PROTOCOL, Session, SessionConfig, SessionHandle};

/// Which chunk protocol a node fetches with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// `/phase/chunk/1`: a request-response exchange per chunk, have-maps pulled.
    #[default]
    V1,
    /// `/phase/swarm/2`: one session per peer and root, haves pushed,
    /// requests pipelined. The node still answers v1 requests.
    V2,
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" | "1" => Ok(Protocol::V1),
            "v2" | "2" => Ok(Protocol::V2),
            _ => Err(format!("unknown swarm protocol {s:?}; use v1 or v2")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V1 => "v1",
            Protocol::V2 => "v2",
        })
    }
}

/// Capacity of the one channel from sessions and workers to the loop.
const CHANNEL: usize = 256;
/// Incoming streams whose `Hello` is being read at once; more are dropped.
const PEEKING: usize = 64;
/// ...of them from one peer: an honest peer opens one stream per root we
/// both hold, and holds one or two; more wait for nothing but would let one
/// peer take all of [`PEEKING`].
const PEEKING_PER_PEER: usize = 4;
/// Streams one peer may open within a second; more are a flood and block
/// it. An honest peer opens one per root and retries one that ended before
/// its `Hello` after 0.5 s at the soonest (then backing off to 30 s), or one
/// that ended after it on the next 500 ms tick: a few a second per root.
const OPEN_FLOOD: u32 = 32;
/// The head of a `Hello` frame: length (4), tag (1), root (32).
const HELLO_HEAD: usize = 4 + 1 + 32;
/// The `Hello` tag and its smallest body: tag, root, chunks, depth.
const HELLO_TAG: u8 = 1;
const HELLO_MIN: u32 = 1 + 32 + 4 + 2;

type Key = (PeerId, Root);

/// How long after its upload started a super-seeder waits for some peer to
/// announce a chunk before it counts that copy as lost ([`Wire::lost`]).
/// A 256 KiB chunk takes well under a second at 20 Mbit/s shared by the
/// upload slots; the `Have` follows within the batching delay.
const LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a fetcher waits after a peer withdrew a chunk, for some other
/// peer to announce it, before it asks the withdrawing peer again.
const REASK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// What reaches the node's loop.
pub(super) enum Msg {
    /// A session is running (we opened it, or accepted it below).
    Started {
        peer: PeerId,
        root: Root,
        ours: bool,
        session: Box<Session>,
    },
    /// We could not open a stream to the peer.
    OpenFailed { peer: PeerId, root: Root },
    /// A peer opened a stream about `root`; `head` is what was read of its `Hello`.
    Incoming {
        peer: PeerId,
        root: Root,
        head: Bytes,
        stream: libp2p::Stream,
    },
    /// An event of session `id`.
    Session {
        peer: PeerId,
        root: Root,
        id: u64,
        ev: Event,
    },
    /// An upload recorded as sent did not go out (its session was gone).
    Unsent { root: Root, chunk: u32 },
    /// A peer broke the protocol before its session started (the first
    /// frame of its stream was not a `Hello`, or it opened streams in a
    /// flood): blocked, counted under `reason` in `bans_total`.
    Offence {
        peer: PeerId,
        reason: &'static str,
        why: &'static str,
    },
    /// A piece was checked off the loop.
    Checked {
        peer: PeerId,
        root: Root,
        chunk: u32,
        len: usize,
        verdict: Verdict,
    },
}

/// The outcome of checking (and storing) a chunk's bytes.
#[derive(Debug)]
pub(super) enum Verdict {
    /// The bytes hash to the manifest's hash (and are stored).
    Ok,
    /// They do not.
    Bad,
    /// The store failed.
    Store(String),
}

/// A command the session's channel had no room for yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Have(u32),
    DoNotHave(u32),
    Cancel(u32),
    Choke,
    Unchoke,
}

/// One session with one peer about one root.
struct Peer {
    id: u64,
    handle: SessionHandle,
    /// Whether we opened it (dedupe: the opener with the smaller id wins).
    ours: bool,
    /// The peer's `Hello` arrived.
    opened: bool,
    /// What the peer announced (its `Hello`, then its `Have`s).
    have: Vec<bool>,
    /// What we announced to it in this session (our `Hello`, then our
    /// `Have`s): an honest peer asks only for these.
    offered: Vec<bool>,
    /// Chunks it announced and then refused (withdrew), and when.
    withdrawn: HashMap<u32, std::time::Instant>,
    /// Chunks we refused it while super-seeding: asked again (no peer of
    /// its announces them, [`REASK_AFTER`]), they are served. The same rule
    /// as [`crate::serving::ServingConfig::second_ask`], which the simulator's
    /// v2 model uses; this loop has its own queue, slots and `lost` escape
    /// instead of the serving policy, so it keeps its own record.
    refused_it: std::collections::HashSet<u32>,
    /// Our requests the peer has not answered, and when they were made.
    requested: HashMap<u32, std::time::Instant>,
    /// Its requests waiting for an upload slot.
    queue: VecDeque<u32>,
    /// Its upload slots in use.
    serving: Arc<AtomicUsize>,
    /// We choke it.
    choked: bool,
    /// Commands waiting for room in the session's channel.
    out: VecDeque<Cmd>,
}

/// The node's v2 state.
pub(super) struct Wire {
    control: libp2p_stream::Control,
    cfg: SessionConfig,
    tx: mpsc::Sender<Msg>,
    sessions: HashMap<Key, Peer>,
    /// Streams being opened, with the held set their `Hello` carried.
    opening: HashMap<Key, Vec<bool>>,
    next_id: u64,
    /// Upload slots in use over all sessions.
    serving: Arc<AtomicUsize>,
    /// Woken when an upload slot frees.
    pub(super) freed: Arc<Notify>,
    /// Sessions with requests waiting for a slot, in turn.
    waiting: VecDeque<Key>,
    /// Sessions we choke, longest-choked first.
    choked: VecDeque<Key>,
    /// Scheduler inputs produced while driving it (a request that did not
    /// fit), fed after the current input.
    pub(super) later: Vec<Input<Source>>,
    /// Keys whose running session was kept over a newer one the peer
    /// opened: if it ends before its `Hello` (the peer had already dropped
    /// it), we open again.
    redo: std::collections::HashSet<Key>,
    /// Keys whose last session ended before its `Hello` (or could not be
    /// opened): when to try again, and how many times it failed.
    retry: HashMap<Key, (std::time::Instant, u32)>,
    last_refresh: std::time::Instant,
    /// Per root we super-seed: when each chunk's last upload started.
    sent_at: HashMap<Root, Vec<Option<std::time::Instant>>>,
}

impl Wire {
    /// Registers the protocol and starts accepting streams; returns the state
    /// and the receiver of the loop's `select!` arm.
    pub(super) fn new(
        behaviour: &libp2p_stream::Behaviour,
        cfg: SessionConfig,
    ) -> Result<(Wire, mpsc::Receiver<Msg>), crate::Error> {
        let mut control = behaviour.new_control();
        let mut incoming = control
            .accept(PROTOCOL)
            .map_err(|e| crate::Error::Transport(format!("{PROTOCOL}: {e}")))?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let accept_tx = tx.clone();
        let hello_timeout = cfg.hello_timeout;
        tokio::spawn(async move {
            let peeking = Arc::new(Semaphore::new(PEEKING));
            let mut opens = Opens::default();
            while let Some((peer, stream)) = incoming.next().await {
                match opens.open(peer, std::time::Instant::now()) {
                    Open::Ok => {}
                    Open::Flood => {
                        tracing::debug!(%peer, "v2 streams opened in a flood");
                        let _ = accept_tx.try_send(Msg::Offence {
                            peer,
                            reason: "flood",
                            why: "opened v2 streams in a flood",
                        });
                        continue;
                    }
                    Open::Over => continue,
                }
                let Some(mine) = opens.peeking(peer) else {
                    tracing::debug!(%peer, "too many v2 streams opening at once from one peer: dropped");
                    continue;
                };
                let Ok(permit) = peeking.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "too many v2 streams opening at once: dropped");
                    continue;
                };
                let tx = accept_tx.clone();
                tokio::spawn(async move {
                    let _permit = (permit, mine);
                    match tokio::time::timeout(hello_timeout, peek(stream)).await {
                        Ok(Ok((root, head, stream))) => {
                            let _ = tx
                                .send(Msg::Incoming {
                                    peer,
                                    root,
                                    head,
                                    stream,
                                })
                                .await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "v2 stream refused");
                            if e.kind() == std::io::ErrorKind::InvalidData {
                                let _ = tx
                                    .send(Msg::Offence {
                                        peer,
                                        reason: "malformed",
                                        why: "v2 stream that does not start with a hello",
                                    })
                                    .await;
                            }
                        }
                        Err(_) => tracing::debug!(%peer, "v2 stream: no hello in time"),
                    }
                });
            }
        });
        let wire = Wire {
            control,
            cfg,
            tx,
            sessions: HashMap::new(),
            opening: HashMap::new(),
            next_id: 0,
            serving: Arc::new(AtomicUsize::new(0)),
            freed: Arc::new(Notify::new()),
            waiting: VecDeque::new(),
            choked: VecDeque::new(),
            later: Vec::new(),
            redo: std::collections::HashSet::new(),
            retry: HashMap::new(),
            last_refresh: std::time::Instant::now(),
            sent_at: HashMap::new(),
        };
        Ok((wire, rx))
    }

    /// Whether a session with `peer` about `root` is running or being opened.
    fn has(&self, key: &Key) -> bool {
        self.sessions.contains_key(key) || self.opening.contains_key(key)
    }

    /// A session about `key` ended before its `Hello`: try again later,
    /// backing off (the peer may not hold the root yet, or a race of both
    /// sides opening left neither stream).
    fn failed(&mut self, key: Key) {
        let e = self
            .retry
            .entry(key)
            .or_insert((std::time::Instant::now(), 0));
        e.1 = e.1.saturating_add(1);
        let wait = std::time::Duration::from_millis(250) * (1u32 << e.1.min(7));
        e.0 = std::time::Instant::now() + wait.min(std::time::Duration::from_secs(30));
        if self.retry.len() > 4096 {
            // Bounded: forget the oldest decisions first is not worth the
            // bookkeeping; a forgotten key is simply tried again.
            self.retry.clear();
        }
    }

    /// Queues `c` for the session, trying it at once when nothing waits.
    fn command(p: &mut Peer, c: Cmd) {
        if let Cmd::Have(i) = c
            && let Some(o) = p.offered.get_mut(i as usize)
        {
            *o = true;
        }
        if p.out.is_empty() && try_cmd(&p.handle, c) {
            return;
        }
        p.out.push_back(c);
    }

    /// Whether a super-seeder's copy of `chunk` looks lost: no peer in
    /// session announces it, and its last upload started more than
    /// [`LOST_AFTER`] ago (the peer that got it left, or dropped it). Such a
    /// chunk is served even when off offer, so the swarm cannot lose it.
    fn lost(&self, root: Root, chunk: u32) -> bool {
        let i = chunk as usize;
        let recent = self
            .sent_at
            .get(&root)
            .and_then(|v| v.get(i).copied().flatten())
            .is_some_and(|t| t.elapsed() < LOST_AFTER);
        !recent
            && !self
                .sessions
                .iter()
                .any(|((_, r), p)| *r == root && p.have.get(i).copied().unwrap_or(false))
    }

    /// Sends what waited for room; a session that cannot take even its
    /// bounded backlog is closed.
    pub(super) fn flush(&mut self) {
        let mut dead = Vec::new();
        for (k, p) in &mut self.sessions {
            while let Some(c) = p.out.front().copied() {
                if try_cmd(&p.handle, c) {
                    p.out.pop_front();
                } else {
                    break;
                }
            }
            // Each chunk is announced once; answers and cancels are bounded
            // by the depths; choke/unchoke alternate.
            if p.out.len() > p.have.len() + 4 * usize::from(self.cfg.accept_depth) + 64 {
                dead.push(*k);
            }
        }
        for k in dead {
            tracing::debug!(peer = %k.0, "v2 session not taking commands: closed");
            self.sessions.remove(&k);
        }
    }
}

/// The bans reason and the log line for a session that failed with an offence.
fn offence_of(e: &crate::v2::SessionError) -> (&'static str, &'static str) {
    use crate::v2::SessionError as E;
    match e {
        E::AskedWhileChoked { .. } => ("flood", "request flood (kept asking while choked)"),
        E::WriteStalled(_) => ("unread", "asked for chunks and did not read them"),
        _ => ("malformed", "v2 protocol violation"),
    }
}

/// What the accept loop does with a new stream from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Read its `Hello`.
    Ok,
    /// The peer just went over [`OPEN_FLOOD`] in a second: block it.
    Flood,
    /// Still over: drop the stream (the block is on its way).
    Over,
}

/// Per-peer bookkeeping of the accept loop: streams opened in the current
/// second, and streams being peeked at.
#[derive(Default)]
struct Opens {
    rate: HashMap<PeerId, (std::time::Instant, u32)>,
    peeking: Arc<std::sync::Mutex<HashMap<PeerId, usize>>>,
}

/// A stream of one peer being peeked at; frees its place on drop.
struct Peeking {
    peer: PeerId,
    map: Arc<std::sync::Mutex<HashMap<PeerId, usize>>>,
}

impl Drop for Peeking {
    fn drop(&mut self) {
        let mut m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

impl Opens {
    /// One more stream from `peer` at `now`.
    fn open(&mut self, peer: PeerId, now: std::time::Instant) -> Open {
        let second = std::time::Duration::from_secs(1);
        if self.rate.len() > 4096 {
            self.rate
                .retain(|_, (t, _)| now.duration_since(*t) < second);
        }
        let e = self.rate.entry(peer).or_insert((now, 0));
        if now.duration_since(e.0) >= second {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
        match e.1.cmp(&(OPEN_FLOOD + 1)) {
            std::cmp::Ordering::Less => Open::Ok,
            std::cmp::Ordering::Equal => Open::Flood,
            std::cmp::Ordering::Greater => Open::Over,
        }
    }

    /// A place to peek at one more stream of `peer`, if it has fewer than
    /// [`PEEKING_PER_PEER`].
    fn peeking(&self, peer: PeerId) -> Option<Peeking> {
        let mut m = self
            .peeking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(peer).or_insert(0);
        if *n >= PEEKING_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Peeking {
            peer,
            map: self.peeking.clone(),
        })
    }
}

/// The next message, or never when the node runs without v2.
pub(super) async fn recv(rx: &mut Option<mpsc::Receiver<Msg>>) -> Option<Msg> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Tries one command without waiting: `false` when the channel is full.
fn try_cmd(h: &SessionHandle, c: Cmd) -> bool {
    let r = match c {
        Cmd::Have(i) => h.have(i).now_or_never(),
        Cmd::DoNotHave(i) => h.do_not_have(i).now_or_never(),
        Cmd::Cancel(i) => h.cancel(i).now_or_never(),
        Cmd::Choke => h.choke().now_or_never(),
        Cmd::Unchoke => h.unchoke().now_or_never(),
    };
    // A session that has ended takes nothing more; its `Ended` is on the way.
    r.is_some()
}

/// Reads the head of an incoming stream's `Hello`: which root it is about.
async fn peek(mut stream: libp2p::Stream) -> std::io::Result<(Root, Bytes, libp2p::Stream)> {
    let mut head = [0u8; HELLO_HEAD];
    stream.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if head[4] != HELLO_TAG || len < HELLO_MIN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the first frame is not a hello",
        ));
    }
    let mut root = [0u8; 32];
    root.copy_from_slice(&head[5..]);
    Ok((root, Bytes::copy_from_slice(&head), stream))
}

/// A libp2p stream whose first bytes were already read, as tokio I/O: those
/// bytes come first, then at most 64 KiB per read (so a large buffer is not
/// zeroed whole on every poll).
struct Replayed {
    head: Bytes,
    stream: libp2p::Stream,
}

impl tokio::io::AsyncRead for Replayed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let part = self.head.split_to(n);
            buf.put_slice(&part);
            return std::task::Poll::Ready(Ok(()));
        }
        let n = buf.remaining().min(64 << 10);
        let dst = buf.initialize_unfilled_to(n);
        let read = std::task::ready!(futures::AsyncRead::poll_read(
            std::pin::Pin::new(&mut self.stream),
            cx,
            dst
        ))?;
        buf.advance(read);
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Replayed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        futures::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.stream), cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        futures::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.stream), cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        futures::AsyncWrite::poll_close(std::pin::Pin::new(&mut self.stream), cx)
    }
}

/// An upload slot: held by the piece's bytes until the session has written
/// them (or dropped them: cancelled, choked, ended).
struct Slot {
    data: Bytes,
    global: Arc<AtomicUsize>,
    peer: Arc<AtomicUsize>,
    freed: Arc<Notify>,
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        tracing::trace!("v2 upload slot freed");
        self.global.fetch_sub(1, Ordering::AcqRel);
        self.peer.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_one();
    }
}

/// Checks (and, when not held yet, stores) a chunk on a blocking thread: a
/// v2 piece or an HTTP rescue answer. The store keeps `data` without a copy.
pub(super) fn check(store: &dyn ChunkStore, hash: &Hash, data: Bytes, held: bool) -> Verdict {
    if held {
        if Hash::of(&data) == *hash {
            Verdict::Ok
        } else {
            Verdict::Bad
        }
    } else {
        match store.put_bytes(hash, data) {
            Ok(_) => Verdict::Ok,
            Err(phase_content::Error::ChunkMismatch { .. }) => Verdict::Bad,
            Err(e) => Verdict::Store(e.to_string()),
        }
    }
}

impl Node {
    fn wire(&mut self) -> Option<&mut Wire> {
        self.wire.as_mut()
    }

    /// Opens a session with `peer` about `root` unless one runs or is opening.
    pub(super) fn v2_open(&mut self, peer: PeerId, root: Root) {
        if self.banned.contains(&peer) || self.blocked.contains_key(&peer) {
            return;
        }
        let Some(local) = self.v2_local(&root) else {
            return;
        };
        let Some(cfg) = self.v2_session_cfg(&root) else {
            return;
        };
        let Some(w) = self.wire.as_mut() else { return };
        let key = (peer, root);
        if w.has(&key) {
            return;
        }
        w.opening.insert(key, local.have.clone());
        let (mut control, tx) = (w.control.clone(), w.tx.clone());
        tokio::spawn(async move {
            let opened =
                tokio::time::timeout(cfg.hello_timeout, control.open_stream(peer, PROTOCOL))
                    .await
                    .map_err(|_| "timed out".to_owned())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .and_then(|s| Session::over_libp2p(s, cfg, local).map_err(|e| e.to_string()));
            let msg = match opened {
                Ok(session) => Msg::Started {
                    peer,
                    root,
                    ours: true,
                    session: Box::new(session),
                },
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot open a v2 stream");
                    Msg::OpenFailed { peer, root }
                }
            };
            let _ = tx.send(msg).await;
        });
    }

    /// Opens sessions about `root` with every connected peer.
    pub(super) fn v2_open_all(&mut self, root: Root) {
        if self.wire.is_none() {
            return;
        }
        for p in self.connected.clone() {
            self.v2_open(p, root);
        }
    }

    /// A peer connected: sessions for what we hold. Only the side with the
    /// smaller peer id opens here (the other opens when it starts fetching
    /// or seeding a root); both opening at once is deduplicated.
    pub(super) fn v2_connected(&mut self, peer: PeerId) {
        if self.wire.is_none() || *self.swarm.local_peer_id() > peer {
            return;
        }
        let roots: Vec<Root> = self.held.keys().copied().collect();
        for r in roots {
            self.v2_open(peer, r);
        }
    }

    /// What our `Hello` about `root` says: the chunks held, or while
    /// super-seeding only those on offer ([`crate::superseed`]).
    fn v2_local(&self, root: &Root) -> Option<Local> {
        let h = self.held.get(root)?;
        let mut have = h.sched.held().to_vec();
        if self.super_seeding(h) {
            for (i, o) in have.iter_mut().enumerate() {
                *o = *o && h.sent.offer(i);
            }
        }
        Some(Local {
            root: *root,
            chunks: h.hashes.len() as u32,
            have,
        })
    }

    /// The session settings for `root`. A super-seeder accepts only as many
    /// pipelined requests per peer as it has upload slots per peer: a deeper
    /// queue would hold the chunks each fetcher asked it for (and refuses
    /// later, once others took them) while other peers could serve them.
    fn v2_session_cfg(&self, root: &Root) -> Option<SessionConfig> {
        let w = self.wire.as_ref()?;
        let mut cfg = w.cfg.clone();
        if self.held.get(root).is_some_and(|h| self.super_seeding(h)) {
            let per_peer = u16::try_from(self.cfg.per_peer_serving).unwrap_or(u16::MAX);
            let depth = cfg.accept_depth.min(per_peer.max(1));
            cfg = cfg.with_accept_depth(depth);
        }
        Some(cfg)
    }

    /// Whether we offer only our least-sent chunks of `h`: a complete node
    /// with super-seeding on.
    fn super_seeding(&self, h: &super::client::Held) -> bool {
        self.cfg.super_seed && h.super_seeds()
    }

    /// Chunks of `root` back on offer: every session about it hears `Have`
    /// again (a session sends it only to a peer we withdrew it from).
    fn v2_announce(&mut self, root: Root, chunks: impl IntoIterator<Item = u32> + Clone) {
        let Some(w) = self.wire.as_mut() else { return };
        for ((_, r), p) in w.sessions.iter_mut() {
            if *r == root {
                for i in chunks.clone() {
                    Wire::command(p, Cmd::Have(i));
                }
            }
        }
    }

    /// Chunk `i` of `root` verified: every session about it hears so.
    pub(super) fn v2_have(&mut self, root: Root, i: u32, from: Source) {
        let Some(w) = self.wire.as_mut() else { return };
        let mut dups = Vec::new();
        for ((peer, r), p) in w.sessions.iter_mut() {
            if *r != root {
                continue;
            }
            Wire::command(p, Cmd::Have(i));
            // An end-game duplicate of a chunk that verified elsewhere.
            if p.requested.remove(&i).is_some() && Source::Peer(*peer) != from {
                Wire::command(p, Cmd::Cancel(i));
                dups.push(*peer);
            }
        }
        for peer in dups {
            // Answered, as far as the scheduler goes: its slot frees without a
            // penalty for the peer.
            self.drive(Input::ChunkOk {
                peer: Source::Peer(peer),
                chunk: i,
            });
        }
    }

    /// The scheduler asks `peer` for `chunk` of `root`.
    pub(super) fn v2_request(&mut self, peer: PeerId, root: Root, chunk: u32) {
        let Some(w) = self.wire.as_mut() else { return };
        let ok = match w.sessions.get_mut(&(peer, root)) {
            Some(p) => match p.handle.request(chunk).now_or_never() {
                Some(Ok(())) => {
                    p.requested.insert(chunk, std::time::Instant::now());
                    true
                }
                Some(Err(CommandError::QueueFull { .. })) | None => false,
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "v2 request not taken");
                    false
                }
            },
            None => false,
        };
        if !ok {
            tracing::debug!(%peer, chunk, "v2 request not taken");
            w.later.push(Input::Busy {
                peer: Source::Peer(peer),
                chunk,
            });
        }
    }

    /// Feeds what came up while driving the scheduler.
    pub(super) fn v2_later(&mut self) {
        for _ in 0..64 {
            let Some(w) = self.wire.as_mut() else { return };
            if w.later.is_empty() {
                return;
            }
            let later = std::mem::take(&mut w.later);
            for i in later {
                self.drive(i);
            }
        }
    }

    /// A fetch of `root` starts: the peers already in session are its peers.
    pub(super) fn v2_fetch_started(&mut self, root: Root) {
        let Some(w) = self.wire.as_mut() else { return };
        let maps: Vec<(PeerId, Vec<bool>)> = w
            .sessions
            .iter()
            .filter(|((_, r), p)| *r == root && p.opened)
            .map(|((peer, _), p)| (*peer, p.have.clone()))
            .collect();
        for (peer, have) in maps {
            self.drive(Input::PeerFound(Source::Peer(peer)));
            self.drive(Input::HaveMap {
                peer: Source::Peer(peer),
                have,
            });
        }
        self.v2_open_all(root);
    }

    /// Every `have_refresh`: a chunk a peer withdrew (a super-seeder offering
    /// others first) at least [`REASK_AFTER`] ago, that we still lack and no
    /// peer in session announces, is offered to the scheduler again from that
    /// peer, which serves it on a second ask: the swarm cannot lose a chunk
    /// to super-seeding, and a chunk our neighbours hold is not asked twice.
    pub(super) fn v2_refresh(&mut self, root: Root) {
        let Some(h) = self.held.get(&root) else {
            return;
        };
        let Some(w) = self.wire.as_mut() else { return };
        let announced = |i: u32| {
            w.sessions
                .iter()
                .any(|((_, r), p)| *r == root && p.have.get(i as usize).copied().unwrap_or(false))
        };
        let mut again = Vec::new();
        for ((peer, r), p) in &w.sessions {
            if *r != root {
                continue;
            }
            for (&c, t) in &p.withdrawn {
                if t.elapsed() >= REASK_AFTER && !h.sched.is_held(c) && !announced(c) {
                    again.push((*peer, c));
                }
            }
        }
        for &(peer, c) in &again {
            if let Some(p) = w.sessions.get_mut(&(peer, root)) {
                p.withdrawn.remove(&c);
                if let Some(x) = p.have.get_mut(c as usize) {
                    *x = true;
                }
            }
        }
        let maps: Vec<(PeerId, u32)> = again;
        for (peer, chunk) in maps {
            self.drive(Input::Have {
                peer: Source::Peer(peer),
                chunk,
            });
        }
    }

    /// After every turn of the loop: inputs that came up while driving the
    /// scheduler, uploads for freed slots, commands that waited for room.
    pub(super) fn v2_after(&mut self) {
        if self.wire.is_none() {
            return;
        }
        self.v2_later();
        self.v2_serve();
        if let Some(w) = self.wire() {
            w.flush();
        }
    }

    /// From the loop's tick.
    pub(super) fn v2_tick(&mut self) {
        let every = self.cfg.scheduler.have_refresh;
        let timeout = self.cfg.scheduler.request_timeout;
        let Some(w) = self.wire.as_mut() else { return };
        // The scheduler has given up on these (same timeout): free their
        // slots in the session too.
        for p in w.sessions.values_mut() {
            let stale: Vec<u32> = p
                .requested
                .iter()
                .filter(|(_, at)| at.elapsed() >= timeout)
                .map(|(c, _)| *c)
                .collect();
            for c in stale {
                p.requested.remove(&c);
                Wire::command(p, Cmd::Cancel(c));
            }
        }
        if w.last_refresh.elapsed() < every {
            return;
        }
        w.last_refresh = std::time::Instant::now();
        if let Some(root) = self.fetch.as_ref().map(|f| f.root) {
            self.v2_refresh(root);
            // Every connected peer gets a session about what we fetch.
            let now = std::time::Instant::now();
            let want: Vec<PeerId> = self.wire.as_ref().map_or_else(Vec::new, |w| {
                self.connected
                    .iter()
                    .filter(|p| {
                        let k = (**p, root);
                        !w.has(&k) && w.retry.get(&k).is_none_or(|(at, _)| *at <= now)
                    })
                    .copied()
                    .collect()
            });
            for p in want {
                self.v2_open(p, root);
            }
        }
    }

    /// One message from the channel.
    pub(super) fn on_v2(&mut self, m: Msg) {
        match m {
            Msg::Started {
                peer,
                root,
                ours,
                session,
            } => {
                let snapshot = self.wire().and_then(|w| w.opening.remove(&(peer, root)));
                let offered = snapshot.clone().unwrap_or_default();
                self.v2_register(peer, root, ours, *session, offered);
                // Chunks verified while the stream was being opened.
                if let (Some(before), Some(h)) = (snapshot, self.held.get(&root)) {
                    let new: Vec<u32> = (0..h.hashes.len() as u32)
                        .filter(|i| h.sched.is_held(*i) && !before[*i as usize])
                        .collect();
                    if let Some(p) = self
                        .wire
                        .as_mut()
                        .and_then(|w| w.sessions.get_mut(&(peer, root)))
                    {
                        for i in new {
                            Wire::command(p, Cmd::Have(i));
                        }
                    }
                }
            }
            Msg::OpenFailed { peer, root } => {
                if let Some(w) = self.wire() {
                    w.opening.remove(&(peer, root));
                    w.failed((peer, root));
                }
            }
            Msg::Incoming {
                peer,
                root,
                head,
                stream,
            } => {
                if self.banned.contains(&peer) || self.blocked.contains_key(&peer) {
                    return;
                }
                let Some(local) = self.v2_local(&root) else {
                    tracing::debug!(%peer, "v2 stream about a root we do not hold: dropped");
                    return;
                };
                let Some(cfg) = self.v2_session_cfg(&root) else {
                    return;
                };
                let offered = local.have.clone();
                match Session::spawn(Replayed { head, stream }, cfg, local) {
                    Ok(s) => self.v2_register(peer, root, false, s, offered),
                    Err(e) => tracing::debug!(%peer, error = %e, "cannot start a v2 session"),
                }
            }
            Msg::Session { peer, root, id, ev } => {
                let current = self
                    .wire
                    .as_ref()
                    .and_then(|w| w.sessions.get(&(peer, root)))
                    .is_some_and(|p| p.id == id);
                if current {
                    self.v2_event(peer, root, ev);
                }
            }
            Msg::Unsent { root, chunk } => {
                let back = self
                    .held
                    .get_mut(&root)
                    .is_some_and(|h| h.sent.unrecord(chunk as usize));
                if back {
                    self.v2_announce(root, [chunk]);
                }
            }
            Msg::Offence { peer, reason, why } => {
                if !self.blocked.contains_key(&peer) && !self.banned.contains(&peer) {
                    self.offence(peer, reason, why);
                }
            }
            Msg::Checked {
                peer,
                root,
                chunk,
                len,
                verdict,
            } => {
                tracing::trace!(%peer, chunk, ok = matches!(verdict, Verdict::Ok), "v2 piece checked");
                self.chunk_checked(Source::Peer(peer), root, chunk, len, verdict)
            }
        }
    }

    /// A session runs: keep it unless one already runs with the peer about
    /// the root whose opener has the smaller peer id (both sides keep the
    /// same one).
    fn v2_register(
        &mut self,
        peer: PeerId,
        root: Root,
        ours: bool,
        s: Session,
        mut offered: Vec<bool>,
    ) {
        let me = *self.swarm.local_peer_id();
        let Some(w) = self.wire.as_mut() else { return };
        let key = (peer, root);
        let opener = |ours: bool| if ours { me } else { peer };
        if let Some(old) = w.sessions.get(&key)
            && opener(old.ours) != opener(ours)
            && opener(old.ours) < opener(ours)
        {
            tracing::debug!(%peer, "duplicate v2 session: keeping the one the smaller id opened");
            if !old.opened {
                w.redo.insert(key);
            }
            drop(s);
            return;
        }
        w.next_id += 1;
        let id = w.next_id;
        tracing::debug!(%peer, ours, id, "v2 session started");
        let chunks = self.held.get(&root).map_or(0, |h| h.hashes.len());
        offered.resize(chunks, false);
        let Session {
            handle, mut events, ..
        } = s;
        let tx = w.tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if tx.send(Msg::Session { peer, root, id, ev }).await.is_err() {
                    return;
                }
            }
        });
        let replaced = w.sessions.insert(
            key,
            Peer {
                id,
                handle,
                ours,
                opened: false,
                have: vec![false; chunks],
                offered,
                withdrawn: HashMap::new(),
                refused_it: std::collections::HashSet::new(),
                requested: HashMap::new(),
                queue: VecDeque::new(),
                serving: Arc::new(AtomicUsize::new(0)),
                choked: false,
                out: VecDeque::new(),
            },
        );
        if replaced.is_some_and(|p| p.opened) && self.fetching(&root) {
            self.drive(Input::PeerGone(Source::Peer(peer)));
        }
    }

    fn fetching(&self, root: &Root) -> bool {
        self.fetch.as_ref().is_some_and(|f| f.root == *root)
    }

    fn v2_event(&mut self, peer: PeerId, root: Root, ev: Event) {
        let fetching = self.fetching(&root);
        let src = Source::Peer(peer);
        let key = (peer, root);
        let Some(w) = self.wire.as_mut() else { return };
        let Some(p) = w.sessions.get_mut(&key) else {
            return;
        };
        // What the scheduler hears, fed once the session's state is updated.
        let mut inputs = Vec::new();
        // The session ended with a protocol violation: (reason, why).
        let mut offence = None;
        match ev {
            Event::Opened { have, depth } => {
                tracing::debug!(%peer, depth, held = have.iter().filter(|h| **h).count(), "v2 hello");
                p.opened = true;
                p.have.clone_from(&have);
                w.redo.remove(&key);
                w.retry.remove(&key);
                inputs.push(Input::PeerFound(src));
                inputs.push(Input::HaveMap { peer: src, have });
            }
            Event::Have(chunks) => {
                for chunk in chunks {
                    if let Some(h) = p.have.get_mut(chunk as usize) {
                        *h = true;
                        p.withdrawn.remove(&chunk);
                        inputs.push(Input::Have { peer: src, chunk });
                    }
                }
            }
            Event::Piece { chunk, data } => {
                // Not wanted any more if cancelled meanwhile.
                if p.requested.remove(&chunk).is_some() {
                    self.v2_piece(peer, root, chunk, data);
                }
            }
            Event::DoNotHave(chunk) => {
                p.requested.remove(&chunk);
                // Withdrawn (a super-seeder offering others first) until the
                // peer announces it again.
                if let Some(h) = p.have.get_mut(chunk as usize)
                    && *h
                {
                    *h = false;
                    p.withdrawn.insert(chunk, std::time::Instant::now());
                }
                inputs.push(Input::DoNotHave { peer: src, chunk });
            }
            Event::Choked { dropped } => {
                for chunk in dropped {
                    p.requested.remove(&chunk);
                    inputs.push(Input::Busy { peer: src, chunk });
                }
                if fetching {
                    self.metrics.busy_received();
                }
            }
            Event::Unchoked => inputs.push(Input::Unchoke(src)),
            Event::Requested(chunk) => self.v2_requested(peer, root, chunk),
            Event::Cancelled(chunk) => {
                let queued = p.queue.contains(&chunk);
                p.queue.retain(|c| *c != chunk);
                if !queued {
                    // Its upload had started: the piece will not go out.
                    let back = self
                        .held
                        .get_mut(&root)
                        .is_some_and(|h| h.sent.unrecord(chunk as usize));
                    if back {
                        self.v2_announce(root, [chunk]);
                    }
                }
            }
            Event::Ended(why) => {
                let opened = p.opened;
                w.sessions.remove(&key);
                w.waiting.retain(|k| *k != key);
                w.choked.retain(|k| *k != key);
                match &why {
                    End::Failed(e) => tracing::debug!(%peer, error = %e, "v2 session failed"),
                    _ => tracing::debug!(%peer, %why, "v2 session ended"),
                }
                if let End::Failed(e) = &why
                    && e.is_offence()
                {
                    offence = Some(offence_of(e));
                }
                if opened {
                    inputs.push(Input::PeerGone(src));
                } else if w.redo.remove(&key) && self.connected.contains(&peer) {
                    self.v2_open(peer, root);
                } else {
                    w.failed(key);
                }
            }
        }
        if fetching {
            for i in inputs {
                self.drive(i);
            }
        }
        if let Some((reason, why)) = offence
            && !self.blocked.contains_key(&peer)
            && !self.banned.contains(&peer)
        {
            self.offence(peer, reason, why);
        }
    }

    /// After a chunk's bytes were checked (and stored when new): the one
    /// path for v1 answers, v2 pieces and the HTTP seed.
    pub(super) fn chunk_checked(
        &mut self,
        src: Source,
        root: Root,
        index: u32,
        len: usize,
        verdict: Verdict,
    ) {
        if matches!(src, Source::Peer(p) if self.banned.contains(&p)) {
            // A late answer from a banned peer: its bytes are not wanted.
            return;
        }
        let fetching = self.fetching(&root);
        let Some(held) = self.held.get_mut(&root) else {
            return;
        };
        match verdict {
            Verdict::Ok => {}
            Verdict::Bad => {
                self.metrics.rejected(&src);
                if fetching {
                    self.drive(Input::ChunkBad {
                        peer: src,
                        chunk: index,
                    });
                }
                return;
            }
            Verdict::Store(e) => {
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
        let new = !held.sched.is_held(index);
        held.mark(index as usize);
        let first = !held.announced;
        let progress = held.progress(self.connected.len());
        if fetching {
            self.metrics.verified(&src, len);
        } else {
            self.metrics.late(&src, len);
        }
        if let Some(f) = self.fetch.as_mut().filter(|f| f.root == root) {
            let st = f.stats.entry(src).or_default();
            st.bytes += len as u64;
            st.chunks += 1;
            f.bytes += len as u64;
            if let Some(p) = &f.progress {
                let _ = p.send(progress);
            }
        }
        if first {
            // Announce as soon as the first verified chunk is held.
            self.announce(root);
        }
        if new {
            self.v2_have(root, index, src);
        }
        if fetching {
            self.drive(Input::ChunkOk {
                peer: src,
                chunk: index,
            });
        }
        if new && !self.parked.is_empty() {
            // Requests that waited for it (`NodeConfig::promise`).
            self.release_parked(Some((root, index)));
        }
    }

    /// A piece arrived: checked (and stored) off the loop.
    fn v2_piece(&mut self, peer: PeerId, root: Root, chunk: u32, data: Bytes) {
        if self.banned.contains(&peer) {
            return;
        }
        let Some(h) = self.held.get(&root) else {
            return;
        };
        let i = chunk as usize;
        let (Some(hash), Some(len)) = (h.hashes.get(i).copied(), h.lens.get(i).copied()) else {
            return;
        };
        if data.len() as u64 != len {
            self.chunk_checked(Source::Peer(peer), root, chunk, data.len(), Verdict::Bad);
            return;
        }
        let held = h.sched.is_held(chunk);
        let store = self.store.clone();
        let Some(tx) = self.wire.as_ref().map(|w| w.tx.clone()) else {
            return;
        };
        // Bounded: a piece answers one of our requests, and those are capped
        // by the sessions' depths.
        tokio::spawn(async move {
            let n = data.len();
            let verdict =
                tokio::task::spawn_blocking(move || check(store.as_ref(), &hash, data, held))
                    .await
                    .unwrap_or_else(|e| Verdict::Store(e.to_string()));
            let _ = tx
                .send(Msg::Checked {
                    peer,
                    root,
                    chunk,
                    len: n,
                    verdict,
                })
                .await;
        });
    }

    /// The peer asks for `chunk` of `root`.
    fn v2_requested(&mut self, peer: PeerId, root: Root, chunk: u32) {
        if self.banned.contains(&peer) || self.blocked.contains_key(&peer) {
            // Its requests still on the way when it was blocked.
            return;
        }
        let key = (peer, root);
        let max = self.cfg.max_serving;
        // Super-seeding offers only the least-sent chunks; the offer is
        // checked again when the upload starts (`v2_serve`), as many peers
        // ask for the same chunks at once. A send that did not go out is
        // taken back (`Msg::Unsent`), so it keeps no chunk off offer.
        let Some(h) = self.held.get(&root) else {
            return;
        };
        let Some(w) = self.wire.as_ref() else { return };
        let held = h.sched.is_held(chunk);
        let off = self.super_seeding(h) && !h.sent.offer(chunk as usize) && !w.lost(root, chunk);
        let Some(w) = self.wire.as_mut() else { return };
        let busy = w.serving.load(Ordering::Acquire) >= max;
        let Some(p) = w.sessions.get_mut(&key) else {
            return;
        };
        // A second ask for a chunk we withheld: the peer found no one else.
        if !held || (off && !p.refused_it.contains(&chunk)) {
            if held {
                p.refused_it.insert(chunk);
            }
            // Refusals count against the peer only for chunks we never
            // announced to it in this session: an honest fetcher asks for
            // what our `Hello` or a `Have` announced (or, withdrawn, asks
            // again after a second), so a super-seeder's refusals of chunks
            // it offered and then withdrew never count; a peer asking for
            // what it was never told we hold is probing or flooding.
            let unasked = !p.offered.get(chunk as usize).copied().unwrap_or(false);
            Wire::command(p, Cmd::DoNotHave(chunk));
            if unasked {
                self.refusal(peer, "request flood (asked for chunks never offered to it)");
            }
            return;
        }
        if busy && !p.choked && p.queue.is_empty() && p.serving.load(Ordering::Acquire) == 0 {
            // Every slot is taken by others: this peer waits choked (it asks
            // elsewhere meanwhile) until one frees.
            p.choked = true;
            tracing::debug!(%peer, "v2: every upload slot taken, choking");
            Wire::command(p, Cmd::Choke);
            w.choked.push_back(key);
            return;
        }
        if p.queue.is_empty() {
            w.waiting.push_back(key);
        }
        p.queue.push_back(chunk);
    }

    /// Starts uploads while slots are free, in turn over the waiting
    /// sessions; then unchokes the longest-choked peer for each free slot.
    pub(super) fn v2_serve(&mut self) {
        let (max, per_peer) = (self.cfg.max_serving, self.cfg.per_peer_serving);
        let super_seed = self.cfg.super_seed;
        let mut starts = Vec::new();
        let mut rose = Vec::new();
        {
            let Some(w) = self.wire.as_mut() else { return };
            let mut skipped = Vec::new();
            let mut used = w.serving.load(Ordering::Acquire);
            while used < max {
                let Some(key) = w.waiting.pop_front() else {
                    break;
                };
                let Some(p) = w.sessions.get_mut(&key) else {
                    continue;
                };
                if p.serving.load(Ordering::Acquire) >= per_peer {
                    skipped.push(key);
                    continue;
                }
                let Some(chunk) = p.queue.pop_front() else {
                    continue;
                };
                let asked_again = p.refused_it.contains(&chunk);
                let Some(h) = self.held.get_mut(&key.1) else {
                    continue;
                };
                let seeding = super_seed && h.super_seeds();
                let withheld = seeding
                    && !asked_again
                    && !h.sent.offer(chunk as usize)
                    && !w.lost(key.1, chunk);
                if !withheld && seeding {
                    let n = h.hashes.len();
                    let at = w.sent_at.entry(key.1).or_insert_with(|| vec![None; n]);
                    if let Some(t) = at.get_mut(chunk as usize) {
                        *t = Some(std::time::Instant::now());
                    }
                }
                let Some(p) = w.sessions.get_mut(&key) else {
                    continue;
                };
                if withheld {
                    // Another peer took this chunk since it asked: it gets
                    // it from that peer (or from us in the next round).
                    p.refused_it.insert(chunk);
                    Wire::command(p, Cmd::DoNotHave(chunk));
                    if !p.queue.is_empty() {
                        w.waiting.push_back(key);
                    }
                    continue;
                }
                if h.sent.record(chunk as usize) && seeding {
                    rose.push(key.1);
                }
                w.serving.fetch_add(1, Ordering::AcqRel);
                p.serving.fetch_add(1, Ordering::AcqRel);
                super::events::log("serve", key.0, chunk);
                used += 1;
                starts.push((key, chunk, p.handle.clone(), p.serving.clone()));
                if !p.queue.is_empty() {
                    w.waiting.push_back(key);
                }
            }
            for k in skipped.into_iter().rev() {
                w.waiting.push_front(k);
            }
            while used < max && w.waiting.is_empty() {
                let Some(key) = w.choked.pop_front() else {
                    break;
                };
                if let Some(p) = w.sessions.get_mut(&key) {
                    p.choked = false;
                    Wire::command(p, Cmd::Unchoke);
                    // One peer per free slot; its requests follow.
                    used += 1;
                }
            }
        }
        for ((_, root), chunk, handle, peer_slot) in starts {
            let Some(h) = self.held.get(&root) else {
                continue;
            };
            let Some(hash) = h.hashes.get(chunk as usize).copied() else {
                continue;
            };
            tracing::trace!(chunk, "v2 upload");
            let Some(w) = self.wire.as_ref() else { return };
            let slot = (w.serving.clone(), peer_slot, w.freed.clone());
            let store = self.store.clone();
            let tx = w.tx.clone();
            tokio::spawn(async move {
                let read = tokio::task::spawn_blocking(move || store.get(&hash)).await;
                let (global, peer, freed) = slot;
                match read {
                    Ok(Ok(Some(data))) => {
                        let data = Bytes::from_owner(Slot {
                            data,
                            global,
                            peer,
                            freed,
                        });
                        if handle.serve(chunk, data).await.is_err() {
                            let _ = tx.send(Msg::Unsent { root, chunk }).await;
                        }
                    }
                    other => {
                        if let Ok(Err(e)) = other {
                            tracing::warn!(error = %e, "cannot read chunk");
                        }
                        drop(Slot {
                            data: Bytes::new(),
                            global,
                            peer,
                            freed,
                        });
                        let _ = tx.send(Msg::Unsent { root, chunk }).await;
                        let _ = handle.do_not_have(chunk).await;
                    }
                }
            });
        }
        rose.dedup();
        for root in rose {
            // The round rose: every chunk is on offer again.
            let offer: Vec<u32> = self.held.get(&root).map_or_else(Vec::new, |h| {
                (0..h.hashes.len() as u32)
                    .filter(|&i| h.sent.offer(i as usize))
                    .collect()
            });
            self.v2_announce(root, offer);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn streams_opened_in_a_flood_block_once_then_drop() {
        let mut o = Opens::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        for _ in 0..OPEN_FLOOD {
            assert_eq!(o.open(a, t), Open::Ok);
        }
        assert_eq!(o.open(a, t), Open::Flood, "reported once...");
        assert_eq!(o.open(a, t), Open::Over, "...then dropped quietly");
        assert_eq!(o.open(b, t), Open::Ok, "another peer is not affected");
        // The next second starts a new count.
        assert_eq!(o.open(a, t + Duration::from_secs(1)), Open::Ok);
    }

    #[test]
    fn an_honest_peers_reopening_is_far_below_the_flood() {
        // One root retried on every 500 ms tick, and 4 roots opened at once
        // on connecting: a few a second.
        let mut o = Opens::default();
        let a = PeerId::random();
        let t = Instant::now();
        for i in 0..60u64 {
            for _ in 0..4 {
                assert_eq!(o.open(a, t + Duration::from_millis(500 * i)), Open::Ok);
            }
        }
    }

    #[test]
    fn one_peer_peeks_at_most_a_few_streams_at_once() {
        let o = Opens::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut held: Vec<Peeking> = (0..PEEKING_PER_PEER)
            .map(|_| o.peeking(a).unwrap())
            .collect();
        assert!(o.peeking(a).is_none());
        assert!(o.peeking(b).is_some());
        held.pop();
        assert!(
            o.peeking(a).is_some(),
            "a place frees when its stream is done"
        );
        drop(held);
        assert!(o.peeking.lock().unwrap().get(&a).is_none(), "no entry left");
    }
}
