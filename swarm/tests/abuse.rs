//! Bad input over a real loopback connection: a raw libp2p client sends
//! oversized frames, garbage and request floods to a seeding node. The
//! offender is dropped, memory stays bounded, and an honest fetcher beside it
//! completes.

#![allow(clippy::unwrap_used)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::prelude::*;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};
use phase_content::publish::{chunk_bytes, sign_artifacts};
use phase_content::{MemStore, SecretKey, SignedManifest};
use phase_swarm::protocol::{PROTOCOL, Request, Response, decode_response, encode_request};
use phase_swarm::{Handle, Limits, Node, NodeConfig};
use tokio::sync::{mpsc, watch};

/// Sends raw bytes as a request and hands back whatever bytes come back.
#[derive(Clone, Default)]
struct Raw;

impl request_response::Codec for Raw {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(1 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; 64];
        // Read only the head of an answer: a flooder does not drain answers.
        let n = io.read(&mut v).await?;
        v.truncate(n);
        if v.len() < 16 {
            io.take(64).read_to_end(&mut v).await?;
        }
        if v.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(v)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&res).await?;
        io.close().await
    }
}

type Attacker = Swarm<request_response::Behaviour<Raw>>;

fn attacker() -> Attacker {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                Raw,
                [(StreamProtocol::new(PROTOCOL), ProtocolSupport::Outbound)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(10))
                    .with_max_concurrent_streams(1000),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Runs the attacker's swarm until `pred` says stop, or panics after 20 s.
async fn until<T>(
    s: &mut Attacker,
    what: &str,
    mut pred: impl FnMut(SwarmEvent<request_response::Event<Vec<u8>, Vec<u8>>>) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(t) = pred(s.select_next_some().await) {
                return t;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn connect(s: &mut Attacker, addr: &Multiaddr) -> PeerId {
    s.dial(addr.clone()).unwrap();
    until(s, "connection", |e| match e {
        SwarmEvent::ConnectionEstablished { peer_id, .. } => Some(peer_id),
        _ => None,
    })
    .await
}

async fn closed(s: &mut Attacker, peer: PeerId) {
    until(s, "the server to drop us", |e| match e {
        SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == peer => Some(()),
        _ => None,
    })
    .await
}

/// A manifest of `len` pseudo-random bytes in 16 KiB chunks, all in `store`.
fn manifest(store: &MemStore, len: usize) -> SignedManifest {
    let key = SecretKey::from_seed([3; 32]);
    let data: Vec<u8> = (0..len)
        .map(|i| (i * 31 % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    let cs = 16 << 10;
    let art = chunk_bytes("kernel", &data, store, cs).unwrap();
    sign_artifacts(&key, "stable", "x86_64", 1, vec![art]).unwrap()
}

fn loopback() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]
}

async fn server(len: usize) -> (Handle, Multiaddr, SignedManifest) {
    let store = MemStore::new();
    let m = manifest(&store, len);
    let h = Node::spawn(
        NodeConfig::default()
            .with_mdns(false)
            .with_listen(loopback()),
        Arc::new(store),
    )
    .unwrap();
    h.seed(m.clone()).await.unwrap();
    let addr = h.listen_addrs().await.unwrap()[0].clone();
    (h, addr, m)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The tests here measure the process's peak RSS: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resets the peak RSS (`VmHWM`) to the current RSS, so a peak measured
/// next is this test's own.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5")
        .expect("resetting VmHWM via /proc/self/clear_refs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_garbage_and_floods_drop_the_offender_only() {
    let _serial = SERIAL.lock().await;
    let (srv, addr, m) = server(4 << 20).await;
    let root = *m.root().as_bytes();
    let full = addr.clone().with_p2p(srv.peer_id()).unwrap();

    // An honest fetcher runs beside the attacks.
    let honest = Node::spawn(
        NodeConfig::default()
            .with_mdns(false)
            .with_listen(loopback())
            .with_peers(vec![full.clone()]),
        Arc::new(MemStore::new()),
    )
    .unwrap();
    let fetch = {
        let (h, m) = (honest.clone(), m.clone());
        tokio::spawn(async move { h.fetch(m, None, None).await })
    };

    let rss_before = peak_rss_kib();

    // 1. A frame that claims 4 GiB, followed by 64 MiB of junk.
    let mut a = attacker();
    let p = connect(&mut a, &addr).await;
    let mut frame = vec![0xff, 0xff, 0xff, 0xff];
    frame.extend(std::iter::repeat_n(0u8, 64 << 20));
    a.behaviour_mut().send_request(&p, frame);
    closed(&mut a, p).await;
    // Blocked: a new connection is dropped at once.
    let p = connect(&mut a, &addr).await;
    closed(&mut a, p).await;

    // 2. A well-framed message that is not a request.
    let mut a = attacker();
    let p = connect(&mut a, &addr).await;
    let mut garbage = vec![0, 0, 0, 8];
    garbage.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xfe, 0xed, 0xfa, 0xce]);
    a.behaviour_mut().send_request(&p, garbage);
    closed(&mut a, p).await;

    // 3. Requests for what the server does not have are answered, cheaply.
    let mut a = attacker();
    let p = connect(&mut a, &addr).await;
    for req in [
        Request::Chunk {
            root: [9; 32],
            index: 0,
        },
        Request::HaveMap { root: [9; 32] },
        Request::Chunk {
            root,
            index: 1_000_000,
        },
    ] {
        a.behaviour_mut()
            .send_request(&p, encode_request(&req).unwrap());
        let resp = until(&mut a, "an answer", |e| match e {
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            }) => Some(response),
            _ => None,
        })
        .await;
        let resp = decode_response(&resp).unwrap();
        assert!(
            matches!(resp, Response::DoNotHave | Response::Refused(_)),
            "{req:?} -> {resp:?}"
        );
    }

    // 4. A flood: hundreds of chunk requests at once.
    let req = encode_request(&Request::Range {
        root,
        start: 0,
        count: 64,
    })
    .unwrap();
    for _ in 0..500 {
        a.behaviour_mut().send_request(&p, req.clone());
    }
    closed(&mut a, p).await;

    // Bounded: the 4 GiB claim and the flood cost far less than they asked for.
    let grown_mib = peak_rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 256, "peak RSS grew by {grown_mib} MiB");

    // The honest fetcher is unaffected.
    let report = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("honest fetch finished")
        .unwrap()
        .unwrap();
    assert_eq!(report.bytes, 4 << 20);
    assert!(report.banned.is_empty());
    assert!(
        srv.connected_peers()
            .await
            .unwrap()
            .contains(&honest.peer_id()),
        "the honest peer stays connected"
    );
}

