//! Bad input over protocol v2 (`/phase/swarm/2`) on real loopback sockets: a
//! raw attacker built with `libp2p_stream` writes hand-made frames (the
//! crate's own `v2::frame` encoder) to v2 nodes. The offender is blocked like
//! a v1 offender (`bans_total` by reason, its re-connections closed while
//! blocked), and an honest v2 fetch beside it completes byte-identical. An
//! honest storm on a super-seeding seed with one upload slot blocks no one.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};
use phase_content::{ChunkStore, MemStore, SignedManifest};
use phase_swarm::metrics::{Metrics, Registry, SharedRegistry};
use phase_swarm::protocol::pack_bits;
use phase_swarm::v2::{Frame, FrameCodec, Limits, PROTOCOL};
use phase_swarm::{FetchProgress, FetchReport, Handle, Node, NodeConfig, Protocol};
use support::{StoreFallback, addr, artifacts, loopback, manifest};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

const WAIT: Duration = Duration::from_secs(20);

std::thread_local! {
    /// Which attack a failure message is about.
    static STEP: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

fn step(n: u32) {
    STEP.with(|s| s.set(n));
}
const FETCH_WAIT: Duration = Duration::from_secs(60);

/// A v2 node's config on loopback, counting into its own registry.
fn v2(peers: Vec<Multiaddr>) -> (NodeConfig, SharedRegistry) {
    let m = Metrics::new();
    let mut r = Registry::with_prefix("plasmd");
    m.register(&mut r);
    let r: SharedRegistry = Arc::new(Mutex::new(r));
    let cfg = NodeConfig::default()
        .with_mdns(false)
        .with_dht(false)
        .with_listen(loopback())
        .with_peers(peers)
        .with_protocol(Protocol::V2)
        .with_metrics(m, r.clone());
    (cfg, r)
}

/// `bans_total{reason}` of a node's registry.
fn bans(r: &SharedRegistry, reason: &str) -> u64 {
    let text = phase_swarm::metrics::encode(r);
    let key = format!("plasmd_bans_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Every `bans_total` line with a non-zero count.
fn any_bans(r: &SharedRegistry) -> Vec<String> {
    phase_swarm::metrics::encode(r)
        .lines()
        .filter(|l| l.starts_with("plasmd_bans_total{") && !l.ends_with(" 0"))
        .map(str::to_owned)
        .collect()
}

/// What the attacker's swarm reports.
#[derive(Debug)]
enum Note {
    Connected(PeerId),
    Closed(PeerId),
}

/// A raw v2 peer: a libp2p swarm with only `libp2p_stream`, driven by its
/// own task; it never accepts streams.
struct Attacker {
    control: libp2p_stream::Control,
    dial: mpsc::Sender<Multiaddr>,
    notes: mpsc::Receiver<Note>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn attacker() -> Attacker {
    let mut s: Swarm<libp2p_stream::Behaviour> = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let control = s.behaviour().new_control();
    let (dial, mut dials) = mpsc::channel::<Multiaddr>(4);
    let (tx, notes) = mpsc::channel(256);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(a) = dials.recv() => { let _ = s.dial(a); }
                ev = s.select_next_some() => {
                    let note = match ev {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } => Note::Connected(peer_id),
                        SwarmEvent::ConnectionClosed { peer_id, .. } => Note::Closed(peer_id),
                        _ => continue,
                    };
                    let _ = tx.try_send(note);
                }
            }
        }
    });
    Attacker {
        control,
        dial,
        notes,
        task,
    }
}

