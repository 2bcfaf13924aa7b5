//! One `/phase/swarm/2` session: one long-lived stream with one peer about
//! one manifest, run by its own task.
//!
//! [`Session::spawn`] takes any `AsyncRead + AsyncWrite` (a libp2p stream
//! through [`Session::over_libp2p`], or `tokio::io::duplex` in tests) and
//! returns a [`SessionHandle`] (bounded commands in) and a receiver of
//! [`Event`]s (bounded events out). The owner never touches the stream.
//!
//! - Each side sends `Hello` first (root, chunk count, the depth of requests
//!   it accepts, its bitfield). Anything else first, another root or chunk
//!   count, or no `Hello` within [`SessionConfig::hello_timeout`] ends the
//!   session.
//! - [`SessionHandle::have`] marks a newly verified chunk; haves are batched
//!   over [`SessionConfig::have_delay`], at most the frame limit per `Have`.
//! - [`SessionHandle::request`] holds a slot of [`SessionConfig::depth`]
//!   until the answer (`Piece` / `DoNotHave` events) or a cancel; requests go
//!   out without waiting for answers, at most the peer's told depth at once.
//! - Incoming requests are [`Event::Requested`]; the owner answers with
//!   [`SessionHandle::serve`] (the `Bytes` go out uncopied) or
//!   [`SessionHandle::do_not_have`].
//! - While we choke the peer, its requests are dropped, not answered: on
//!   receiving our `Choke` the peer has forgotten them (it cancels the ones
//!   it had sent and reports them in [`Event::Choked`]), so an answer would
//!   only be thrown away.
//! - A peer with more requests outstanding than the depth we told it, a
//!   frame over the limits or an index out of range ends the session with a
//!   typed [`SessionError`] in [`Event::Ended`]; so does a peer that keeps
//!   asking after our `Choke` ([`choked_limit`]) or does not read (a write
//!   not done within [`WRITE_STALL`]). [`SessionError::is_offence`] tells
//!   these from I/O failures; the node blocks the peer for them.
//!
//! ```no_run
//! use phase_swarm::v2::session::{Event, Local, Session, SessionConfig};
//! # async fn demo(io: tokio::io::DuplexStream) -> Result<(), Box<dyn std::error::Error>> {
//! let local = Local { root: [0; 32], chunks: 4, have: vec![true, true, false, false] };
//! let mut s = Session::spawn(io, SessionConfig::default(), local)?;
//! while let Some(ev) = s.events.recv().await {
//!     match ev {
//!         Event::Opened { have, .. } if have[2] => s.handle.request(2).await?,
//!         Event::Piece { chunk, data } => println!("chunk {chunk}: {} bytes", data.len()),
//!         Event::Ended(why) => println!("ended: {why}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use super::frame::{Encoded, Frame, FrameCodec, FrameError, Limits};
use crate::protocol::{Root, pack_bits, unpack_bits};

/// The protocol name of the stream.
pub const PROTOCOL: libp2p::StreamProtocol = libp2p::StreamProtocol::new("/phase/swarm/2");

/// Frames handed to the writer task at most before the session waits for it.
const WRITER_QUEUE: usize = 8;

/// The write buffer: small frames are coalesced, a `Piece`'s data (larger
/// than the buffer) goes straight to the stream.
const WRITE_BUFFER: usize = 64 << 10;

/// How a session behaves; `Default` plus `with_*` builders.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our requests held at most (queued or outstanding): the pipeline depth.
    /// Size it as bandwidth x RTT / chunk size, at least a few.
    pub depth: usize,
    /// Requests we accept outstanding from the peer, told in our `Hello`.
    pub accept_depth: u16,
    /// How long a newly verified chunk waits for others before its `Have` goes out.
    pub have_delay: Duration,
    /// How long the peer has to send its `Hello`.
    pub hello_timeout: Duration,
    /// How long a closing session may spend flushing frames and its last events.
    pub linger: Duration,
    /// Capacity of the command channel.
    pub commands: usize,
    /// Capacity of the event channel (and of the session's own backlog, so it
    /// stops reading the stream while the owner is behind).
    pub events: usize,
    /// Frame limits, ours and (assumed) the peer's.
    pub limits: Limits,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            depth: 8,
            accept_depth: 16,
            have_delay: Duration::from_millis(5),
            hello_timeout: Duration::from_secs(10),
            linger: Duration::from_secs(5),
            commands: 64,
            events: 64,
            limits: Limits::default(),
        }
    }
}