/// How long a flooder in the fresh-identities test waits for the seed to drop it.
const FLOOD_DROP_WAIT: Duration = Duration::from_secs(10);

/// What became of one attacker in the fresh-identities test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// The seed refused its connection (over the cap).
    Refused,
    /// It flooded and the seed dropped it.
    FloodDropped,
    /// It flooded and was still connected [`FLOOD_DROP_WAIT`] later.
    FloodKept,
    /// It only held its connection, to the end.
    Held,
    /// It only held its connection, and was dropped.
    HoldDropped,
}

/// One attacker with a fresh identity. It connects and proves it was
/// admitted with one cheap request (a refused connection is closed by the
/// seed before any answer), reports that, waits for `phase` 1, then floods
/// (or only holds its connection) until the seed drops it or `phase` is 2.
/// Starts `n` [`fresh_attacker`]s (attacker `i` floods if `flood(i)`) and
/// waits until each knows whether it was let in: their tasks and how many were.
async fn wave(
    addr: &Multiaddr,
    root: [u8; 32],
    n: usize,
    flood: impl Fn(usize) -> bool,
    phase: &watch::Receiver<u8>,
) -> (Vec<tokio::task::JoinHandle<Fate>>, usize) {
    let (adm_tx, mut adm_rx) = mpsc::channel(n);
    let tasks = (0..n)
        .map(|i| {
            tokio::spawn(fresh_attacker(
                addr.clone(),
                root,
                flood(i),
                adm_tx.clone(),
                phase.clone(),
            ))
        })
        .collect();
    drop(adm_tx);
    let mut admitted = 0;
    for _ in 0..n {
        let ok = tokio::time::timeout(Duration::from_secs(60), adm_rx.recv())
            .await
            .expect("every attacker knew within 60 s whether it was let in")
            .expect("attacker tasks alive");
        admitted += usize::from(ok);
    }
    (tasks, admitted)
}