impl Attacker {
    async fn note(&mut self, what: &str, mut pred: impl FnMut(&Note) -> bool) {
        tokio::time::timeout(WAIT, async {
            loop {
                let n = self.notes.recv().await.unwrap();
                if pred(&n) {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    async fn connect(&mut self, addr: &Multiaddr, peer: PeerId) {
        self.dial.send(addr.clone()).await.unwrap();
        self.note(
            "a connection",
            |n| matches!(n, Note::Connected(p) if *p == peer),
        )
        .await;
    }

    async fn closed(&mut self, peer: PeerId) {
        let what = format!("the node to drop us (step {})", STEP.with(|s| s.get()));
        self.note(&what, |n| matches!(n, Note::Closed(p) if *p == peer))
            .await;
    }

    /// A v2 stream to `peer`, framed by the crate's codec.
    async fn open(&mut self, peer: PeerId) -> Framed<Compat<libp2p::Stream>, FrameCodec> {
        let s = tokio::time::timeout(WAIT, self.control.open_stream(peer, PROTOCOL))
            .await
            .unwrap()
            .unwrap();
        Framed::new(s.compat(), FrameCodec::new(Limits::default()))
    }

    /// Blocked: a new connection is established, then closed by the node.
    async fn refused(&mut self, addr: &Multiaddr, peer: PeerId) {
        self.connect(addr, peer).await;
        self.closed(peer).await;
    }
}

/// The honest fetch beside an attack, as its user sees it: finished in time,
/// every byte there and byte-identical, nobody banned, still connected to
/// the `server` that was attacked.
async fn honest_done(
    fetch: tokio::task::JoinHandle<Result<FetchReport, phase_swarm::Error>>,
    honest: &Handle,
    server: &Handle,
    store: &dyn ChunkStore,
    m: &SignedManifest,
    want: &[Vec<u8>],
) -> FetchReport {
    let report = tokio::time::timeout(FETCH_WAIT, fetch)
        .await
        .expect("honest fetch finished")
        .unwrap()
        .unwrap();
    assert_eq!(report.bytes, 4 << 20);
    assert!(report.banned.is_empty());
    assert_eq!(artifacts(store, m), want, "byte-identical");
    assert!(
        server
            .connected_peers()
            .await
            .unwrap()
            .contains(&honest.peer_id()),
        "the honest peer stays connected"
    );
    report
}

fn hello(m: &SignedManifest, chunks: u32, depth: u16) -> Frame {
    Frame::Hello {
        root: *m.root().as_bytes(),
        chunks,
        depth,
        bits: pack_bits(&vec![false; chunks as usize]).into(),
    }
}

fn chunks(m: &SignedManifest) -> u32 {
    m.manifest()
        .artifacts
        .iter()
        .map(|a| a.chunks.len())
        .sum::<usize>() as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversize_and_over_depth_v2_frames_block_the_sender_only() {
    let started = Instant::now();
    let seed_store = Arc::new(MemStore::new());
    let m = manifest(&seed_store, 4 << 20, 16 << 10);
    let n = chunks(&m);
    let want = artifacts(seed_store.as_ref(), &m);
    let (cfg, reg) = v2(Vec::new());
    let seed = Node::spawn(cfg, seed_store.clone() as Arc<dyn ChunkStore>).unwrap();
    seed.seed(m.clone()).await.unwrap();
    let seed_addr = addr(&seed).await;
    let sp = seed.peer_id();

    // An honest v2 fetcher runs beside the attacks.
    let honest_store = Arc::new(MemStore::new());
    let (hcfg, hreg) = v2(vec![seed_addr.clone()]);
    let honest = Node::spawn(hcfg, honest_store.clone() as Arc<dyn ChunkStore>).unwrap();
    let fetch = {
        let (h, m) = (honest.clone(), m.clone());
        tokio::spawn(async move { h.fetch(m, None, None).await })
    };

    step(1);
    // 1. A stream whose first frame is garbage, not a hello (long enough
    // for the node to read a hello's head).
    let mut a = attacker();
    a.connect(&seed_addr, sp).await;
    let mut s = a.open(sp).await;
    // A write may fail once the node has blocked us: what counts is the close.
    let _ = s.get_mut().write_all(&[0xee; 64]).await;
    let _ = s.get_mut().flush().await;
    a.closed(sp).await;
    a.refused(&seed_addr, sp).await;

    step(2);
    // 2. A hello, then a frame that claims 4 GiB.
    let mut a = attacker();
    a.connect(&seed_addr, sp).await;
    let mut s = a.open(sp).await;
    s.send(hello(&m, n, 8)).await.unwrap();
    let _ = s.get_mut().write_all(&u32::MAX.to_be_bytes()).await;
    let _ = s.get_mut().flush().await;
    a.closed(sp).await;
    a.refused(&seed_addr, sp).await;

    step(3);
    // 3. A hello with another chunk count for the same root.
    let mut a = attacker();
    a.connect(&seed_addr, sp).await;
    let mut s = a.open(sp).await;
    let _ = s.send(hello(&m, n - 1, 8)).await;
    a.closed(sp).await;

    step(4);
    // 4. Far more requests at once than the depth the seed told.
    let mut a = attacker();
    a.connect(&seed_addr, sp).await;
    let mut s = a.open(sp).await;
    s.feed(hello(&m, n, 8)).await.unwrap();
    for c in 0..200 {
        if s.feed(Frame::Request(c)).await.is_err() {
            break;
        }
    }
    let _ = s.flush().await;
    a.closed(sp).await;
    a.refused(&seed_addr, sp).await;

    step(5);
    // 5. Streams opened in a flood (each about a root the seed does not
    // hold, never finishing a hello).
    let mut a = attacker();
    a.connect(&seed_addr, sp).await;
    let mut kept = Vec::new();
    let dropped = tokio::time::timeout(WAIT, async {
        for _ in 0..200 {
            match a.control.open_stream(sp, PROTOCOL).await {
                Ok(s) => kept.push(s),
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(dropped.is_ok(), "opening streams never failed");
    a.closed(sp).await;
    a.refused(&seed_addr, sp).await;
    drop(kept);

    assert_eq!(
        bans(&reg, "malformed"),
        4,
        "{}",
        phase_swarm::metrics::encode(&reg)
    );
    assert_eq!(bans(&reg, "flood"), 1);

    // The honest fetcher is unaffected.
    let report = honest_done(fetch, &honest, &seed, honest_store.as_ref(), &m, &want).await;
    assert!(any_bans(&hreg).is_empty(), "{:?}", any_bans(&hreg));

    // And a fetcher that arrives after the attacks is served as before.
    let late_store = Arc::new(MemStore::new());
    let (lcfg, lreg) = v2(vec![seed_addr.clone()]);
    let late = Node::spawn(lcfg, late_store.clone() as Arc<dyn ChunkStore>).unwrap();
    let late_report = tokio::time::timeout(FETCH_WAIT, late.fetch(m.clone(), None, None))
        .await
        .expect("late fetch finished")
        .unwrap();
    assert_eq!(late_report.bytes, 4 << 20);
    assert_eq!(artifacts(late_store.as_ref(), &m), want, "byte-identical");
    assert!(any_bans(&lreg).is_empty(), "{:?}", any_bans(&lreg));
    assert_eq!(
        bans(&reg, "malformed") + bans(&reg, "flood"),
        5,
        "no honest peer blocked"
    );
    println!(
        "5 v2 attacks blocked, honest fetches {:.2} s and {:.2} s, test {:.2} s",
        report.wall.as_secs_f64(),
        late_report.wall.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_v2_requests_the_node_refuses_blocks_the_sender_only() {
    let started = Instant::now();
    // The attacked node holds the first half of the chunks: it got them from
    // an HTTP seed that has only those, and is still fetching the rest.
    let full = Arc::new(MemStore::new());
    let m = manifest(&full, 4 << 20, 16 << 10);
    let n = chunks(&m);
    let want = artifacts(full.as_ref(), &m);
    let half = Arc::new(MemStore::new());
    let hashes = &m.manifest().artifacts[0].chunks;
    for h in &hashes[..(n / 2) as usize] {
        half.put(h, &full.get(h).unwrap().unwrap()).unwrap();
    }
    let (cfg, reg) = v2(Vec::new());
    let node = Node::spawn(cfg, Arc::new(MemStore::new()) as Arc<dyn ChunkStore>).unwrap();
    let (ptx, mut prx) = watch::channel(FetchProgress::default());
    let partial = {
        let (h, m) = (node.clone(), m.clone());
        let fb = Arc::new(StoreFallback(half.clone()));
        tokio::spawn(async move { h.fetch(m, Some(fb), Some(ptx)).await })
    };
    tokio::time::timeout(FETCH_WAIT, prx.wait_for(|p| p.held == (n / 2) as usize))
        .await
        .expect("the node got the first half")
        .unwrap();
    let node_addr = addr(&node).await;
    let np = node.peer_id();

    // An honest v2 fetcher takes what the node holds (and the rest from
    // its HTTP seed) beside the attack.
    let honest_store = Arc::new(MemStore::new());
    let (hcfg, hreg) = v2(vec![node_addr.clone()]);
    let honest = Node::spawn(hcfg, honest_store.clone() as Arc<dyn ChunkStore>).unwrap();
    let fetch = {
        let (h, m) = (honest.clone(), m.clone());
        let fb = Arc::new(StoreFallback(full.clone()));
        tokio::spawn(async move { h.fetch(m, Some(fb), None).await })
    };

    // The attacker keeps within the told depth, so no single frame breaks
    // the protocol, but asks only for chunks the node never offered it.
    // Under load the connection was seen closed before the attacker's
    // first byte (2 in about 60 runs, cause not found; nothing had been
    // sent, so no limit of ours was involved): a fresh attacker then.
    let mut tries = 0;
    let (mut a, mut s, depth, bits) = loop {
        tries += 1;
        assert!(tries <= 3, "no session with the node in 3 tries");
        let mut a = attacker();
        a.connect(&node_addr, np).await;
        let mut s = a.open(np).await;
        if s.send(hello(&m, n, 8)).await.is_err() {
            continue;
        }
        match tokio::time::timeout(WAIT, s.next()).await.unwrap() {
            Some(Ok(Frame::Hello { depth, bits, .. })) => break (a, s, depth, bits),
            Some(Ok(f)) => panic!("{f:?} before hello"),
            None | Some(Err(_)) => continue,
        }
    };
    assert_eq!(
        bits.as_ref(),
        pack_bits(&(0..n).map(|i| i < n / 2).collect::<Vec<_>>()).as_slice(),
        "the node offers what it holds"
    );
    let window = u32::from(depth).min(8);
    let (mut sent, mut refused, mut outstanding) = (0u32, 0u32, 0u32);
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            while outstanding < window && sent < 2_000 {
                let c = n / 2 + sent % (n / 2);
                if s.send(Frame::Request(c)).await.is_err() {
                    return;
                }
                sent += 1;
                outstanding += 1;
            }
            match s.next().await {
                Some(Ok(Frame::DoNotHave(_))) => {
                    refused += 1;
                    outstanding -= 1;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "{refused} refusals and still served");
    a.closed(np).await;
    a.refused(&node_addr, np).await;
    assert!(
        refused <= 33,
        "blocked after the 33rd refusal, got {refused}"
    );
    assert_eq!(
        bans(&reg, "flood"),
        1,
        "{}",
        phase_swarm::metrics::encode(&reg)
    );
    assert_eq!(bans(&reg, "malformed"), 0);

    let report = honest_done(fetch, &honest, &node, honest_store.as_ref(), &m, &want).await;
    assert_eq!(any_bans(&reg).len(), 1, "{:?}", any_bans(&reg));
    assert!(any_bans(&hreg).is_empty(), "{:?}", any_bans(&hreg));
    partial.abort();
    println!(
        "flooder blocked after {refused} refusals, honest fetch {:.2} s, test {:.2} s",
        report.wall.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_v2_storm_on_a_super_seeding_seed_with_one_slot_blocks_no_one() {
    // A storm's shape: a super-seeding seed (the default) with one upload
    // slot, so fetchers are choked, refused off-offer chunks, re-ask
    // withdrawn ones and serve each other. No node may block anyone.
    let started = Instant::now();
    let seed_store = Arc::new(MemStore::new());
    let m = manifest(&seed_store, 4 << 20, 16 << 10);
    let want = artifacts(seed_store.as_ref(), &m);
    let (cfg, seed_reg) = v2(Vec::new());
    let seed = Node::spawn(
        cfg.with_max_serving(1),
        seed_store.clone() as Arc<dyn ChunkStore>,
    )
    .unwrap();
    seed.seed(m.clone()).await.unwrap();
    let mut peers = vec![addr(&seed).await];
    let mut fetchers = Vec::new();
    for _ in 0..5 {
        let store = Arc::new(MemStore::new());
        let (cfg, reg) = v2(peers.clone());
        let h = Node::spawn(cfg, store.clone() as Arc<dyn ChunkStore>).unwrap();
        peers.push(addr(&h).await);
        fetchers.push((h, store, reg));
    }
    let runs: Vec<_> = fetchers
        .iter()
        .map(|(h, _, _)| {
            let (h, m) = (h.clone(), m.clone());
            tokio::spawn(
                async move { tokio::time::timeout(FETCH_WAIT, h.fetch(m, None, None)).await },
            )
        })
        .collect();
    for (run, (_, store, _)) in runs.into_iter().zip(&fetchers) {
        let report = run.await.unwrap().expect("finished within 60 s").unwrap();
        assert!(report.banned.is_empty(), "{:?}", report.banned);
        assert_eq!(artifacts(store.as_ref(), &m), want, "byte-identical");
    }
    assert!(
        any_bans(&seed_reg).is_empty(),
        "seed: {:?}",
        any_bans(&seed_reg)
    );
    for (_, _, reg) in &fetchers {
        assert!(any_bans(reg).is_empty(), "fetcher: {:?}", any_bans(reg));
    }
    // Chokes the fetchers got: the storm exercised the choked path.
    let choked: u64 = fetchers
        .iter()
        .map(|(_, _, reg)| {
            phase_swarm::metrics::encode(reg)
                .lines()
                .find_map(|l| l.strip_prefix("plasmd_busy_answers_total{direction=\"received\"} "))
                .map_or(0, |v| v.trim().parse::<u64>().unwrap())
        })
        .sum();
    println!(
        "storm of 5 on v2: {:.2} s, {choked} chokes received, no bans",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_peer_that_does_not_read_its_pieces_is_blocked() {
    // 1 MiB chunks: more than yamux lets a stream have unread, so the
    // pieces cannot all leave while the attacker reads nothing.
    let seed_store = Arc::new(MemStore::new());
    let m = manifest(&seed_store, 8 << 20, 1 << 20);
    let n = chunks(&m);
    let want = artifacts(seed_store.as_ref(), &m);
    let (cfg, reg) = v2(Vec::new());
    let seed = Node::spawn(cfg, seed_store.clone() as Arc<dyn ChunkStore>).unwrap();
    seed.seed(m.clone()).await.unwrap();
    let seed_addr = addr(&seed).await;
    let sp = seed.peer_id();

    let mut a = attacker();
    a.connect(&seed_addr, sp).await;
    let mut s = a.open(sp).await;
    s.send(hello(&m, n, 8)).await.unwrap();
    let Frame::Hello { depth, .. } = tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    else {
        panic!("no hello first");
    };
    for c in 0..u32::from(depth).min(n) {
        s.feed(Frame::Request(c)).await.unwrap();
    }
    s.flush().await.unwrap();
    let asked = Instant::now();

    // An honest fetch meanwhile.
    let honest_store = Arc::new(MemStore::new());
    let (hcfg, hreg) = v2(vec![seed_addr.clone()]);
    let honest = Node::spawn(hcfg, honest_store.clone() as Arc<dyn ChunkStore>).unwrap();
    let report = tokio::time::timeout(FETCH_WAIT, honest.fetch(m.clone(), None, None))
        .await
        .expect("honest fetch finished")
        .unwrap();
    assert_eq!(artifacts(honest_store.as_ref(), &m), want, "byte-identical");
    assert!(any_bans(&hreg).is_empty(), "{:?}", any_bans(&hreg));

    a.closed(sp).await;
    let after = asked.elapsed();
    // The stall is timed from the seed's write, which may start a moment
    // before `asked` was read here.
    assert!(
        after >= Duration::from_millis(4_500),
        "dropped after {after:?}"
    );
    a.refused(&seed_addr, sp).await;
    assert_eq!(
        bans(&reg, "unread"),
        1,
        "{}",
        phase_swarm::metrics::encode(&reg)
    );
    assert_eq!(any_bans(&reg).len(), 1, "{:?}", any_bans(&reg));
    drop(s);
    println!(
        "unread v2 pieces: reader blocked after {:.2} s, honest fetch {:.2} s",
        after.as_secs_f64(),
        report.wall.as_secs_f64()
    );
}
