//! Loopback throughput: a raw TCP copy of F bytes, one fetcher pulling the
//! same bytes from one peer, and from four peers. All in one process.
//!
//! `cargo run --release -p phase-swarm --example bench -- [MiB] [chunk KiB]`

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use phase_content::publish::{chunk_bytes, sign_artifacts};
use phase_content::{MemStore, SecretKey, SignedManifest};
use phase_swarm::{Handle, Multiaddr, Node, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn manifest(store: &MemStore, data: &[u8], cs: u32) -> SignedManifest {
    let key = SecretKey::from_seed([5; 32]);
    let art = chunk_bytes("kernel", data, store, cs).unwrap();
    sign_artifacts(&key, "stable", "x86_64", 1, vec![art]).unwrap()
}

fn cfg() -> NodeConfig {
    // BENCH_IN_FLIGHT: requests in flight per peer (default: the scheduler's).
    let mut sc = phase_swarm::scheduler::SchedulerConfig::default();
    if let Some(n) = std::env::var("BENCH_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        sc = sc.with_per_peer_in_flight(n);
    }
    NodeConfig::default()
        .with_scheduler(sc)
        .with_max_serving(64)
        .with_mdns(false)
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
}

async fn tcp_copy(bytes: Arc<Vec<u8>>) -> Duration {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let send = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&bytes).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let start = Instant::now();
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = c.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let t = start.elapsed();
    send.await.unwrap();
    assert!(got > 0);
    t
}

async fn swarm_fetch(m: &SignedManifest, seeders: &[(Handle, Multiaddr)]) -> (Duration, usize) {
    let peers = seeders.iter().map(|(_, a)| a.clone()).collect();
    let f = Node::spawn(cfg().with_peers(peers), Arc::new(MemStore::new())).unwrap();
    // Wait until connected to every seeder, so the timing is the transfer.
    while f.connected_peers().await.unwrap().len() < seeders.len() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = f.fetch(m.clone(), None, None).await.unwrap();
    let used = r.sources.values().filter(|p| p.chunks > 0).count();
    (r.wall, used)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(128);
    let kib: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let bytes = Arc::new(data(mib << 20));
    let store = Arc::new(MemStore::new());
    let m = manifest(&store, &bytes, kib << 10);
    let mbs = |d: Duration| (mib << 20) as f64 / 1e6 / d.as_secs_f64();

    let tcp = tcp_copy(bytes.clone()).await;
    println!(
        "raw TCP copy:      {:8.1} MB/s ({mib} MiB in {tcp:.2?})",
        mbs(tcp)
    );

    let mut seeders = Vec::new();
    for _ in 0..4 {
        let h = Node::spawn(cfg(), store.clone()).unwrap();
        h.seed(m.clone()).await.unwrap();
        let a = h.listen_addrs().await.unwrap()[0].clone();
        let a = a.with_p2p(h.peer_id()).unwrap();
        seeders.push((h, a));
    }
    let (one, _) = swarm_fetch(&m, &seeders[..1]).await;
    println!(
        "swarm, one peer:   {:8.1} MB/s ({kib} KiB chunks; {:.2} of raw TCP)",
        mbs(one),
        tcp.as_secs_f64() / one.as_secs_f64()
    );
    let (four, used) = swarm_fetch(&m, &seeders).await;
    println!(
        "swarm, four peers: {:8.1} MB/s aggregate ({used} peers sent chunks)",
        mbs(four)
    );
}