impl SessionConfig {
    /// Sets [`SessionConfig::depth`] (at least 1).
    pub fn with_depth(mut self, depth: usize) -> Self {
        self.depth = depth.max(1);
        self
    }
    /// Sets [`SessionConfig::accept_depth`].
    pub fn with_accept_depth(mut self, depth: u16) -> Self {
        self.accept_depth = depth;
        self
    }
    /// Sets [`SessionConfig::have_delay`].
    pub fn with_have_delay(mut self, d: Duration) -> Self {
        self.have_delay = d;
        self
    }
    /// Sets [`SessionConfig::hello_timeout`].
    pub fn with_hello_timeout(mut self, d: Duration) -> Self {
        self.hello_timeout = d;
        self
    }
    /// Sets [`SessionConfig::limits`].
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// What this side holds when the session opens.
#[derive(Debug, Clone)]
pub struct Local {
    /// The manifest root.
    pub root: Root,
    /// Its number of chunks.
    pub chunks: u32,
    /// Which chunks we hold (`chunks` entries).
    pub have: Vec<bool>,
}

/// What the session reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's `Hello` arrived: its bitfield and the depth it accepts.
    Opened {
        /// Which chunks the peer holds.
        have: Vec<bool>,
        /// Requests it accepts outstanding from us.
        depth: u16,
    },
    /// The peer verified these chunks.
    Have(Vec<u32>),
    /// An answer to one of our requests (unverified: check the hash).
    Piece {
        /// The chunk.
        chunk: u32,
        /// Its bytes.
        data: Bytes,
    },
    /// The peer does not hold (or will not offer) a chunk we asked for.
    DoNotHave(u32),
    /// The peer asks for a chunk: answer with `serve` or `do_not_have`.
    Requested(u32),
    /// The peer no longer wants a chunk it asked for (an answer is dropped).
    Cancelled(u32),
    /// The peer choked us; these requests we had sent are cancelled and their
    /// slots free. Requests not yet sent wait for `Unchoked`.
    Choked {
        /// The requests given up.
        dropped: Vec<u32>,
    },
    /// The peer serves us again.
    Unchoked,
    /// The session is over; the last event.
    Ended(End),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer closed the stream.
    PeerClosed,
    /// The owner closed it or dropped every handle.
    Closed,
    /// The owner dropped the event receiver.
    OwnerGone,
    /// A protocol or I/O failure.
    Failed(Arc<SessionError>),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::PeerClosed => f.write_str("the peer closed the stream"),
            End::Closed => f.write_str("closed by its owner"),
            End::OwnerGone => f.write_str("its owner stopped reading events"),
            End::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

impl PartialEq for SessionError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}
impl Eq for SessionError {}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A frame could not be read: over the limits, malformed, or the stream failed.
    #[error("reading from the peer: {0}")]
    Frame(#[from] FrameError),
    /// Writing to the stream failed.
    #[error("writing to the peer: {0}")]
    Write(std::io::Error),
    /// The peer's first frame was not a `Hello`.
    #[error("the peer sent {0} before hello; it does not speak /phase/swarm/2")]
    NotHelloFirst(&'static str),
    /// A second `Hello`.
    #[error("the peer sent a second hello")]
    SecondHello,
    /// The peer is about another manifest.
    #[error("the peer is about manifest {theirs}, we are about {ours}")]
    RootMismatch {
        /// Our root (hex).
        ours: String,
        /// Theirs (hex).
        theirs: String,
    },
    /// Same root, another chunk count: a broken peer.
    #[error("the peer says the manifest has {theirs} chunks, it has {ours}")]
    ChunkCount {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// No `Hello` in time.
    #[error("no hello from the peer within {0:?}")]
    HelloTimeout(Duration),
    /// A chunk index past the manifest's end.
    #[error("{frame} for chunk {chunk}, but the manifest has {chunks} chunks")]
    ChunkOutOfRange {
        /// The frame's name.
        frame: &'static str,
        /// The index.
        chunk: u32,
        /// The manifest's chunk count.
        chunks: u32,
    },
    /// The peer had more requests outstanding than we told it.
    #[error("the peer has more than {depth} requests outstanding, the depth we told it")]
    TooManyRequests {
        /// The depth told in our `Hello`.
        depth: u16,
    },
    /// [`Local`] is inconsistent (spawn refuses it).
    #[error("local state: {0}")]
    BadLocal(String),
    /// While we choked the peer it kept sending requests, more than an
    /// honest peer can have had on the way when our `Choke` left.
    #[error(
        "the peer sent {count} requests while choked, more than {limit} could have crossed our choke"
    )]
    AskedWhileChoked {
        /// Requests received since our `Choke`.
        count: usize,
        /// [`choked_limit`] of the depth we told.
        limit: usize,
    },
    /// A write to the peer (a frame, or a 64 KiB slice of a piece) did not
    /// finish within [`WRITE_STALL`]: it does not read what it asked for.
    #[error("the peer read nothing for {0:?}")]
    WriteStalled(Duration),
}

impl SessionError {
    /// Whether the peer broke the protocol (an honest peer never causes
    /// this), as opposed to an I/O failure, a closed stream, a timeout an
    /// overloaded honest peer can cause, or our own error. A peer whose
    /// session fails with an offence is blocked by the node.
    pub fn is_offence(&self) -> bool {
        match self {
            SessionError::Frame(e) => !matches!(e, FrameError::Io(_) | FrameError::Truncated(_)),
            SessionError::NotHelloFirst(_)
            | SessionError::SecondHello
            | SessionError::RootMismatch { .. }
            | SessionError::ChunkCount { .. }
            | SessionError::ChunkOutOfRange { .. }
            | SessionError::TooManyRequests { .. }
            | SessionError::AskedWhileChoked { .. }
            | SessionError::WriteStalled(_) => true,
            SessionError::Write(_) | SessionError::HelloTimeout(_) | SessionError::BadLocal(_) => {
                false
            }
        }
    }
}

/// How long one write to the peer (a frame, or a 64 KiB slice of a
/// piece) may take before the session ends with
/// [`SessionError::WriteStalled`]: v1's limit for an unread upload
/// (`codec::WRITE_STALL`, 5 s a 64 KiB slice, so a reader slower than
/// 12.8 KiB/s is dropped by both).
pub const WRITE_STALL: Duration = crate::codec::WRITE_STALL;

/// A piece is written in slices of this size, each within [`WRITE_STALL`]
/// (as v1 writes an answer): a slow but reading peer always progresses.
const WRITE_SLICE: usize = 64 << 10;

/// Requests over the told depth a session answers do-not-have before it
/// ends with [`SessionError::TooManyRequests`].
pub const OVER_DEPTH_SLACK: usize = 16;

/// Requests a peer may send after our `Choke` before it counts as asking
/// while choked. An honest peer stops on receiving it; until then it may
/// have on the way its whole window (at most `depth`, the depth we told), one
/// new request for each answer of ours still on the way to it (answers on
/// the way answer requests it counts outstanding: at most `depth` more), and
/// a few for requests it cancelled meanwhile (end-game duplicates that
/// verified elsewhere within the crossing time): 16 more.
pub fn choked_limit(depth: u16) -> usize {
    2 * usize::from(depth) + 16
}

/// Why a command was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// The session is over (see its `Ended` event).
    #[error("the session has ended")]
    Ended,
    /// Every request slot is taken; wait for an answer or cancel one.
    #[error("{depth} requests already held; wait for an answer or cancel one")]
    QueueFull {
        /// The depth.
        depth: usize,
    },
    /// A chunk index past the manifest's end.
    #[error("chunk {chunk} out of range: the manifest has {chunks} chunks")]
    OutOfRange {
        /// The index.
        chunk: u32,
        /// The count.
        chunks: u32,
    },
    /// A piece over the frame limit.
    #[error("piece of {len} bytes over the {max}-byte limit")]
    PieceTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

enum Command {
    Have(u32),
    Request(u32, OwnedSemaphorePermit),
    Cancel(u32),
    Serve(u32, Bytes),
    DoNotHave(u32),
    Choke,
    Unchoke,
    Close,
}

/// The owner's side of a session; cheap to clone.
#[derive(Clone)]
pub struct SessionHandle {
    tx: mpsc::Sender<Command>,
    slots: Arc<Semaphore>,
    depth: usize,
    chunks: u32,
    max_piece: usize,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("depth", &self.depth)
            .field("free_slots", &self.free_slots())
            .finish()
    }
}

impl SessionHandle {
    async fn send(&self, c: Command) -> Result<(), CommandError> {
        self.tx.send(c).await.map_err(|_| CommandError::Ended)
    }

    fn check(&self, chunk: u32) -> Result<(), CommandError> {
        if chunk < self.chunks {
            Ok(())
        } else {
            Err(CommandError::OutOfRange {
                chunk,
                chunks: self.chunks,
            })
        }
    }

    /// We verified `chunk`: tell the peer (batched).
    pub async fn have(&self, chunk: u32) -> Result<(), CommandError> {
        self.check(chunk)?;
        self.send(Command::Have(chunk)).await
    }

