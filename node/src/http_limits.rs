//! The HTTP seed's front door: our own accept loop in front of hyper, so that
//! a socket, a slow reader or a silent client costs the seed a bounded number
//! of file descriptors, bytes and seconds.
//!
//! - Connections are capped in total and per client IP ([`Slots`]); one over
//!   either cap is closed as soon as it is accepted.
//! - hyper's header-read timeout closes a connection that has not sent a whole
//!   request head in time: a silent socket, a slowloris, and a keep-alive
//!   connection idle between requests (hyper restarts the timer for each head).
//! - [`StallGuard`] drops a connection whose writes make no progress for
//!   [`STALL_TIMEOUT`] (a client that stopped reading).
//! - Response bodies that hold memory or disk reads (artifacts, chunks) take a
//!   body slot, held until the body is finished or dropped ([`hold`]), not
//!   only until the headers are out.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use futures_util::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// Open HTTP connections at most, when RLIMIT_NOFILE allows it. Each costs a
/// descriptor and a few KiB; 4,096 is far more than a boot wave needs (a
/// client uses one or two) and well inside what a seed host can hold.
pub(crate) const MAX_CONNECTIONS: usize = 4096;
/// Descriptors kept out of the connection cap: the swarm's sockets, chunk
/// files read for the body slots ([`MAX_BODIES`] of them at worst), the
/// store, stdio and the runtime.
pub(crate) const FD_RESERVE: u64 = 512;
/// Open connections per client IP. A machine needs one or two; 64 leaves room
/// for a NAT with a few dozen machines behind it while one address cannot
/// take more than 1/64 of [`MAX_CONNECTIONS`].
pub(crate) const MAX_CONNECTIONS_PER_IP: usize = 64;
/// Time to send a whole request head, and the longest a keep-alive
/// connection may sit idle between requests. 10 s is forever for a client on
/// a LAN; a silent socket holds its descriptor no longer than this.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose writes make no progress for this long is dropped: the
/// client stopped reading. Long enough for a congested link to drain a full
/// socket buffer, short enough that idle readers do not pile up.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Artifact and chunk bodies in flight at once; each holds about one chunk in
/// memory and reads chunk files, so this bounds memory and disk readers.
pub(crate) const MAX_BODIES: usize = 256;
/// Bodies in flight per client IP: a wget init or the fetch's HTTP rescue
/// needs a few; 16 keeps a handful of slow readers on one address from
/// holding every body slot.
pub(crate) const MAX_BODIES_PER_IP: usize = 16;
/// How long a request waits for a body slot before it is answered 503.
pub(crate) const BODY_WAIT: Duration = Duration::from_secs(10);
/// On shutdown, how long connections get to finish their responses.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// After a failed accept (EMFILE, ENFILE, ENOBUFS) the loop pauses this long
/// rather than spin on an error that will not clear by itself at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The limits [`serve`] applies.
#[derive(Debug, Clone)]
pub(crate) struct HttpLimits {
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) stall_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: MAX_CONNECTIONS,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            header_timeout: HEADER_TIMEOUT,
            stall_timeout: STALL_TIMEOUT,
        }
    }
}

impl HttpLimits {
    /// No more connections than `nofile` descriptors allow after [`FD_RESERVE`].
    pub(crate) fn with_nofile(mut self, nofile: u64) -> Self {
        let room = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
        self.max_connections = self.max_connections.min(room.max(1));
        self
    }

    pub(crate) fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    pub(crate) fn with_header_timeout(mut self, t: Duration) -> Self {
        self.header_timeout = t;
        self
    }
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (many hosts
/// start at 1,024, macOS at 256); returns the soft limit in force afterwards.
/// macOS refuses more than `OPEN_MAX` (10,240) even when the hard limit is
/// unlimited, so that is tried next.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    for want in [lim.rlim_max, lim.rlim_max.min(10_240)] {
        if want <= lim.rlim_cur {
            break;
        }
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            lim.rlim_cur = want;
            break;
        }
    }
    #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux and macOS, not everywhere.
    u64::try_from(lim.rlim_cur).unwrap_or(u64::MAX)
}

/// Both ends of an HTTP connection: who asks, and which of our addresses
/// they reached (handlers read it as `ConnectInfo<Conn>`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conn {
    pub(crate) remote: SocketAddr,
    pub(crate) local: Option<SocketAddr>,
}

