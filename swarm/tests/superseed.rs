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

use libp2p::request_response::ProtocolSupport;
use phase_content::{ChunkStore, MemStore};
use phase_swarm::protocol::{Request, Response, encode_request, unpack_bits};
use phase_swarm::{Node, NodeConfig, Source};
use support::{Raw, addr, artifacts, hashes, loopback, manifest, peer, response};

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

/// A node that completed its fetch does not super-seed: it is one holder
/// among many, and the chunks it relayed while fetching are the ones it
/// would withhold. Here node A fetched everything from the seed, then
/// served chunk 0 to peer B; peer C, asking right after (A's upload was
/// busy within the last 2 s), sees every chunk in A's have-map and gets
/// chunk 0. (Were A super-seeding, chunk 0, sent once while the others
/// were never sent, would be left out of the map and refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fetched_does_not_super_seed() {
    let seed_store = MemStore::new();
    let m = manifest(&seed_store, CHUNKS * CHUNK as usize, CHUNK);
    let hashes = hashes(&m);
    let root = *m.root().as_bytes();
    let seed_store = Arc::new(seed_store);
    let seed = Node::spawn(cfg(Vec::new()), seed_store.clone()).unwrap();
    seed.seed(m.clone()).await.unwrap();
    let a = Node::spawn(cfg(vec![addr(&seed).await]), Arc::new(MemStore::new())).unwrap();
    tokio::time::timeout(WAIT, a.fetch(m.clone(), None, None))
        .await
        .expect("A's fetch finished within 30 s")
        .unwrap();
    let (a_addr, a_id) = (addr(&a).await, a.peer_id());

    let chunk0 = seed_store.get(&hashes[0]).unwrap().unwrap().to_vec();
    let mut peers = Vec::new();
    for _ in 0..2 {
        let mut p = peer(Raw::default(), ProtocolSupport::Outbound);
        p.dial(a_addr.clone()).unwrap();
        peers.push(p);
    }
    let ask = async |p: &mut support::Peer, req: Request| {
        let id = p
            .behaviour_mut()
            .send_request(&a_id, encode_request(&req).unwrap());
        response(p, id).await
    };
    let [b, c] = &mut peers[..] else {
        unreachable!()
    };
    let Response::Chunks(got) = ask(b, Request::Chunk { root, index: 0 }).await else {
        panic!("A did not serve B chunk 0");
    };
    assert_eq!(got[0].data, chunk0);

    let Response::HaveMap { chunks, bits } = ask(c, Request::HaveMap { root }).await else {
        panic!("no have-map from A");
    };
    assert_eq!(
        unpack_bits(chunks, &bits).unwrap(),
        vec![true; CHUNKS],
        "A offers every chunk, chunk 0 included"
    );
    let Response::Chunks(got) = ask(c, Request::Chunk { root, index: 0 }).await else {
        panic!("A refused C chunk 0");
    };
    assert_eq!(got[0].data, chunk0);
}