    /// Ask the peer for `chunk`. Takes a slot at once or fails with
    /// [`CommandError::QueueFull`]; never waits for the peer. Asking again for
    /// a chunk already asked for is ignored.
    pub async fn request(&self, chunk: u32) -> Result<(), CommandError> {
        self.check(chunk)?;
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                return Err(CommandError::QueueFull { depth: self.depth });
            }
            Err(TryAcquireError::Closed) => return Err(CommandError::Ended),
        };
        self.send(Command::Request(chunk, permit)).await
    }

    /// Request slots free now.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// Forget our request for `chunk` (sends `Cancel` if it went out).
    pub async fn cancel(&self, chunk: u32) -> Result<(), CommandError> {
        self.send(Command::Cancel(chunk)).await
    }

    /// Answer the peer's request for `chunk` with its bytes (not copied).
    /// Dropped if the peer cancelled meanwhile or we choked it.
    pub async fn serve(&self, chunk: u32, data: Bytes) -> Result<(), CommandError> {
        if data.len() > self.max_piece {
            return Err(CommandError::PieceTooLarge {
                len: data.len(),
                max: self.max_piece,
            });
        }
        self.send(Command::Serve(chunk, data)).await
    }

    /// Answer the peer's request for `chunk`: we will not send it.
    pub async fn do_not_have(&self, chunk: u32) -> Result<(), CommandError> {
        self.send(Command::DoNotHave(chunk)).await
    }

    /// Stop serving the peer; its requests are dropped.
    pub async fn choke(&self) -> Result<(), CommandError> {
        self.send(Command::Choke).await
    }

    /// Serve the peer again.
    pub async fn unchoke(&self) -> Result<(), CommandError> {
        self.send(Command::Unchoke).await
    }

    /// Flush what is queued and close the stream.
    pub async fn close(&self) -> Result<(), CommandError> {
        self.send(Command::Close).await
    }
}

/// A running session: its handle, its events, its task.
#[derive(Debug)]
pub struct Session {
    /// Commands in.
    pub handle: SessionHandle,
    /// Events out, `Ended` last.
    pub events: mpsc::Receiver<Event>,
    /// The task; it ends after `Ended` is delivered (or the receiver dropped).
    pub task: JoinHandle<()>,
}

impl Session {
    /// Starts a session over `io` (needs a tokio runtime).
    pub fn spawn<T>(io: T, cfg: SessionConfig, local: Local) -> Result<Session, SessionError>
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        if local.have.len() != local.chunks as usize {
            return Err(SessionError::BadLocal(format!(
                "{} have-bits for {} chunks",
                local.have.len(),
                local.chunks
            )));
        }
        if local.chunks > cfg.limits.max_chunks {
            return Err(SessionError::BadLocal(format!(
                "{} chunks, more than the limit of {}",
                local.chunks, cfg.limits.max_chunks
            )));
        }
        let (tx, commands) = mpsc::channel(cfg.commands.max(1));
        let (events_tx, events) = mpsc::channel(cfg.events.max(1));
        let slots = Arc::new(Semaphore::new(cfg.depth.max(1)));
        let handle = SessionHandle {
            tx,
            slots,
            depth: cfg.depth.max(1),
            chunks: local.chunks,
            max_piece: cfg.limits.max_piece,
        };
        let task = tokio::spawn(run(io, cfg, local, commands, events_tx));
        Ok(Session {
            handle,
            events,
            task,
        })
    }

    /// Starts a session over a libp2p stream (opened with
    /// `libp2p_stream::Control::open_stream` or accepted for [`PROTOCOL`]).
    pub fn over_libp2p(
        stream: libp2p::Stream,
        cfg: SessionConfig,
        local: Local,
    ) -> Result<Session, SessionError> {
        Self::spawn(Libp2pIo(stream), cfg, local)
    }
}

/// Reads at most this much per poll from a libp2p stream (see [`Libp2pIo`]).
const READ_CAP: usize = 64 << 10;

/// A libp2p stream (futures I/O) as tokio I/O. `tokio_util::compat` zeroes
/// the whole free part of the read buffer on every poll (up to a piece's
/// size while one is being read); this zeroes and hands the stream at most
/// [`READ_CAP`] per poll.
struct Libp2pIo(libp2p::Stream);