/// Which cap a [`Slots::try_take`] hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Total(usize),
    PerIp(usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(n) => write!(f, "all {n} in use"),
            Full::PerIp(n) => write!(f, "this address holds {n}, the most one may"),
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A counted resource capped in total and per client IP. A [`Slot`] gives
/// its place back when dropped.
pub(crate) struct Slots {
    total: usize,
    per_ip: usize,
    counts: Mutex<Counts>,
    freed: Notify,
}

/// One place in [`Slots`], held until dropped.
pub(crate) struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    pub(crate) fn new(total: usize, per_ip: usize) -> Arc<Slots> {
        Arc::new(Slots {
            total,
            per_ip,
            counts: Mutex::new(Counts::default()),
            freed: Notify::new(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent under a panic elsewhere (each update is one statement).
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for `ip` now, or which cap is full.
    pub(crate) fn try_take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let mut c = self.counts();
        if c.total >= self.total {
            return Err(Full::Total(self.total));
        }
        let mine = c.per_ip.entry(ip).or_insert(0);
        if *mine >= self.per_ip {
            return Err(Full::PerIp(self.per_ip));
        }
        *mine += 1;
        c.total += 1;
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }

    /// A slot for `ip`, waiting up to `wait` for one to be freed.
    pub(crate) async fn take_within(
        self: &Arc<Self>,
        ip: IpAddr,
        wait: Duration,
    ) -> Result<Slot, Full> {
        let deadline = Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before trying, so a release between the try and the wait is not missed.
            freed.as_mut().enable();
            match self.try_take(ip) {
                Ok(s) => return Ok(s),
                Err(full) => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(full);
                    }
                }
            }
        }
    }

    /// Slots taken now.
    pub(crate) fn in_use(&self) -> usize {
        self.counts().total
    }

    /// Waits until every slot is free, at most `wait`; whether they all are.
    async fn drained_within(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.in_use() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return false;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut c = self.slots.counts();
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.per_ip.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_ip.remove(&self.ip);
                }
            }
        }
        self.slots.freed.notify_waiters();
    }
}

/// `stream`, holding `slot` until the stream is finished or dropped: a
/// response body keeps its body slot while hyper still sends it.
pub(crate) fn hold<S: Stream>(stream: S, slot: Slot) -> impl Stream<Item = S::Item> {
    stream.map(move |item| {
        let _held: &Slot = &slot;
        item
    })
}

/// A socket whose writes fail with `TimedOut` once they have made no
/// progress for `limit`: hyper then drops the connection. Reads pass through
/// (hyper's header timeout bounds the wait for a request).
pub(crate) struct StallGuard<T> {
    io: T,
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    armed: bool,
}

impl<T> StallGuard<T> {
    pub(crate) fn new(io: T, limit: Duration) -> Self {
        StallGuard {
            io,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    fn check<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        if !self.armed {
            self.timer.as_mut().reset(Instant::now() + self.limit);
            self.armed = true;
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s", self.limit.as_secs_f64()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.check(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.check(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.check(cx, r)
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves;
/// then lets open connections finish their responses for a few seconds.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let conns = Slots::new(limits.max_connections, limits.max_connections_per_ip);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut refused: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let slot = match conns.try_take(remote.ip()) {
            Ok(s) => s,
            Err(full) => {
                refused += 1;
                // One line for the first refusal and then one per thousand, not a line each.
                if refused % 1000 == 1 {
                    tracing::warn!(%remote, "HTTP connection refused: {full} ({refused} refused so far)");
                }
                drop(stream);
                continue;
            }
        };
        let conn = Conn {
            remote,
            local: stream.local_addr().ok(),
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(StallGuard::new(stream, limits.stall_timeout));
        let router = router.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(conn));
            router.clone().oneshot(req)
        });
        let mut stop = stop_rx.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let c = builder.serve_connection(io, svc);
            tokio::pin!(c);
            let r = tokio::select! {
                r = c.as_mut() => r,
                _ = stop.changed() => {
                    c.as_mut().graceful_shutdown();
                    c.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(remote = %conn.remote, error = %e, "HTTP connection ended");
            }
        });
    }
    let _ = stop_tx.send(true);
    drop(listener);
    if !conns.drained_within(SHUTDOWN_GRACE).await {
        tracing::warn!(
            open = conns.in_use(),
            "HTTP connections still open after the shutdown grace; dropping them"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slots_cap_in_total_and_per_address_and_free_on_drop() {
        let s = Slots::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = s.try_take(a).unwrap();
        let _a2 = s.try_take(a).unwrap();
        assert_eq!(s.try_take(a).err(), Some(Full::PerIp(2)));
        let _b1 = s.try_take(b).unwrap();
        assert_eq!(s.try_take(b).err(), Some(Full::Total(3)));
        drop(a1);
        assert_eq!(s.in_use(), 2);
        let _a3 = s.try_take(a).unwrap();
        assert_eq!(s.in_use(), 3);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_a_finished_body_frees() {
        let s = Slots::new(1, 1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held = s.try_take(ip).unwrap();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.take_within(ip, Duration::from_secs(30)).await.is_ok() })
        };
        // The body ends: the stream holding the slot is drained and dropped.
        let body = hold(futures_util::stream::iter([1u8, 2]), held);
        assert_eq!(body.collect::<Vec<_>>().await, [1, 2]);
        assert!(waiter.await.unwrap());
        // And a wait that nothing ends times out with the cap that was full.
        let _again = s.try_take(ip);
        let t = s.take_within(ip, Duration::from_millis(50)).await;
        assert_eq!(t.err(), Some(Full::Total(1)));
    }

    #[test]
    fn the_connection_cap_leaves_the_descriptor_reserve_free() {
        let l = HttpLimits::default().with_nofile(1024);
        assert_eq!(l.max_connections, 1024 - FD_RESERVE as usize);
        let l = HttpLimits::default().with_nofile(1_000_000);
        assert_eq!(l.max_connections, MAX_CONNECTIONS);
        assert_eq!(HttpLimits::default().with_nofile(10).max_connections, 1);
    }
}
