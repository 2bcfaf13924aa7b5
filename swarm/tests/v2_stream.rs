//! `/phase/swarm/2` sessions over real libp2p swarms (TCP + noise + yamux +
//! `libp2p_stream`) on 127.0.0.1.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};
use phase_content::publish::{chunk_bytes, sign_artifacts};
use phase_content::{ChunkStore, Hash, MemStore, SecretKey};
use phase_swarm::v2::{Event, Local, PROTOCOL, Session, SessionConfig, SessionHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

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
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// What a swarm's driver reports.
enum Note {
    Listening(Multiaddr),
    Connected(PeerId),
}

/// Drives a swarm in a task, reporting listen addresses and connections.
fn drive(mut s: Swarm<libp2p_stream::Behaviour>, notes: mpsc::Sender<Note>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let note = match s.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => Note::Listening(address),
                SwarmEvent::ConnectionEstablished { peer_id, .. } => Note::Connected(peer_id),
                _ => continue,
            };
            // Bounded: a note nobody waits for is dropped.
            let _ = notes.try_send(note);
        }
    })
}

struct Content {
    data: Vec<u8>,
    root: [u8; 32],
    hashes: Vec<Hash>,
    store: Arc<MemStore>,
}

fn content(len: usize, chunk: u32) -> Content {
    let store = Arc::new(MemStore::new());
    let data: Vec<u8> = (0..len)
        .map(|i| (i * 31 % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    let art = chunk_bytes("kernel", &data, store.as_ref(), chunk).unwrap();
    let hashes = art.chunks.clone();
    let m = sign_artifacts(
        &SecretKey::from_seed([3; 32]),
        "stable",
        "x86_64",
        1,
        vec![art],
    )
    .unwrap();
    Content {
        data,
        root: *m.root().as_bytes(),
        hashes,
        store,
    }
}

/// Two swarms, A listening, B connected; A's side of a session is accepted
/// there, B's opened here.
async fn sessions(
    c: &Content,
    a_have: Vec<bool>,
    cfg: SessionConfig,
) -> (Session, Session, Vec<JoinHandle<()>>) {
    let a = swarm();
    let a_peer: PeerId = *a.local_peer_id();
    let mut a_control = a.behaviour().new_control();
    let mut incoming = a_control.accept(PROTOCOL).unwrap();
    let mut a = a;
    a.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let ta = drive(a, tx);
    let addr = loop {
        if let Note::Listening(a) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            break a;
        }
    };

    let mut b = swarm();
    let mut b_control = b.behaviour().new_control();
    b.dial(addr).unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let tb = drive(b, tx);
    // Open the stream on the established connection (libp2p_stream would
    // otherwise dial on its own, with no address for A).
    loop {
        if let Note::Connected(p) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
            && p == a_peer
        {
            break;
        }
    }

    let chunks = c.hashes.len() as u32;
    let stream = tokio::time::timeout(WAIT, b_control.open_stream(a_peer, PROTOCOL))
        .await
        .unwrap()
        .unwrap();
    let sb = Session::over_libp2p(
        stream,
        cfg.clone(),
        Local {
            root: c.root,
            chunks,
            have: vec![false; chunks as usize],
        },
    )
    .unwrap();
    let (_, stream) = tokio::time::timeout(WAIT, incoming.next())
        .await
        .unwrap()
        .unwrap();
    let sa = Session::over_libp2p(
        stream,
        cfg,
        Local {
            root: c.root,
            chunks,
            have: a_have,
        },
    )
    .unwrap();
    (sa, sb, vec![ta, tb])
}

async fn next(s: &mut Session) -> Event {
    tokio::time::timeout(WAIT, s.events.recv())
        .await
        .expect("no event within 30 s")
        .expect("event channel closed")
}

async fn serve(h: &SessionHandle, store: &MemStore, hash: &Hash, chunk: u32) {
    let data: Bytes = store.get(hash).unwrap().unwrap();
    h.serve(chunk, data).await.unwrap();
}

#[derive(Debug, PartialEq)]
enum Log {
    Got(Event),
    Sent(u32),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_have_arrives_before_the_request_and_the_bytes_match() {
    // 16 chunks of 64 KiB; A holds the first half when the session opens.
    let c = content(16 << 16, 64 << 10);
    let half = 8u32;
    let a_have: Vec<bool> = (0..16).map(|i| i < half).collect();
    let (mut sa, mut sb, tasks) = sessions(&c, a_have.clone(), SessionConfig::default()).await;

    // A's owner: serves what it holds; once B has asked for the whole first
    // half, it gains the second half (haves pushed) and keeps the answer to
    // chunk 7 back until B asks for a gained chunk, so that request is
    // pipelined behind an outstanding one.
    let store = c.store.clone();
    let hashes = c.hashes.clone();
    let owner_a = tokio::spawn(async move {
        let mut held = a_have;
        let mut asked = 0;
        let mut unheld_asks = 0;
        let mut gained = false;
        let mut seven_held_back = true;
        loop {
            match next(&mut sa).await {
                Event::Requested(ch) if !held[ch as usize] => {
                    unheld_asks += 1;
                    sa.handle.do_not_have(ch).await.unwrap();
                }
                Event::Requested(ch) => {
                    if ch >= half && seven_held_back {
                        seven_held_back = false;
                        serve(&sa.handle, &store, &hashes[7], 7).await;
                    }
                    if ch != 7 {
                        serve(&sa.handle, &store, &hashes[ch as usize], ch).await;
                    }
                    asked += 1;
                    if asked == half && !gained {
                        gained = true;
                        for g in half..16 {
                            held[g as usize] = true;
                            sa.handle.have(g).await.unwrap();
                        }
                    }
                }
                Event::Ended(_) => return unheld_asks,
                _ => {}
            }
        }
    });

    // B's owner: asks only for what A announced, up to the depth.
    let mut log = Vec::new();
    let mut known = Vec::new();
    let mut got: HashMap<u32, Bytes> = HashMap::new();
    let mut asked = [false; 16];
    while got.len() < 16 {
        let ev = next(&mut sb).await;
        match &ev {
            Event::Opened { have, .. } => known = have.clone(),
            Event::Have(list) => {
                for &i in list {
                    known[i as usize] = true;
                }
            }
            Event::Piece { chunk, data } => {
                assert_eq!(Hash::of(data), c.hashes[*chunk as usize], "chunk {chunk}");
                got.insert(*chunk, data.clone());
            }
            other => panic!("B got {other:?}"),
        }
        log.push(Log::Got(ev));
        for i in 0..16u32 {
            if known.get(i as usize) == Some(&true)
                && !asked[i as usize]
                && sb.handle.free_slots() > 0
            {
                sb.handle.request(i).await.unwrap();
                asked[i as usize] = true;
                log.push(Log::Sent(i));
            }
        }
    }

    // The session opened with the second half missing on A.
    let Some(Log::Got(Event::Opened { have, .. })) = log.first() else {
        panic!("first event was not Opened: {:?}", log.first());
    };
    assert_eq!(have.iter().filter(|h| **h).count(), half as usize);
    let pos = |want: &dyn Fn(&Log) -> bool| log.iter().position(want);
    for g in half..16 {
        let have_at = pos(&|l| matches!(l, Log::Got(Event::Have(v)) if v.contains(&g)))
            .unwrap_or_else(|| panic!("no Have for chunk {g} in {log:?}"));
        let sent_at = pos(&|l| *l == Log::Sent(g)).unwrap();
        assert!(
            have_at < sent_at,
            "chunk {g}: have at {have_at}, request at {sent_at}"
        );
    }
    // The first request for a gained chunk went out while chunk 7 was still
    // outstanding: pipelined, not after the answers.
    let first_gained = pos(&|l| matches!(l, Log::Sent(g) if *g >= half)).unwrap();
    let piece7 = pos(&|l| matches!(l, Log::Got(Event::Piece { chunk: 7, .. }))).unwrap();
    assert!(first_gained < piece7, "{log:?}");

    let mut whole = Vec::new();
    for i in 0..16 {
        whole.extend_from_slice(&got[&i]);
    }
    assert!(whole == c.data, "reassembled bytes differ");

    sb.handle.close().await.unwrap();
    let unheld = tokio::time::timeout(WAIT, owner_a).await.unwrap().unwrap();
    assert_eq!(unheld, 0, "B asked A for chunks A had not announced");
    for t in tasks {
        t.abort();
    }
}

/// Process CPU seconds (user + system) so far, from /proc/self/stat.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3. Clock ticks of 100 Hz.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

async fn raw_tcp_copy(total: usize) -> Duration {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let buf = vec![7u8; 1 << 20];
    let writer = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        for _ in 0..total / buf.len() {
            s.write_all(&buf).await.unwrap();
        }
        s.shutdown().await.unwrap();
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    let mut b = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = s.read(&mut b).await.unwrap();
        if k == 0 {
            break;
        }
        n += k;
    }
    let took = t.elapsed();
    writer.await.unwrap();
    assert_eq!(n, total);
    took
}

/// 64 MiB in 1 MiB chunks through one session, printed beside a raw TCP copy
/// over loopback (the target is at least 0.35 of it; not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_beside_a_raw_tcp_copy() {
    const MIB: usize = 1 << 20;
    let total = 64 * MIB;
    let c = content(total, MIB as u32);
    let n = c.hashes.len() as u32;
    let cfg = SessionConfig::default().with_depth(8);
    let (mut sa, mut sb, tasks) = sessions(&c, vec![true; n as usize], cfg).await;
    let store = c.store.clone();
    let hashes = c.hashes.clone();
    let owner_a = tokio::spawn(async move {
        loop {
            match next(&mut sa).await {
                Event::Requested(ch) => serve(&sa.handle, &store, &hashes[ch as usize], ch).await,
                Event::Ended(_) => return,
                _ => {}
            }
        }
    });
    assert!(matches!(next(&mut sb).await, Event::Opened { .. }));
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let mut asked = 0u32;
    let mut got: Vec<Option<Bytes>> = vec![None; n as usize];
    let mut received = 0;
    while received < n {
        while asked < n && sb.handle.free_slots() > 0 {
            sb.handle.request(asked).await.unwrap();
            asked += 1;
        }
        match next(&mut sb).await {
            Event::Piece { chunk, data } => {
                got[chunk as usize] = Some(data);
                received += 1;
            }
            other => panic!("B got {other:?}"),
        }
    }
    let took = t.elapsed();
    let cpu = cpu0.zip(cpu_seconds()).map(|(a, b)| b - a);
    for (i, d) in got.iter().enumerate() {
        let d = d.as_ref().unwrap();
        assert_eq!(d.len(), MIB);
        assert!(d[..] == c.data[i * MIB..(i + 1) * MIB], "chunk {i} differs");
    }
    sb.handle.close().await.unwrap();
    tokio::time::timeout(WAIT, owner_a).await.unwrap().unwrap();
    for t in tasks {
        t.abort();
    }

    let raw = raw_tcp_copy(total).await;
    let mbs = |d: Duration| total as f64 / MIB as f64 / d.as_secs_f64();
    let cpu_per_gb = cpu.map(|c| c * (1u64 << 30) as f64 / total as f64);
    println!(
        "swarm/2 session: 64 MiB in {:.3} s = {:.0} MiB/s ({} CPU-s/GiB, both ends); raw TCP copy: {:.3} s = {:.0} MiB/s; ratio {:.2}",
        took.as_secs_f64(),
        mbs(took),
        cpu_per_gb.map_or("?".into(), |c| format!("{c:.2}")),
        raw.as_secs_f64(),
        mbs(raw),
        raw.as_secs_f64() / took.as_secs_f64(),
    );
}