impl tokio::io::AsyncRead for Libp2pIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = buf.remaining().min(READ_CAP);
        let dst = buf.initialize_unfilled_to(n);
        let read = std::task::ready!(futures::AsyncRead::poll_read(
            std::pin::Pin::new(&mut self.0),
            cx,
            dst
        ))?;
        buf.advance(read);
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Libp2pIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        futures::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.0), cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        futures::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.0), cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        futures::AsyncWrite::poll_close(std::pin::Pin::new(&mut self.0), cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqState {
    /// Not sent yet (window full, or choked).
    Queued,
    /// `Request` frame in the outbox.
    InOutbox,
    /// Handed to the writer: the peer has it or will.
    Sent,
}

struct Req {
    state: ReqState,
    _slot: OwnedSemaphorePermit,
}

struct State {
    cfg: SessionConfig,
    root: Root,
    chunks: u32,
    ours: Vec<bool>,
    hello_seen: bool,
    peer_depth: usize,
    // Our requests.
    reqs: HashMap<u32, Req>,
    queue: VecDeque<u32>,
    in_window: usize,
    choked_by_peer: bool,
    // Serving the peer.
    serving: HashSet<u32>,
    answers_queued: usize,
    choking: bool,
    /// Requests received since our last `Choke`.
    asked_choked: usize,
    /// Requests received over the depth we told, in this session.
    over_depth: usize,
    // Out.
    outbox: VecDeque<Frame>,
    have_batch: Vec<u32>,
    have_due: Option<Instant>,
    backlog: VecDeque<Event>,
}

fn hex(root: &Root) -> String {
    root.iter().map(|b| format!("{b:02x}")).collect()
}

impl State {
    fn max_have(&self) -> usize {
        self.cfg
            .limits
            .max_have
            .clamp(1, super::frame::MAX_HAVE_BATCH)
    }

    fn flush_haves(&mut self) {
        self.have_due = None;
        while !self.have_batch.is_empty() {
            let n = self.have_batch.len().min(self.max_have());
            let rest = self.have_batch.split_off(n);
            let batch = std::mem::replace(&mut self.have_batch, rest);
            self.outbox.push_back(Frame::Have(batch));
        }
    }

    /// Moves queued requests into the outbox while the window allows.
    fn pump(&mut self) {
        let window = self.cfg.depth.min(self.peer_depth);
        while self.hello_seen && !self.choked_by_peer && self.in_window < window {
            let Some(c) = self.queue.pop_front() else {
                break;
            };
            if let Some(r) = self.reqs.get_mut(&c) {
                r.state = ReqState::InOutbox;
                self.in_window += 1;
                self.outbox.push_back(Frame::Request(c));
            }
        }
    }

    fn remove_from_outbox(&mut self, f: &Frame) -> bool {
        match self.outbox.iter().position(|x| x == f) {
            Some(i) => {
                self.outbox.remove(i);
                true
            }
            None => false,
        }
    }

    fn command(&mut self, c: Command) -> Option<End> {
        match c {
            Command::Have(c) => {
                let i = c as usize;
                if !self.ours[i] {
                    self.ours[i] = true;
                    self.have_batch.push(c);
                    if self.have_batch.len() >= self.max_have() {
                        self.flush_haves();
                    } else if self.have_due.is_none() {
                        self.have_due = Some(Instant::now() + self.cfg.have_delay);
                    }
                }
            }
            Command::Request(c, slot) => {
                if let std::collections::hash_map::Entry::Vacant(e) = self.reqs.entry(c) {
                    e.insert(Req {
                        state: ReqState::Queued,
                        _slot: slot,
                    });
                    self.queue.push_back(c);
                    self.pump();
                }
            }
            Command::Cancel(c) => {
                if let Some(r) = self.reqs.remove(&c) {
                    match r.state {
                        ReqState::Queued => self.queue.retain(|x| *x != c),
                        ReqState::InOutbox => {
                            self.remove_from_outbox(&Frame::Request(c));
                            self.in_window -= 1;
                        }
                        ReqState::Sent => {
                            self.outbox.push_back(Frame::Cancel(c));
                            self.in_window -= 1;
                        }
                    }
                    self.pump();
                }
            }
            Command::Serve(c, data) => {
                if self.serving.remove(&c) {
                    self.answers_queued += 1;
                    self.outbox.push_back(Frame::Piece { chunk: c, data });
                }
            }
            Command::DoNotHave(c) => {
                if self.serving.remove(&c) {
                    self.answers_queued += 1;
                    self.outbox.push_back(Frame::DoNotHave(c));
                    // The peer now counts it as not ours: a later `Have`
                    // announces it again (a super-seeder's offer moves).
                    if let Some(o) = self.ours.get_mut(c as usize) {
                        *o = false;
                    }
                    self.have_batch.retain(|&x| x != c);
                }
            }
            Command::Choke => {
                if !self.choking {
                    self.choking = true;
                    self.asked_choked = 0;
                    self.serving.clear();
                    self.outbox
                        .retain(|f| !matches!(f, Frame::Piece { .. } | Frame::DoNotHave(_)));
                    self.answers_queued = 0;
                    // An unchoke the peer has not seen yet: it still thinks
                    // it is choked, so nothing needs saying.
                    if !self.remove_from_outbox(&Frame::Unchoke) {
                        self.outbox.push_back(Frame::Choke);
                    }
                }
            }
            Command::Unchoke => {
                if self.choking {
                    self.choking = false;
                    self.outbox.push_back(Frame::Unchoke);
                }
            }
            Command::Close => return Some(End::Closed),
        }
        None
    }

    fn range(&self, frame: &'static str, chunk: u32) -> Result<(), SessionError> {
        if chunk < self.chunks {
            Ok(())
        } else {
            Err(SessionError::ChunkOutOfRange {
                frame,
                chunk,
                chunks: self.chunks,
            })
        }
    }

    /// Takes our request for `c` off the books if the peer had it.
    fn answered(&mut self, c: u32) -> bool {
        match self.reqs.get(&c).map(|r| r.state) {
            Some(ReqState::Sent) => {
                self.reqs.remove(&c);
                self.in_window -= 1;
                self.pump();
                true
            }
            _ => false,
        }
    }

    fn frame(&mut self, f: Frame) -> Result<(), SessionError> {
        if !self.hello_seen {
            let Frame::Hello {
                root,
                chunks,
                depth,
                bits,
            } = f
            else {
                return Err(SessionError::NotHelloFirst(f.name()));
            };
            if root != self.root {
                return Err(SessionError::RootMismatch {
                    ours: hex(&self.root),
                    theirs: hex(&root),
                });
            }
            if chunks != self.chunks {
                return Err(SessionError::ChunkCount {
                    ours: self.chunks,
                    theirs: chunks,
                });
            }
            // The codec checked the bitfield's length and stray bits.
            let have = unpack_bits(chunks, &bits).unwrap_or_else(|| vec![false; chunks as usize]);
            self.hello_seen = true;
            self.peer_depth = usize::from(depth);
            self.backlog.push_back(Event::Opened { have, depth });
            self.pump();
            return Ok(());
        }
        match f {
            Frame::Hello { .. } => return Err(SessionError::SecondHello),
            Frame::Have(list) => {
                for c in &list {
                    self.range("have", *c)?;
                }
                self.backlog.push_back(Event::Have(list));
            }
            Frame::Request(c) => {
                self.range("request", c)?;
                if self.choking {
                    self.asked_choked += 1;
                    let limit = choked_limit(self.cfg.accept_depth);
                    if self.asked_choked > limit {
                        return Err(SessionError::AskedWhileChoked {
                            count: self.asked_choked,
                            limit,
                        });
                    }
                    return Ok(());
                }
                if self.serving.contains(&c) {
                    return Ok(());
                }
                if self.serving.len() + self.answers_queued >= usize::from(self.cfg.accept_depth) {
                    // Over the depth we told. A rare crossing of chokes,
                    // cancels and answers has an honest peer one or two over
                    // (1 storm run in about 50): those are answered
                    // do-not-have here, so both sides count the same again.
                    // More than OVER_DEPTH_SLACK in a session is a flood.
                    self.over_depth += 1;
                    if self.over_depth > OVER_DEPTH_SLACK {
                        return Err(SessionError::TooManyRequests {
                            depth: self.cfg.accept_depth,
                        });
                    }
                    self.answers_queued += 1;
                    self.outbox.push_back(Frame::DoNotHave(c));
                    return Ok(());
                }
                self.serving.insert(c);
                self.backlog.push_back(Event::Requested(c));
            }
            Frame::Cancel(c) => {
                if self.serving.remove(&c) {
                    self.backlog.push_back(Event::Cancelled(c));
                } else if let Some(i) = self
                    .outbox
                    .iter()
                    .position(|x| matches!(x, Frame::Piece { chunk, .. } if *chunk == c))
                {
                    self.outbox.remove(i);
                    self.answers_queued -= 1;
                    self.backlog.push_back(Event::Cancelled(c));
                } else if self.remove_from_outbox(&Frame::DoNotHave(c)) {
                    // A queued do-not-have too: the peer no longer counts
                    // the request, so neither may we. With the answer still
                    // counted its next requests looked over the depth (an
                    // honest storm fetcher was ended 1 run in about 50, and
                    // blocked since that counts as an offence).
                    self.answers_queued -= 1;
                }
            }
            Frame::Piece { chunk, data } => {
                self.range("piece", chunk)?;
                // An answer to a request we cancelled or gave up is dropped.
                if self.answered(chunk) {
                    self.backlog.push_back(Event::Piece { chunk, data });
                }
            }
            Frame::DoNotHave(c) => {
                self.range("do-not-have", c)?;
                if self.answered(c) {
                    self.backlog.push_back(Event::DoNotHave(c));
                }
            }
            Frame::Choke => {
                if !self.choked_by_peer {
                    self.choked_by_peer = true;
                    let mut dropped = Vec::new();
                    // Requests still in the outbox never reached the peer: back
                    // to the front of the queue, in order.
                    let mut back = Vec::new();
                    self.outbox.retain(|x| match x {
                        Frame::Request(c) => {
                            back.push(*c);
                            false
                        }
                        _ => true,
                    });
                    for c in back.into_iter().rev() {
                        if let Some(r) = self.reqs.get_mut(&c) {
                            r.state = ReqState::Queued;
                        }
                        self.queue.push_front(c);
                    }
                    // The sent ones the peer has dropped; cancelling them makes
                    // any copy still on its way to the peer void as well, so
                    // both sides count the same requests outstanding.
                    let sent: Vec<u32> = self
                        .reqs
                        .iter()
                        .filter(|(_, r)| r.state == ReqState::Sent)
                        .map(|(c, _)| *c)
                        .collect();
                    for c in sent {
                        self.reqs.remove(&c);
                        self.outbox.push_back(Frame::Cancel(c));
                        dropped.push(c);
                    }
                    dropped.sort_unstable();
                    self.in_window = 0;
                    self.backlog.push_back(Event::Choked { dropped });
                }
            }
            Frame::Unchoke => {
                if self.choked_by_peer {
                    self.choked_by_peer = false;
                    self.backlog.push_back(Event::Unchoked);
                    self.pump();
                }
            }
        }
        Ok(())
    }

    /// The next frame for the writer, with its bookkeeping.
    fn next_out(&mut self) -> Option<Frame> {
        let f = self.outbox.pop_front()?;
        match &f {
            Frame::Request(c) => {
                if let Some(r) = self.reqs.get_mut(c) {
                    r.state = ReqState::Sent;
                }
            }
            Frame::Piece { .. } | Frame::DoNotHave(_) => self.answers_queued -= 1,
            _ => {}
        }
        Some(f)
    }
}

async fn writer<W: AsyncWrite + Send>(
    w: W,
    mut rx: mpsc::Receiver<Encoded>,
) -> std::io::Result<()> {
    let mut w = Box::pin(BufWriter::with_capacity(WRITE_BUFFER, w));
    while let Some(e) = rx.recv().await {
        stall(w.write_all(&e.head)).await?;
        if let Some(t) = &e.tail {
            for slice in t.chunks(WRITE_SLICE) {
                stall(w.write_all(slice)).await?;
            }
        }
        if rx.is_empty() {
            stall(w.flush()).await?;
        }
    }
    stall(w.flush()).await?;
    stall(w.shutdown()).await
}

/// The I/O error of a write that did not finish within [`WRITE_STALL`].
const STALLED: &str = "no write progress";

/// One write step, within [`WRITE_STALL`].
async fn stall(f: impl std::future::Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_STALL, f)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, STALLED))?
}