async fn fresh_attacker(
    addr: Multiaddr,
    root: [u8; 32],
    flood: bool,
    admitted: mpsc::Sender<bool>,
    mut phase: watch::Receiver<u8>,
) -> Fate {
    let bound = Duration::from_secs(30);
    let mut a = attacker();
    a.dial(addr).unwrap();
    let peer = tokio::time::timeout(bound, async {
        loop {
            match a.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => return Some(peer_id),
                SwarmEvent::OutgoingConnectionError { .. } => return None,
                _ => {}
            }
        }
    })
    .await
    .expect("the dial ended within 30 s");
    let ok = match peer {
        None => false,
        Some(p) => {
            a.behaviour_mut()
                .send_request(&p, encode_request(&Request::HaveMap { root }).unwrap());
            tokio::time::timeout(bound, async {
                loop {
                    match a.select_next_some().await {
                        SwarmEvent::Behaviour(request_response::Event::Message {
                            message: request_response::Message::Response { .. },
                            ..
                        }) => return true,
                        SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                            ..
                        })
                        | SwarmEvent::ConnectionClosed { .. } => return false,
                        _ => {}
                    }
                }
            })
            .await
            .expect("the admission check ended within 30 s")
        }
    };
    admitted.send(ok).await.unwrap();
    let (Some(p), true) = (peer, ok) else {
        return Fate::Refused;
    };
    // Keep the connection driven while the others connect.
    let mut dropped = false;
    while *phase.borrow_and_update() == 0 && !dropped {
        tokio::select! {
            _ = phase.changed() => {}
            e = a.select_next_some() => dropped = matches!(e, SwarmEvent::ConnectionClosed { .. }),
        }
    }
    if flood && !dropped {
        // Real chunks first (each holds an upload slot and is never read),
        // then ranges, which the seed refuses at once.
        for index in 0..64 {
            a.behaviour_mut()
                .send_request(&p, encode_request(&Request::Chunk { root, index }).unwrap());
        }
        let range = encode_request(&Request::Range {
            root,
            start: 0,
            count: 64,
        })
        .unwrap();
        for _ in 0..200 {
            a.behaviour_mut().send_request(&p, range.clone());
        }
    }
    // A holder stays until the test ends. A flooder waits for the seed to
    // drop it, however soon the honest fetch ends (it can end before the
    // seed has read every flood on a loaded machine), up to FLOOD_DROP_WAIT.
    let give_up = tokio::time::Instant::now() + FLOOD_DROP_WAIT;
    while !dropped && (flood || *phase.borrow_and_update() < 2) {
        tokio::select! {
            _ = phase.changed(), if !flood => {}
            _ = tokio::time::sleep_until(give_up), if flood => break,
            e = a.select_next_some() => dropped = matches!(e, SwarmEvent::ConnectionClosed { .. }),
        }
    }
    match (flood, dropped) {
        (true, true) => Fate::FloodDropped,
        (true, false) => Fate::FloodKept,
        (false, false) => Fate::Held,
        (false, true) => Fate::HoldDropped,
    }
}

