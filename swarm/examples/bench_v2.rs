//! One `/phase/swarm/2` session over loopback beside a raw TCP copy, all in
//! one process. Per repetition, interleaved so that a noisy machine hits
//! every mode alike, the same bytes go:
//! - as a raw TCP copy (1 MiB writes and reads);
//! - as the same copy over one libp2p stream (tcp + noise + yamux, no
//!   session): the transport's own cost;
//! - through a v2 session over plain TCP (no noise, no yamux): the session's
//!   own cost;
//! - through a v2 session over real libp2p (tcp + noise + yamux).
//!
//! Prints MB/s and process CPU-seconds per GB (both ends: every thread's
//! schedstat) per run, then the medians and the median of the
//! per-repetition ratios to the raw copy.
//!
//! `cargo run --release -p phase-swarm --example bench_v2 -- [MiB] [chunk KiB] [reps] [depth]`
//! (defaults 64, 1024, 5, 8); `BENCH_V2_ONLY=raw|stream|plain|libp2p` runs
//! one mode (for a profiler).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Swarm, noise, tcp, yamux};
use phase_swarm::v2::{Event, Local, PROTOCOL, Session, SessionConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every wait in the bench is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

/// `len` pseudo-random bytes (xorshift, eight at a time).
fn data(len: usize) -> Bytes {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v.into()
}

/// Process CPU seconds so far: the time on CPU of every thread, from
/// /proc/self/task/*/schedstat (nanoseconds; /proc/self/stat counts 10 ms
/// ticks, too coarse for a transfer of a second). The runtime's threads live
/// as long as the process, so none is lost by exiting mid-run.
fn cpu_seconds() -> f64 {
    let mut ns = 0u64;
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = t.unwrap().path().join("schedstat");
        // A thread may exit between the listing and the read.
        if let Ok(s) = std::fs::read_to_string(path) {
            ns += s.split(' ').next().unwrap().parse::<u64>().unwrap();
        }
    }
    ns as f64 / 1e9
}

/// One measured transfer.
#[derive(Clone, Copy)]
struct Run {
    secs: f64,
    cpu: f64,
}

impl Run {
    fn mbs(&self, bytes: usize) -> f64 {
        bytes as f64 / 1e6 / self.secs
    }
    fn cpu_per_gb(&self, bytes: usize) -> f64 {
        self.cpu * 1e9 / bytes as f64
    }
}

fn measure_start() -> (Instant, f64) {
    (Instant::now(), cpu_seconds())
}

fn measure_end((t, c): (Instant, f64)) -> Run {
    Run {
        secs: t.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - c,
    }
}