/// The session error of a failed writer.
fn write_error(e: std::io::Error) -> SessionError {
    if e.kind() == std::io::ErrorKind::TimedOut && e.to_string() == STALLED {
        SessionError::WriteStalled(WRITE_STALL)
    } else {
        SessionError::Write(e)
    }
}

async fn run<T>(
    io: T,
    cfg: SessionConfig,
    local: Local,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
) where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(io);
    let mut reader = FramedRead::new(r, FrameCodec::new(cfg.limits));
    let (wtx, wrx) = mpsc::channel::<Encoded>(WRITER_QUEUE);
    let mut writer_task = tokio::spawn(writer(w, wrx));
    let hello_deadline = Instant::now() + cfg.hello_timeout;
    let linger = cfg.linger;
    let backlog_cap = cfg.events.max(1);
    let mut st = State {
        root: local.root,
        chunks: local.chunks,
        hello_seen: false,
        peer_depth: 0,
        reqs: HashMap::new(),
        queue: VecDeque::new(),
        in_window: 0,
        choked_by_peer: false,
        serving: HashSet::new(),
        answers_queued: 0,
        choking: false,
        asked_choked: 0,
        over_depth: 0,
        outbox: VecDeque::new(),
        have_batch: Vec::new(),
        have_due: None,
        backlog: VecDeque::new(),
        ours: local.have,
        cfg,
    };
    st.outbox.push_back(Frame::Hello {
        root: st.root,
        chunks: st.chunks,
        depth: st.cfg.accept_depth,
        bits: Bytes::from(pack_bits(&st.ours)),
    });

    let limits = st.cfg.limits;
    let mut writer_done = false;
    let end = loop {
        tokio::select! {
            biased;
            res = &mut writer_task, if !writer_done => {
                writer_done = true;
                break match res {
                    Ok(Err(e)) => End::Failed(Arc::new(write_error(e))),
                    _ => End::Failed(Arc::new(SessionError::Write(std::io::ErrorKind::BrokenPipe.into()))),
                };
            }
            permit = events.reserve(), if !st.backlog.is_empty() => {
                let Ok(p) = permit else { break End::OwnerGone };
                if let Some(ev) = st.backlog.pop_front() {
                    p.send(ev);
                }
            }
            permit = wtx.reserve(), if !st.outbox.is_empty() => {
                let Ok(p) = permit else { continue };
                if let Some(f) = st.next_out() {
                    match f.encode(&limits) {
                        Ok(e) => p.send(e),
                        Err(e) => break End::Failed(Arc::new(SessionError::Frame(e))),
                    }
                }
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break End::Closed };
                if let Some(end) = st.command(cmd) {
                    break end;
                }
            }
            frame = reader.next(), if st.backlog.len() < backlog_cap => {
                match frame {
                    None => break End::PeerClosed,
                    Some(Err(e)) => break End::Failed(Arc::new(SessionError::Frame(e))),
                    Some(Ok(f)) => if let Err(e) = st.frame(f) {
                        break End::Failed(Arc::new(e));
                    },
                }
            }
            _ = tokio::time::sleep_until(st.have_due.unwrap_or(hello_deadline)), if st.have_due.is_some() => {
                st.flush_haves();
            }
            _ = tokio::time::sleep_until(hello_deadline), if !st.hello_seen => {
                break End::Failed(Arc::new(SessionError::HelloTimeout(st.cfg.hello_timeout)));
            }
        }
    };
    match &end {
        End::Failed(e) => tracing::debug!(error = %e, "swarm/2 session failed"),
        other => tracing::trace!(end = %other, "swarm/2 session ended"),
    }

    // Closing: on a clean close, what is queued still goes out; then the
    // stream is shut down. Bounded by `linger`.
    let deadline = Instant::now() + linger;
    if end == End::Closed && !writer_done {
        st.flush_haves();
        let flush = async {
            while let Some(f) = st.next_out() {
                let Ok(e) = f.encode(&limits) else { break };
                if wtx.send(e).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, flush).await;
    }
    drop(wtx);
    if !writer_done {
        if end == End::Closed {
            let _ = tokio::time::timeout_at(deadline, &mut writer_task).await;
        }
        writer_task.abort();
    }
    if end != End::OwnerGone {
        st.backlog.push_back(Event::Ended(end));
        let drain = async {
            while let Some(ev) = st.backlog.pop_front() {
                if events.send(ev).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, drain).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures::SinkExt;
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio_util::codec::Framed;

    const WAIT: Duration = Duration::from_secs(10);
    const ROOT: Root = [5; 32];

    fn local(chunks: u32, have: impl Fn(u32) -> bool) -> Local {
        Local {
            root: ROOT,
            chunks,
            have: (0..chunks).map(have).collect(),
        }
    }

    fn data(c: u32) -> Bytes {
        Bytes::from(vec![c as u8; 1000 + c as usize])
    }

    async fn next(s: &mut Session) -> Event {
        tokio::time::timeout(WAIT, s.events.recv())
            .await
            .expect("no event within 10 s")
            .expect("event channel closed")
    }

    /// Two sessions over one duplex pipe, both past their `Opened` event.
    async fn pair(
        cfg_a: SessionConfig,
        a: Local,
        cfg_b: SessionConfig,
        b: Local,
    ) -> (Session, Session) {
        let (x, y) = tokio::io::duplex(1 << 16);
        let mut sa = Session::spawn(x, cfg_a, a).unwrap();
        let mut sb = Session::spawn(y, cfg_b, b).unwrap();
        assert!(matches!(next(&mut sa).await, Event::Opened { .. }));
        assert!(matches!(next(&mut sb).await, Event::Opened { .. }));
        (sa, sb)
    }

    /// A session and a raw peer speaking frames by hand.
    fn raw(cfg: SessionConfig, l: Local) -> (Session, Framed<DuplexStream, FrameCodec>) {
        let (x, y) = tokio::io::duplex(1 << 16);
        let limits = cfg.limits;
        (
            Session::spawn(x, cfg, l).unwrap(),
            Framed::new(y, FrameCodec::new(limits)),
        )
    }

    async fn read(p: &mut Framed<DuplexStream, FrameCodec>) -> Frame {
        tokio::time::timeout(WAIT, p.next())
            .await
            .expect("no frame within 10 s")
            .expect("stream ended")
            .unwrap()
    }

    fn hello(chunks: u32, depth: u16) -> Frame {
        Frame::Hello {
            root: ROOT,
            chunks,
            depth,
            bits: Bytes::from(pack_bits(&vec![true; chunks as usize])),
        }
    }

    fn failed(ev: Event) -> Arc<SessionError> {
        match ev {
            Event::Ended(End::Failed(e)) => e,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn hello_goes_first_and_carries_the_bitfield_and_depth() {
        let (x, y) = tokio::io::duplex(1 << 16);
        let cfg = SessionConfig::default().with_accept_depth(5);
        let mut a = Session::spawn(x, cfg, local(10, |c| c % 3 == 0)).unwrap();
        let mut b = Session::spawn(y, SessionConfig::default(), local(10, |_| false)).unwrap();
        let want: Vec<bool> = (0..10).map(|c| c % 3 == 0).collect();
        assert_eq!(
            next(&mut b).await,
            Event::Opened {
                have: want,
                depth: 5
            }
        );
        assert_eq!(
            next(&mut a).await,
            Event::Opened {
                have: vec![false; 10],
                depth: 16
            }
        );
    }

    #[tokio::test]
    async fn a_frame_before_hello_ends_the_session() {
        let (mut s, mut p) = raw(SessionConfig::default(), local(4, |_| true));
        assert!(matches!(read(&mut p).await, Frame::Hello { .. }));
        p.send(Frame::Request(0)).await.unwrap();
        let e = failed(next(&mut s).await);
        assert!(matches!(*e, SessionError::NotHelloFirst("request")), "{e}");
        assert!(e.to_string().contains("before hello"), "{e}");
    }

    #[tokio::test]
    async fn a_root_mismatch_ends_both_sides() {
        let (x, y) = tokio::io::duplex(1 << 16);
        let mut other = local(4, |_| true);
        other.root = [6; 32];
        let mut a = Session::spawn(x, SessionConfig::default(), local(4, |_| true)).unwrap();
        let mut b = Session::spawn(y, SessionConfig::default(), other).unwrap();
        for s in [&mut a, &mut b] {
            let e = failed(next(s).await);
            assert!(matches!(*e, SessionError::RootMismatch { .. }), "{e}");
        }
        let e = failed(Event::Ended(End::Failed(Arc::new(
            SessionError::RootMismatch {
                ours: hex(&ROOT),
                theirs: hex(&[6; 32]),
            },
        ))));
        assert!(e.to_string().contains(&"06".repeat(32)), "{e}");
    }

    #[tokio::test]
    async fn an_oversize_frame_ends_the_session_unread() {
        let (mut s, p) = raw(SessionConfig::default(), local(4, |_| true));
        let mut io = p.into_inner();
        io.write_all(&hello(4, 8).to_vec(&Limits::default()).unwrap())
            .await
            .unwrap();
        assert!(matches!(next(&mut s).await, Event::Opened { .. }));
        // A prefix claiming 4 GiB; nothing of it follows.
        io.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let e = failed(next(&mut s).await);
        assert!(
            matches!(&*e, SessionError::Frame(FrameError::Oversize { len, .. }) if *len == u32::MAX as usize),
            "{e}"
        );
    }

    #[tokio::test]
    async fn no_hello_in_time_ends_the_session() {
        let cfg = SessionConfig::default().with_hello_timeout(Duration::from_millis(50));
        let (mut s, _p) = raw(cfg, local(4, |_| true));
        let e = failed(next(&mut s).await);
        assert!(matches!(*e, SessionError::HelloTimeout(_)), "{e}");
    }

    #[tokio::test]
    async fn pipelined_requests_answered_in_any_order() {
        let (mut a, mut b) = pair(
            SessionConfig::default(),
            local(20, |_| true),
            SessionConfig::default().with_depth(8),
            local(20, |_| false),
        )
        .await;
        for c in 0..8 {
            b.handle.request(c).await.unwrap();
        }
        assert_eq!(
            b.handle.request(8).await,
            Err(CommandError::QueueFull { depth: 8 })
        );
        // All eight reach the server before it has answered any.
        let mut asked = Vec::new();
        for _ in 0..8 {
            match next(&mut a).await {
                Event::Requested(c) => asked.push(c),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(asked, (0..8).collect::<Vec<_>>());
        for c in (0..8).rev() {
            a.handle.serve(c, data(c)).await.unwrap();
        }
        for c in (0..8).rev() {
            assert_eq!(
                next(&mut b).await,
                Event::Piece {
                    chunk: c,
                    data: data(c)
                }
            );
        }
        assert_eq!(b.handle.free_slots(), 8);
    }

    #[tokio::test]
    async fn a_window_smaller_than_the_depth_holds_requests_back() {
        let (mut a, mut b) = pair(
            SessionConfig::default().with_accept_depth(2),
            local(20, |_| true),
            SessionConfig::default().with_depth(8),
            local(20, |_| false),
        )
        .await;
        for c in 0..4 {
            b.handle.request(c).await.unwrap();
        }
        assert_eq!(next(&mut a).await, Event::Requested(0));
        assert_eq!(next(&mut a).await, Event::Requested(1));
        // The third goes out only once an answer frees the peer's window.
        a.handle.do_not_have(1).await.unwrap();
        assert_eq!(next(&mut b).await, Event::DoNotHave(1));
        assert_eq!(next(&mut a).await, Event::Requested(2));
    }

    #[tokio::test]
    async fn cancel_reaches_the_server_and_its_answer_is_dropped() {
        let (mut a, mut b) = pair(
            SessionConfig::default(),
            local(20, |_| true),
            SessionConfig::default(),
            local(20, |_| false),
        )
        .await;
        b.handle.request(1).await.unwrap();
        b.handle.request(2).await.unwrap();
        assert_eq!(next(&mut a).await, Event::Requested(1));
        assert_eq!(next(&mut a).await, Event::Requested(2));
        b.handle.cancel(1).await.unwrap();
        assert_eq!(next(&mut a).await, Event::Cancelled(1));
        // Served anyway (the owner was slow): the session drops it, so the
        // next thing B sees is chunk 2.
        a.handle.serve(1, data(1)).await.unwrap();
        a.handle.serve(2, data(2)).await.unwrap();
        assert_eq!(
            next(&mut b).await,
            Event::Piece {
                chunk: 2,
                data: data(2)
            }
        );
        assert_eq!(b.handle.free_slots(), 8);
    }

    #[tokio::test]
    async fn choke_drops_requests_both_ways_and_unchoke_resumes() {
        let (mut a, mut b) = pair(
            SessionConfig::default(),
            local(20, |_| true),
            SessionConfig::default(),
            local(20, |_| false),
        )
        .await;
        b.handle.request(1).await.unwrap();
        assert_eq!(next(&mut a).await, Event::Requested(1));
        a.handle.choke().await.unwrap();
        assert_eq!(next(&mut b).await, Event::Choked { dropped: vec![1] });
        // A request made while choked waits; B's cancel of 1 reaches A, which
        // had already forgotten it (no event).
        b.handle.request(3).await.unwrap();
        a.handle.unchoke().await.unwrap();
        assert_eq!(next(&mut b).await, Event::Unchoked);
        assert_eq!(next(&mut a).await, Event::Requested(3));
        a.handle.serve(3, data(3)).await.unwrap();
        assert_eq!(
            next(&mut b).await,
            Event::Piece {
                chunk: 3,
                data: data(3)
            }
        );
        assert_eq!(b.handle.free_slots(), 8);
    }

    #[tokio::test]
    async fn requests_from_a_choked_peer_are_dropped_unanswered() {
        let (mut s, mut p) = raw(SessionConfig::default(), local(4, |_| true));
        assert!(matches!(read(&mut p).await, Frame::Hello { .. }));
        p.send(hello(4, 8)).await.unwrap();
        assert!(matches!(next(&mut s).await, Event::Opened { .. }));
        s.handle.choke().await.unwrap();
        assert_eq!(read(&mut p).await, Frame::Choke);
        p.send(Frame::Request(0)).await.unwrap();
        // Frames are read in order: once the have is an event, the request
        // before it has been read (and dropped).
        p.send(Frame::Have(vec![2])).await.unwrap();
        assert_eq!(next(&mut s).await, Event::Have(vec![2]));
        s.handle.unchoke().await.unwrap();
        assert_eq!(read(&mut p).await, Frame::Unchoke);
        p.send(Frame::Request(1)).await.unwrap();
        // Request 0 came while choked: no event for it, 1 is next.
        assert_eq!(next(&mut s).await, Event::Requested(1));
    }

    #[tokio::test]
    async fn a_peer_that_keeps_asking_while_choked_is_ended() {
        let cfg = SessionConfig::default().with_accept_depth(4);
        let limit = choked_limit(4);
        let (mut s, mut p) = raw(cfg, local(64, |_| true));
        assert!(matches!(read(&mut p).await, Frame::Hello { .. }));
        p.send(hello(64, 8)).await.unwrap();
        assert!(matches!(next(&mut s).await, Event::Opened { .. }));
        s.handle.choke().await.unwrap();
        assert_eq!(read(&mut p).await, Frame::Choke);
        // What may cross a choke is dropped quietly...
        for c in 0..limit as u32 {
            p.send(Frame::Request(c)).await.unwrap();
        }
        p.send(Frame::Have(vec![2])).await.unwrap();
        assert_eq!(next(&mut s).await, Event::Have(vec![2]));
        // ...and an unchoke starts the count again.
        s.handle.unchoke().await.unwrap();
        assert_eq!(read(&mut p).await, Frame::Unchoke);
        s.handle.choke().await.unwrap();
        assert_eq!(read(&mut p).await, Frame::Choke);
        for c in 0..=limit as u32 {
            p.send(Frame::Request(c)).await.unwrap();
        }
        let e = failed(next(&mut s).await);
        assert!(
            matches!(*e, SessionError::AskedWhileChoked { count, limit: l } if count == limit + 1 && l == limit),
            "{e}"
        );
        assert!(e.is_offence());
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_its_piece_is_ended() {
        // A small pipe: the piece cannot be written while the peer reads nothing.
        let (x, y) = tokio::io::duplex(4 << 10);
        let mut s = Session::spawn(x, SessionConfig::default(), local(4, |_| true)).unwrap();
        let mut p = Framed::new(y, FrameCodec::new(Limits::default()));
        assert!(matches!(read(&mut p).await, Frame::Hello { .. }));
        p.send(hello(4, 8)).await.unwrap();
        p.send(Frame::Request(1)).await.unwrap();
        assert!(matches!(next(&mut s).await, Event::Opened { .. }));
        assert_eq!(next(&mut s).await, Event::Requested(1));
        s.handle
            .serve(1, Bytes::from(vec![7u8; 256 << 10]))
            .await
            .unwrap();
        let start = Instant::now();
        let e = failed(next(&mut s).await);
        assert!(
            matches!(*e, SessionError::WriteStalled(d) if d == WRITE_STALL),
            "{e}"
        );
        assert!(e.is_offence());
        assert!(start.elapsed() >= WRITE_STALL, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_slow_reader_is_not_ended() {
        let (x, y) = tokio::io::duplex(4 << 10);
        let mut s = Session::spawn(x, SessionConfig::default(), local(4, |_| true)).unwrap();
        let mut p = Framed::new(y, FrameCodec::new(Limits::default()));
        assert!(matches!(read(&mut p).await, Frame::Hello { .. }));
        p.send(hello(4, 8)).await.unwrap();
        p.send(Frame::Request(1)).await.unwrap();
        assert!(matches!(next(&mut s).await, Event::Opened { .. }));
        assert_eq!(next(&mut s).await, Event::Requested(1));
        let piece = Bytes::from(vec![7u8; 128 << 10]);
        s.handle.serve(1, piece.clone()).await.unwrap();
        // 4 KiB every 200 ms (20 KiB/s): 6.4 s for the piece, more than
        // WRITE_STALL, each 64 KiB slice in 3.2 s.
        let mut io = p.into_inner();
        let mut got = 0usize;
        let want = 4 + 1 + 4 + piece.len();
        let mut buf = vec![0u8; 4 << 10];
        while got < want {
            tokio::time::sleep(Duration::from_millis(200)).await;
            got += io.read(&mut buf).await.unwrap();
        }
        assert!(got > want - 1, "{got}");
        assert!(s.events.try_recv().is_err(), "the session is still running");
    }

    #[test]
    fn offences_are_protocol_violations_not_io() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        for e in [
            SessionError::Frame(FrameError::Io(io())),
            SessionError::Frame(FrameError::Truncated(3)),
            SessionError::Write(io()),
            SessionError::HelloTimeout(Duration::from_secs(10)),
            SessionError::BadLocal(String::new()),
        ] {
            assert!(!e.is_offence(), "{e}");
        }
        for e in [
            SessionError::Frame(FrameError::UnknownTag(99)),
            SessionError::Frame(FrameError::Oversize { len: 1, max: 0 }),
            SessionError::NotHelloFirst("request"),
            SessionError::SecondHello,
            SessionError::ChunkCount { ours: 1, theirs: 2 },
            SessionError::ChunkOutOfRange {
                frame: "request",
                chunk: 9,
                chunks: 4,
            },
            SessionError::TooManyRequests { depth: 16 },
            SessionError::AskedWhileChoked {
                count: 49,
                limit: 48,
            },
            SessionError::WriteStalled(WRITE_STALL),
        ] {
            assert!(e.is_offence(), "{e}");
        }
    }

    #[tokio::test]
    async fn a_peer_over_the_told_depth_is_ended() {
        let cfg = SessionConfig::default().with_accept_depth(3);
        let (mut s, mut p) = raw(cfg, local(10, |_| true));
        let Frame::Hello { depth, .. } = read(&mut p).await else {
            panic!("no hello");
        };
        assert_eq!(depth, 3);
        p.send(hello(10, 8)).await.unwrap();
        for c in 0..4 {
            p.send(Frame::Request(c)).await.unwrap();
        }
        assert!(matches!(next(&mut s).await, Event::Opened { .. }));
        for c in 0..3 {
            assert_eq!(next(&mut s).await, Event::Requested(c));
        }
        // One over (an honest crossing can do that): answered do-not-have.
        assert_eq!(read(&mut p).await, Frame::DoNotHave(3));
        // More than the slack: ended.
        for _ in 0..OVER_DEPTH_SLACK {
            p.send(Frame::Request(9)).await.unwrap();
        }
        let e = failed(next(&mut s).await);
        assert!(
            matches!(*e, SessionError::TooManyRequests { depth: 3 }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_index_past_the_end_ends_the_session() {
        let (mut s, mut p) = raw(SessionConfig::default(), local(4, |_| true));
        p.send(hello(4, 8)).await.unwrap();
        p.send(Frame::Have(vec![1, 4])).await.unwrap();
        assert!(matches!(next(&mut s).await, Event::Opened { .. }));
        let e = failed(next(&mut s).await);
        assert!(
            matches!(
                *e,
                SessionError::ChunkOutOfRange {
                    frame: "have",
                    chunk: 4,
                    chunks: 4
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn haves_are_batched_and_split_at_the_frame_limit() {
        // A delay far longer than the test: the first batch goes out because
        // it is full, not because time passed.
        let limits = Limits {
            max_have: 4,
            ..Limits::default()
        };
        let cfg = SessionConfig::default()
            .with_limits(limits)
            .with_have_delay(Duration::from_secs(600));
        let (mut s, mut p) = raw(cfg, local(10, |_| false));
        assert!(matches!(read(&mut p).await, Frame::Hello { .. }));
        for c in [3, 1, 3, 4, 7, 9] {
            s.handle.have(c).await.unwrap();
        }
        // 3 twice counts once: 3, 1, 4, 7 fill the batch; 9 waits.
        assert_eq!(read(&mut p).await, Frame::Have(vec![3, 1, 4, 7]));
        s.handle.close().await.unwrap();
        // Closing flushes the rest, then the stream ends.
        assert_eq!(read(&mut p).await, Frame::Have(vec![9]));
        assert!(
            tokio::time::timeout(WAIT, p.next())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(next(&mut s).await, Event::Ended(End::Closed));
    }

    #[tokio::test]
    async fn a_have_is_pushed_after_the_delay() {
        let cfg = SessionConfig::default().with_have_delay(Duration::from_millis(20));
        let (a, mut b) = pair(
            cfg,
            local(10, |_| false),
            SessionConfig::default(),
            local(10, |_| false),
        )
        .await;
        a.handle.have(6).await.unwrap();
        assert_eq!(next(&mut b).await, Event::Have(vec![6]));
        assert_eq!(
            a.handle.have(10).await,
            Err(CommandError::OutOfRange {
                chunk: 10,
                chunks: 10
            })
        );
        // Dropping every handle closes the session.
        let Session { handle, events, .. } = a;
        let mut events = events;
        drop(handle);
        let last = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
        assert_eq!(last, Some(Event::Ended(End::Closed)));
        assert_eq!(next(&mut b).await, Event::Ended(End::PeerClosed));
    }

    #[test]
    fn spawn_refuses_an_inconsistent_local() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (x, _y) = tokio::io::duplex(64);
            let mut l = local(4, |_| true);
            l.have.pop();
            let e = Session::spawn(x, SessionConfig::default(), l).unwrap_err();
            assert!(e.to_string().contains("3 have-bits for 4 chunks"), "{e}");
        });
    }
}
