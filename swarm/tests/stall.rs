//! Peers that claim every chunk but never deliver (busy for ever), or
//! trickle one chunk every 1.9 s, over real loopback connections: the fetch
//! still finishes, the HTTP seed's rescue carrying what they hold back.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use phase_content::MemStore;
use phase_swarm::{Node, NodeConfig, Source};
use support::{Claim, StoreFallback, hashes, loopback, manifest, spawn_claimer};

/// 1 MiB in 16 KiB chunks: 64 chunks; at one per 1.9 s a trickle alone
/// would take two minutes.
const LEN: usize = 1 << 20;
const CHUNK: u32 = 16 << 10;

async fn fetch_among(claimers: Vec<phase_swarm::Multiaddr>) -> (phase_swarm::FetchReport, f64) {
    let seed_store = Arc::new(MemStore::new());
    let m = manifest(&seed_store, LEN, CHUNK);
    assert_eq!(hashes(&m).len(), 64);
    let node = Node::spawn(
        NodeConfig::default()
            .with_mdns(false)
            .with_dht(false)
            .with_listen(loopback())
            .with_peers(claimers.clone()),
        Arc::new(MemStore::new()),
    )
    .unwrap();
    // Connected to every adversary before the fetch starts.
    let t = Instant::now();
    while node.connected_peers().await.unwrap().len() < claimers.len() {
        assert!(t.elapsed() < Duration::from_secs(30), "adversaries connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        node.fetch(m, Some(Arc::new(StoreFallback(seed_store))), None),
    )
    .await
    .expect("the fetch finished within 60 s")
    .unwrap();
    (report, start.elapsed().as_secs_f64())
}

fn http_bytes(r: &phase_swarm::FetchReport) -> u64 {
    r.sources.get(&Source::HttpSeed).map_or(0, |s| s.bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_busy_for_ever_claimers_do_not_hold_off_the_fetch() {
    let mut claimers = Vec::new();
    for _ in 0..20 {
        claimers.push(spawn_claimer(64, Claim::Busy).await);
    }
    let (report, secs) = fetch_among(claimers).await;
    println!(
        "20 busy claimers: fetch took {secs:.2} s, {} of {LEN} bytes from the HTTP seed",
        http_bytes(&report)
    );
    assert_eq!(report.bytes, LEN as u64);
    assert_eq!(http_bytes(&report), LEN as u64, "{:?}", report.sources);
    assert!(secs < 30.0, "took {secs:.1} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_peer_does_not_hold_off_the_rescue() {
    let store = Arc::new(MemStore::new());
    let m = manifest(&store, LEN, CHUNK);
    let claim = Claim::Trickle {
        store,
        hashes: hashes(&m),
        every: Duration::from_millis(1900),
    };
    let mut claimers = vec![spawn_claimer(64, claim).await];
    for _ in 0..5 {
        claimers.push(spawn_claimer(64, Claim::Busy).await);
    }
    let (report, secs) = fetch_among(claimers).await;
    let http = http_bytes(&report);
    println!(
        "trickle (1 chunk / 1.9 s) + 5 busy: fetch took {secs:.2} s, {http} bytes from the HTTP seed"
    );
    assert_eq!(report.bytes, LEN as u64);
    // The trickle alone would need 64 x 1.9 s = 122 s.
    assert!(secs < 30.0, "took {secs:.1} s");
    assert!(http > (LEN as u64) / 2, "{:?}", report.sources);
}