/// 50 attackers, each a fresh libp2p identity (a ban by peer id costs them
/// nothing), connect to a seed whose incoming cap is below 50; half of
/// those let in flood it with requests, half only hold their connections.
/// A fetch by an honest peer that was connected first completes with the
/// very bytes published, the seed never has more connections than its cap,
/// and the process's peak resident memory grows by less than 64 MiB (50
/// attacker swarms, the seed and the fetcher all live in this process).
/// Afterwards the flooders' address is refused: more fresh identities from
/// it are turned away although slots are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_fresh_identities_flooding_do_not_stop_an_honest_fetch() {
    let _serial = SERIAL.lock().await;
    const ATTACKERS: usize = 50;
    const CAP: u32 = 32;
    const RSS_BOUND_MIB: u64 = 64;
    let len = 8 << 20;
    let store = MemStore::new();
    let m = manifest(&store, len);
    let data: Vec<u8> = (0..len)
        .map(|i| (i * 31 % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    let root = *m.root().as_bytes();
    let srv = Node::spawn(
        NodeConfig::default()
            .with_mdns(false)
            .with_listen(loopback())
            .with_limits(Limits::default().with_max_established_incoming(CAP)),
        Arc::new(store),
    )
    .unwrap();
    srv.seed(m.clone()).await.unwrap();
    let addr = srv.listen_addrs().await.unwrap()[0].clone();

    // The honest peer connects before the attack (a booting machine that
    // dialed the seed's `/swarm` address); its fetch starts with the flood.
    let honest_store = Arc::new(MemStore::new());
    let honest = Node::spawn(
        NodeConfig::default()
            .with_mdns(false)
            .with_listen(loopback())
            .with_peers(vec![addr.clone().with_p2p(srv.peer_id()).unwrap()]),
        honest_store.clone(),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !srv
            .connected_peers()
            .await
            .unwrap()
            .contains(&honest.peer_id())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the honest peer connected within 20 s");

    reset_peak_rss();
    let rss_before = peak_rss_kib();
    let (phase_tx, phase_rx) = watch::channel(0u8);
    let (tasks, admitted) = wave(&addr, root, ATTACKERS, |i| i % 2 == 0, &phase_rx).await;
    let peak_during_connect = srv.connected_peers().await.unwrap().len();

    // The flood and the honest fetch start together; the seed's connection
    // count is sampled throughout.
    let started = std::time::Instant::now();
    let fetch = {
        let (h, m) = (honest.clone(), m.clone());
        tokio::spawn(async move { h.fetch(m, None, None).await })
    };
    phase_tx.send(1).unwrap();
    let sampler = {
        let srv = srv.clone();
        let mut phase = phase_tx.subscribe();
        tokio::spawn(async move {
            let mut peak = 0;
            let mut every = tokio::time::interval(Duration::from_millis(20));
            while *phase.borrow_and_update() < 2 {
                tokio::select! {
                    _ = every.tick() => peak = peak.max(srv.connected_peers().await.unwrap().len()),
                    _ = phase.changed() => {}
                }
            }
            peak
        })
    };
    let report = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("the honest fetch finished within 60 s")
        .unwrap()
        .unwrap();
    let fetch_time = started.elapsed();
    let grown_mib = peak_rss_kib().saturating_sub(rss_before) / 1024;
    let still = srv.connected_peers().await.unwrap();
    phase_tx.send(2).unwrap();
    let peak = sampler.await.unwrap().max(peak_during_connect);
    let mut fates = Vec::new();
    for t in tasks {
        fates.push(
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("attacker ended within 30 s")
                .unwrap(),
        );
    }
    let count = |f: Fate| fates.iter().filter(|x| **x == f).count();
    println!(
        "attackers {ATTACKERS}: admitted {admitted}, refused {}, flooders dropped {}, \
         flooders kept {}, holders kept {}, holders dropped {}; seed cap {CAP}, peak \
         connections {peak}; honest fetch {} bytes in {fetch_time:?}; peak RSS grew {grown_mib} MiB",
        count(Fate::Refused),
        count(Fate::FloodDropped),
        count(Fate::FloodKept),
        count(Fate::Held),
        count(Fate::HoldDropped),
        report.bytes,
    );

    // The cap held: the honest peer had one slot, the attackers the rest.
    assert_eq!(admitted, CAP as usize - 1, "attackers let in");
    assert_eq!(count(Fate::Refused), ATTACKERS - admitted);
    assert!(
        peak <= CAP as usize,
        "the seed had {peak} connections, cap {CAP}"
    );
    // Every flooder that got in was dropped; the honest peer was not.
    assert_eq!(count(Fate::FloodKept), 0, "{fates:?}");
    assert!(count(Fate::FloodDropped) > 0);
    assert!(
        still.contains(&honest.peer_id()),
        "the honest peer stays connected"
    );
    assert!(report.banned.is_empty());
    // Byte-identical.
    let mut got = Vec::new();
    phase_content::reassemble(&*honest_store, &m.manifest().artifacts[0], &mut got).unwrap();
    assert!(
        got == data,
        "the fetched bytes differ from the published ones"
    );
    assert!(
        grown_mib < RSS_BOUND_MIB,
        "peak RSS grew by {grown_mib} MiB (bound {RSS_BOUND_MIB})"
    );

    // More fresh identities from the flooders' address are turned away now
    // (offences from many peer ids ban the address), although the seed has
    // free slots again; the honest peer, connected from that same address,
    // stays.
    const RETRIES: usize = 10;
    let free = CAP as usize - srv.connected_peers().await.unwrap().len();
    assert!(free >= RETRIES, "{free} free slots");
    let (_phase_tx, phase_rx) = watch::channel(2u8);
    let (retries, readmitted) = wave(&addr, root, RETRIES, |_| false, &phase_rx).await;
    for t in retries {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("retry ended within 30 s")
            .unwrap();
    }
    println!("afterwards {RETRIES} more fresh identities: {readmitted} let in, {free} slots free");
    assert_eq!(
        readmitted, 0,
        "fresh identities from a banned address let in"
    );
    assert!(
        srv.connected_peers()
            .await
            .unwrap()
            .contains(&honest.peer_id()),
        "the honest peer stays connected"
    );
}
