//! Real nodes on 127.0.0.1 fetching over protocol v2 (`/phase/swarm/2`,
//! `NodeConfig::with_protocol(Protocol::V2)`): sessions per peer, pushed
//! haves, pipelined requests.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use phase_content::{ChunkStore, Hash, MemStore};
use phase_swarm::{FetchReport, Multiaddr, Node, NodeConfig, PeerId, Protocol, Source};
use support::{StoreFallback, addr, artifacts, loopback, manifest};

const WAIT: Duration = Duration::from_secs(60);

fn v2(peers: Vec<Multiaddr>) -> NodeConfig {
    NodeConfig::default()
        .with_mdns(false)
        .with_dht(false)
        .with_listen(loopback())
        .with_peers(peers)
        .with_protocol(Protocol::V2)
}

fn from(r: &FetchReport, peers: &[PeerId]) -> u64 {
    peers
        .iter()
        .filter_map(|p| r.sources.get(&Source::Peer(*p)))
        .map(|s| s.bytes)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_and_three_fetchers_on_v2_complete_byte_identical_sharing_among_themselves() {
    // 4 MiB in 16 KiB chunks: 256 chunks. One upload slot at the seed, so
    // fetchers must serve each other to finish.
    let seed_store = Arc::new(MemStore::new());
    let m = manifest(&seed_store, 4 << 20, 16 << 10);
    let want = artifacts(seed_store.as_ref(), &m);
    let seed = Node::spawn(
        v2(Vec::new()).with_max_serving(1),
        seed_store.clone() as Arc<dyn ChunkStore>,
    )
    .unwrap();
    seed.seed(m.clone()).await.unwrap();

    // Each fetcher dials the seed and the fetchers started before it.
    let mut peers = vec![addr(&seed).await];
    let mut fetchers = Vec::new();
    for _ in 0..3 {
        let store = Arc::new(MemStore::new());
        let h = Node::spawn(v2(peers.clone()), store.clone() as Arc<dyn ChunkStore>).unwrap();
        peers.push(addr(&h).await);
        fetchers.push((h, store));
    }
    let ids: Vec<PeerId> = fetchers.iter().map(|(h, _)| h.peer_id()).collect();
    let runs: Vec<_> = fetchers
        .iter()
        .map(|(h, _)| {
            let (h, m) = (h.clone(), m.clone());
            tokio::spawn(async move { tokio::time::timeout(WAIT, h.fetch(m, None, None)).await })
        })
        .collect();
    let mut from_fetchers = Vec::new();
    for (run, (_, store)) in runs.into_iter().zip(&fetchers) {
        let report = run
            .await
            .unwrap()
            .expect("the fetch finished within 60 s")
            .unwrap();
        assert!(report.bytes >= 4 << 20, "{report:?}");
        assert!(report.banned.is_empty(), "{:?}", report.banned);
        assert_eq!(artifacts(store.as_ref(), &m), want, "byte-identical");
        let seed_bytes = from(&report, &[seed.peer_id()]);
        let peer_bytes = from(&report, &ids);
        println!(
            "fetcher: {:.2} s, {seed_bytes} bytes from the seed, {peer_bytes} from other fetchers",
            report.wall.as_secs_f64()
        );
        assert_eq!(
            seed_bytes + peer_bytes,
            report.bytes,
            "{:?}",
            report.sources
        );
        from_fetchers.push(peer_bytes);
    }
    assert!(
        from_fetchers.iter().any(|b| *b > 0),
        "no fetcher got a chunk from another fetcher: {from_fetchers:?}"
    );
}

/// A store that claims every chunk of what it was given and hands out
/// wrong bytes for each.
struct Liar(MemStore);

impl ChunkStore for Liar {
    fn has(&self, hash: &Hash) -> bool {
        self.0.has(hash)
    }
    fn get(&self, hash: &Hash) -> Result<Option<Bytes>, phase_content::Error> {
        Ok(self.0.get(hash)?.map(|b| {
            let mut v = b.to_vec();
            v[0] ^= 0xff;
            Bytes::from(v)
        }))
    }
    fn put(&self, hash: &Hash, data: &[u8]) -> Result<bool, phase_content::Error> {
        self.0.put(hash, data)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_on_v2_is_banned_and_the_http_seed_completes_the_fetch() {
    let honest = Arc::new(MemStore::new());
    let m = manifest(&honest, 1 << 20, 16 << 10);
    let want = artifacts(honest.as_ref(), &m);
    let lying = MemStore::new();
    manifest(&lying, 1 << 20, 16 << 10);
    let liar = Node::spawn(v2(Vec::new()), Arc::new(Liar(lying))).unwrap();
    liar.seed(m.clone()).await.unwrap();

    // The liar is the only peer, so it is asked first; the HTTP seed is the
    // rescue once it is banned.
    let store = Arc::new(MemStore::new());
    let fetcher = Node::spawn(
        v2(vec![addr(&liar).await]),
        store.clone() as Arc<dyn ChunkStore>,
    )
    .unwrap();
    let report = tokio::time::timeout(
        WAIT,
        fetcher.fetch(m.clone(), Some(Arc::new(StoreFallback(honest))), None),
    )
    .await
    .expect("the fetch finished within 60 s")
    .unwrap();
    println!(
        "liar: fetch took {:.2} s, banned {:?}, sources {:?}",
        report.wall.as_secs_f64(),
        report.banned,
        report.sources
    );
    assert_eq!(report.banned, vec![liar.peer_id()]);
    assert!(
        !report.sources.contains_key(&Source::Peer(liar.peer_id())),
        "no byte of the liar's counted: {:?}",
        report.sources
    );
    assert_eq!(
        report.sources.get(&Source::HttpSeed).map(|s| s.bytes),
        Some(1 << 20),
        "{:?}",
        report.sources
    );
    assert_eq!(artifacts(store.as_ref(), &m), want, "byte-identical");
}