async fn raw_tcp(bytes: Bytes) -> Run {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let total = bytes.len();
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut s, _) = l.accept().await.unwrap();
    let m = measure_start();
    let send = tokio::spawn(async move {
        for part in bytes.chunks(1 << 20) {
            s.write_all(part).await.unwrap();
        }
        s.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = tokio::time::timeout(WAIT, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let run = measure_end(m);
    send.await.unwrap();
    assert_eq!(got, total, "raw copy lost bytes");
    run
}

async fn next(s: &mut Session) -> Event {
    tokio::time::timeout(WAIT, s.events.recv())
        .await
        .expect("no event within 60 s")
        .expect("event channel closed")
}

/// The two sides' starting state: the server holds every chunk.
fn locals(n: u32) -> (Local, Local) {
    let root = [9; 32];
    let l = |have| Local {
        root,
        chunks: n,
        have: vec![have; n as usize],
    };
    (l(true), l(false))
}

/// Serves `pieces` from `sa` to `sb` (fresh sessions over one stream):
/// every chunk requested as slots free, timed from both `Opened` to the
/// last piece. Each piece is compared on arrival and dropped, as a raw
/// copy's reader reuses its buffer.
async fn transfer(mut sa: Session, mut sb: Session, pieces: &[Bytes]) -> Run {
    let n = pieces.len() as u32;
    assert!(matches!(next(&mut sa).await, Event::Opened { .. }));
    assert!(matches!(next(&mut sb).await, Event::Opened { .. }));
    let served = pieces.to_vec();
    let owner = tokio::spawn(async move {
        loop {
            match next(&mut sa).await {
                Event::Requested(c) => {
                    sa.handle
                        .serve(c, served[c as usize].clone())
                        .await
                        .unwrap();
                }
                Event::Ended(_) => return,
                _ => {}
            }
        }
    });
    let m = measure_start();
    let mut asked = 0u32;
    let mut got = vec![false; n as usize];
    let mut received = 0;
    while received < n {
        while asked < n && sb.handle.free_slots() > 0 {
            sb.handle.request(asked).await.unwrap();
            asked += 1;
        }
        match next(&mut sb).await {
            Event::Piece { chunk, data } => {
                let i = chunk as usize;
                assert!(
                    !got[i] && data == pieces[i],
                    "chunk {i} differs or came twice"
                );
                got[i] = true;
                received += 1;
            }
            other => panic!("client got {other:?}"),
        }
    }
    let run = measure_end(m);
    sb.handle.close().await.unwrap();
    tokio::time::timeout(WAIT, owner).await.unwrap().unwrap();
    run
}

async fn v2_plain_tcp(pieces: &[Bytes], depth: usize) -> Run {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    c.set_nodelay(true).unwrap();
    s.set_nodelay(true).unwrap();
    let (a, b) = locals(pieces.len() as u32);
    let cfg = SessionConfig::default().with_depth(depth);
    let sa = Session::spawn(s, cfg.clone(), a).unwrap();
    let sb = Session::spawn(c, cfg, b).unwrap();
    transfer(sa, sb, pieces).await
}

fn swarm() -> Swarm<libp2p_stream::Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build()
}

/// Two connected swarms on 127.0.0.1, driven by their own tasks: streams
/// for each run are opened on B's control and accepted on A's.
struct Libp2pPair {
    a_peer: PeerId,
    b_control: libp2p_stream::Control,
    incoming: libp2p_stream::IncomingStreams,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Libp2pPair {
    async fn new() -> Self {
        let mut a = swarm();
        let a_peer = *a.local_peer_id();
        let incoming = a.behaviour().new_control().accept(PROTOCOL).unwrap();
        a.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } =
                tokio::time::timeout(WAIT, a.select_next_some())
                    .await
                    .unwrap()
            {
                break address;
            }
        };
        let ta = tokio::spawn(async move {
            loop {
                a.select_next_some().await;
            }
        });
        let mut b = swarm();
        let b_control = b.behaviour().new_control();
        b.dial(addr).unwrap();
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                tokio::time::timeout(WAIT, b.select_next_some())
                    .await
                    .unwrap()
                && peer_id == a_peer
            {
                break;
            }
        }
        let tb = tokio::spawn(async move {
            loop {
                b.select_next_some().await;
            }
        });
        Self {
            a_peer,
            b_control,
            incoming,
            tasks: vec![ta, tb],
        }
    }

    /// A new stream: (A's accepted end, B's opened end).
    async fn streams(&mut self) -> (libp2p::Stream, libp2p::Stream) {
        let client = tokio::time::timeout(WAIT, self.b_control.open_stream(self.a_peer, PROTOCOL))
            .await
            .unwrap()
            .unwrap();
        let (_, server) = tokio::time::timeout(WAIT, self.incoming.next())
            .await
            .unwrap()
            .unwrap();
        (server, client)
    }

    /// The transport alone: the bytes copied A to B over one libp2p
    /// stream, 1 MiB writes and reads, no session.
    async fn copy(&mut self, bytes: Bytes) -> Run {
        use futures::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut server, mut client) = self.streams().await;
        let total = bytes.len();
        let m = measure_start();
        let send = tokio::spawn(async move {
            for part in bytes.chunks(1 << 20) {
                server.write_all(part).await.unwrap();
            }
            server.close().await.unwrap();
        });
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        loop {
            let n = tokio::time::timeout(WAIT, client.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let run = measure_end(m);
        send.await.unwrap();
        assert_eq!(got, total, "libp2p stream copy lost bytes");
        run
    }

    async fn run(&mut self, pieces: &[Bytes], depth: usize) -> Run {
        let (server, client) = self.streams().await;
        let (a, b) = locals(pieces.len() as u32);
        let cfg = SessionConfig::default().with_depth(depth);
        let sa = Session::over_libp2p(server, cfg.clone(), a).unwrap();
        let sb = Session::over_libp2p(client, cfg, b).unwrap();
        transfer(sa, sb, pieces).await
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn usage() -> ! {
    eprintln!("usage: bench_v2 [MiB] [chunk KiB] [reps] [depth]  (defaults 64 1024 5 8)");
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: usize| match args.get(i) {
        None => default,
        Some(s) => match s.parse::<usize>() {
            Ok(v) if v > 0 => v,
            _ => usage(),
        },
    };
    let (mib, kib, reps, depth) = (arg(0, 64), arg(1, 1024), arg(2, 5), arg(3, 8));
    if args.len() > 4 || kib << 10 > phase_swarm::v2::frame::MAX_PIECE_BYTES {
        usage();
    }
    let total = mib << 20;
    let bytes = data(total);
    let pieces: Vec<Bytes> = (0..total)
        .step_by(kib << 10)
        .map(|at| bytes.slice(at..(at + (kib << 10)).min(total)))
        .collect();
    println!(
        "{mib} MiB in {} chunks of {kib} KiB, depth {depth}, {reps} repetitions, 2 worker threads",
        pieces.len()
    );
    // BENCH_V2_ONLY=raw|stream|plain|libp2p runs one mode (for a profiler).
    let only = std::env::var("BENCH_V2_ONLY").ok();
    let on = |mode: &str| only.as_deref().is_none_or(|o| o == mode);
    if let Some(o) = &only
        && !["raw", "stream", "plain", "libp2p"].contains(&o.as_str())
    {
        eprintln!("BENCH_V2_ONLY is raw, stream, plain or libp2p, not {o:?}");
        std::process::exit(2);
    }
    let mut pair = Libp2pPair::new().await;
    let (mut raw, mut stream, mut plain, mut p2p) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let show = |r: Option<&Run>| {
        r.map_or("      -                   ".to_string(), |r| {
            format!(
                "{:7.1} MB/s {:5.2} CPU-s/GB",
                r.mbs(total),
                r.cpu_per_gb(total)
            )
        })
    };
    for rep in 1..=reps {
        if on("raw") {
            raw.push(raw_tcp(bytes.clone()).await);
        }
        if on("stream") {
            stream.push(pair.copy(bytes.clone()).await);
        }
        if on("plain") {
            plain.push(v2_plain_tcp(&pieces, depth).await);
        }
        if on("libp2p") {
            p2p.push(pair.run(&pieces, depth).await);
        }
        let last = |v: &Vec<Run>| v.last().copied().filter(|_| v.len() == rep);
        println!(
            "rep {rep}: raw TCP {} | libp2p stream {} | v2 plain TCP {} | v2 libp2p {}",
            show(last(&raw).as_ref()),
            show(last(&stream).as_ref()),
            show(last(&plain).as_ref()),
            show(last(&p2p).as_ref()),
        );
    }
    let line = |name: &str, runs: &[Run], note: &str| {
        if runs.is_empty() {
            return;
        }
        let mbs = median(runs.iter().map(|r| r.mbs(total)).collect());
        let cpu = median(runs.iter().map(|r| r.cpu_per_gb(total)).collect());
        let ratio = if raw.len() == runs.len() && !std::ptr::eq(runs, raw.as_slice()) {
            // Per repetition against the raw copy just before it.
            let r = median(
                runs.iter()
                    .zip(&raw)
                    .map(|(x, r)| r.secs / x.secs)
                    .collect(),
            );
            format!("  ratio {r:.2} of raw")
        } else {
            String::new()
        };
        println!("  {name:<19} {mbs:7.1} MB/s  {cpu:5.2} CPU-s/GB{ratio}{note}");
    };
    println!("medians of {reps}:");
    line("raw TCP copy", &raw, "");
    line(
        "libp2p stream copy",
        &stream,
        " (tcp+noise+yamux, no session)",
    );
    line("v2 over plain TCP", &plain, " (no noise, no yamux)");
    line("v2 over libp2p", &p2p, " (tcp+noise+yamux)");
    for t in pair.tasks {
        t.abort();
    }
}
