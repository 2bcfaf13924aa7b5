//! `NodeConfig::dht` is what `phase.mode` means: with the DHT on
//! (`internet`) a node given only a bootstrap finds the holder of a manifest
//! through the bootstrap's provider records; with it off (`lan`) the same node
//! never learns of the holder, and fetches once it is dialed directly (as
//! `phase.peers` would).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use phase_content::publish::{chunk_bytes, sign_artifacts};
use phase_content::{ChunkStore, MemStore, SecretKey, SignedManifest};
use phase_swarm::{FetchProgress, Handle, Multiaddr, Node, NodeConfig, PeerId, Source};
use tokio::sync::watch;

const CHUNK: usize = 16 << 10;
const CHUNKS: usize = 64;
/// Generous for loopback; the fetch itself takes well under a second.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

fn manifest(store: &MemStore) -> SignedManifest {
    let key = SecretKey::from_seed([11; 32]);
    let data: Vec<u8> = (0..CHUNK * CHUNKS)
        .map(|i| (i * 13 % 251) as u8 ^ (i >> 14) as u8)
        .collect();
    let art = chunk_bytes("kernel", &data, store, CHUNK as u32).unwrap();
    sign_artifacts(&key, "stable", "x86_64", 1, vec![art]).unwrap()
}

fn cfg() -> NodeConfig {
    NodeConfig::default()
        .with_mdns(false)
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
}

async fn addr(h: &Handle) -> Multiaddr {
    let a = h.listen_addrs().await.unwrap()[0].clone();
    a.with_p2p(h.peer_id()).unwrap()
}

async fn connected(h: &Handle) -> BTreeSet<PeerId> {
    h.connected_peers().await.unwrap().into_iter().collect()
}

#[tokio::test]
async fn internet_finds_the_holder_through_the_dht_and_lan_does_not() {
    // A: the bootstrap, holding nothing.
    let a = Node::spawn(cfg(), Arc::new(MemStore::new())).unwrap();
    let a_addr = addr(&a).await;

    // B: holds every chunk and knows A. Its first announcement may run before
    // it is connected to A, so it re-announces often; every chunk is offered
    // (no super-seeding) so the second fetcher is not held back by what the
    // first one already took.
    let b_store = MemStore::new();
    let m = manifest(&b_store);
    let mut b_cfg = cfg()
        .with_peers(vec![a_addr.clone()])
        .with_super_seed(false);
    b_cfg.provide_interval = Duration::from_millis(500);
    let b = Node::spawn(b_cfg, Arc::new(b_store)).unwrap();
    b.seed(m.clone()).await.unwrap();
    let b_addr = addr(&b).await;
    let whole = (CHUNK * CHUNKS) as u64;

    // Internet: C knows only A; B is found through A's provider records.
    let c = Node::spawn(
        cfg().with_peers(vec![a_addr.clone()]),
        Arc::new(MemStore::new()),
    )
    .unwrap();
    let report = tokio::time::timeout(FETCH_TIMEOUT, c.fetch(m.clone(), None, None))
        .await
        .expect("the internet-mode fetch finished within 30 s")
        .unwrap();
    assert_eq!(
        report.sources.keys().copied().collect::<Vec<_>>(),
        vec![Source::Peer(b.peer_id())],
        "every byte came from B, whom C could only have found through the DHT"
    );
    assert!(
        report.bytes >= whole,
        "C got {} of {whole} bytes",
        report.bytes
    );

    // Lan: D knows only A, and must never walk A's DHT to B (or to C, which
    // now holds everything too and announced it).
    let d_store = Arc::new(MemStore::new());
    let d_cfg = cfg().with_peers(vec![a_addr]).with_dht(false);
    let window = 3 * d_cfg.lookup_interval;
    let d = Node::spawn(d_cfg, d_store.clone()).unwrap();
    let (tx, mut rx) = watch::channel(FetchProgress::default());
    let fetch = d.fetch(m.clone(), None, Some(tx));
    tokio::pin!(fetch);
    // The one bounded wait: three DHT lookup intervals, in which an
    // internet-mode node found B above. Progress is sent per verified chunk,
    // so any change is a chunk D should not have.
    let quiet: Result<(), _> = tokio::time::timeout(window, async {
        tokio::select! {
            r = &mut fetch => panic!("the lan-mode fetch finished knowing only the bootstrap: {r:?}"),
            changed = rx.changed() => {
                changed.expect("progress channel open while fetching");
                let p = rx.borrow_and_update().clone();
                panic!("the lan-mode node got a chunk knowing only the bootstrap: {p:?}");
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "the window ended by timing out");
    assert!(
        m.manifest().artifacts[0]
            .chunks
            .iter()
            .all(|h| !d_store.has(h)),
        "D holds no chunk after {window:?}"
    );
    assert_eq!(
        connected(&d).await,
        BTreeSet::from([a.peer_id()]),
        "D is connected to the bootstrap only"
    );
    assert!(
        !connected(&b).await.contains(&d.peer_id()),
        "B never connected to D"
    );

    // Dialing B directly, as `phase.peers` would, completes the same fetch.
    d.dial(b_addr).await.unwrap();
    let report = tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .expect("the lan-mode fetch finished within 30 s of dialing B")
        .unwrap();
    assert_eq!(
        report.sources.keys().copied().collect::<Vec<_>>(),
        vec![Source::Peer(b.peer_id())]
    );
    assert!(
        m.manifest().artifacts[0]
            .chunks
            .iter()
            .all(|h| d_store.has(h)),
        "every chunk is in D's store"
    );
}
