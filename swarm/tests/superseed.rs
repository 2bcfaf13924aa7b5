//! A last fetcher among complete super-seeders gets its last chunk, with no
//! HTTP seed to rescue it (the self-hosting loop once the seed is gone).
//!
//! A complete node offers only its least-sent chunks, and its offer widens
//! only when every chunk has gone out once more. Here the only holder has
//! sent chunk 0 once and every other chunk never, and the last fetcher lacks
//! chunk 0 alone: nobody else asks, so the round never rises. An idle upload
//! therefore serves and advertises all it holds (`serving.rs`).

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use phase_content::{ChunkStore, MemStore};
use phase_swarm::{Node, NodeConfig, Source};
use support::{addr, artifacts, hashes, loopback, manifest};

const CHUNK: u32 = 16 << 10;
const CHUNKS: usize = 16;
const WAIT: Duration = Duration::from_secs(30);

/// A v1 node that finds peers only in `peers` (no mDNS, no DHT).
fn cfg(peers: Vec<libp2p::Multiaddr>) -> NodeConfig {
    NodeConfig::default()
        .with_mdns(false)
        .with_dht(false)
        .with_listen(loopback())
        .with_peers(peers)
}

/// A store holding every chunk of `seed_store` but the first.
fn all_but_first(seed_store: &MemStore, m: &phase_content::SignedManifest) -> Arc<MemStore> {
    let s = Arc::new(MemStore::new());
    for h in hashes(m).iter().skip(1) {
        s.put(h, &seed_store.get(h).unwrap().unwrap()).unwrap();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_fetcher_gets_a_chunk_its_only_holder_sent_more_than_others() {
    let seed_store = MemStore::new();
    let m = manifest(&seed_store, CHUNKS * CHUNK as usize, CHUNK);
    let want = artifacts(&seed_store, &m);
    let seed_store = Arc::new(seed_store);
    // Super-seeding on, as every complete node has it by default.
    let seed = Node::spawn(cfg(Vec::new()), seed_store.clone()).unwrap();
    seed.seed(m.clone()).await.unwrap();
    let seed_addr = addr(&seed).await;

    // The first fetcher lacks chunk 0 only: the seed sends it chunk 0, so
    // chunk 0 has gone out once and chunks 1.. never.
    let first_store = all_but_first(&seed_store, &m);
    let first = Node::spawn(cfg(vec![seed_addr.clone()]), first_store.clone()).unwrap();
    let r = tokio::time::timeout(WAIT, first.fetch(m.clone(), None, None))
        .await
        .expect("the first fetch finished within 30 s")
        .unwrap();
    assert_eq!(
        r.bytes,
        u64::from(CHUNK),
        "the first fetcher got chunk 0 alone"
    );
    assert_eq!(artifacts(first_store.as_ref(), &m), want);
    // It leaves, so the seed is the only holder the last fetcher knows.
    drop(first);

    // The last fetcher lacks chunk 0 too, and has no HTTP seed to fall back on.
    let last_store = all_but_first(&seed_store, &m);
    let last = Node::spawn(cfg(vec![seed_addr]), last_store.clone()).unwrap();
    let r = tokio::time::timeout(WAIT, last.fetch(m.clone(), None, None))
        .await
        .expect("the last fetcher got chunk 0 from an idle super-seeder within 30 s")
        .unwrap();
    assert_eq!(r.bytes, u64::from(CHUNK));
    assert_eq!(
        r.sources.keys().copied().collect::<Vec<_>>(),
        vec![Source::Peer(seed.peer_id())]
    );
    assert_eq!(artifacts(last_store.as_ref(), &m), want, "byte-identical");
}
