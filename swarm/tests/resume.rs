//! A retry resumes: when the caller of `Handle::fetch` gives up (drops the
//! future, as PID 1's timeout does), the next fetch on the same node replaces
//! the abandoned one and downloads only the chunks still missing.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use phase_content::publish::{chunk_bytes, sign_artifacts};
use phase_content::{ChunkStore, Hash, MemStore, SecretKey, SignedManifest};
use phase_swarm::{FetchProgress, Node, NodeConfig, Source};
use tokio::sync::watch;

const CHUNK: usize = 16 << 10;
const CHUNKS: usize = 200;
/// Chunks the seed serves before it stalls.
const BUDGET: i64 = 8;

/// A seed's store that serves `budget` chunks, then answers "do not have"
/// until opened: the first fetch stops part-way, deterministically, however
/// fast loopback is.
struct Gated {
    inner: MemStore,
    budget: AtomicI64,
}

impl Gated {
    fn open(&self) {
        self.budget.store(i64::MAX / 2, Ordering::SeqCst);
    }
}

impl ChunkStore for Gated {
    fn has(&self, hash: &Hash) -> bool {
        self.inner.has(hash)
    }
    fn get(&self, hash: &Hash) -> Result<Option<Bytes>, phase_content::Error> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) > 0 {
            self.inner.get(hash)
        } else {
            Ok(None)
        }
    }
    fn put(&self, hash: &Hash, data: &[u8]) -> Result<bool, phase_content::Error> {
        self.inner.put(hash, data)
    }
}

fn manifest(store: &MemStore) -> SignedManifest {
    let key = SecretKey::from_seed([5; 32]);
    let data: Vec<u8> = (0..CHUNK * CHUNKS)
        .map(|i| (i * 7 % 253) as u8 ^ (i >> 14) as u8)
        .collect();
    let art = chunk_bytes("kernel", &data, store, CHUNK as u32).unwrap();
    sign_artifacts(&key, "stable", "x86_64", 1, vec![art]).unwrap()
}

fn cfg() -> NodeConfig {
    NodeConfig::default()
        .with_mdns(false)
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
}

#[tokio::test]
async fn a_new_fetch_replaces_an_abandoned_one_and_resumes() {
    let inner = MemStore::new();
    let m = manifest(&inner);
    let gated = Arc::new(Gated {
        inner,
        budget: AtomicI64::new(BUDGET),
    });
    // Without super-seeding every chunk is offered, so the budget alone decides.
    let seed = Node::spawn(cfg().with_super_seed(false), gated.clone()).unwrap();
    seed.seed(m.clone()).await.unwrap();
    let addr = seed.listen_addrs().await.unwrap()[0].clone();
    let addr = addr.with_p2p(seed.peer_id()).unwrap();

    let store = Arc::new(MemStore::new());
    let node = Node::spawn(cfg().with_peers(vec![addr]), store.clone()).unwrap();

    // The first fetch: given up once it holds what the seed will serve.
    let (tx, mut rx) = watch::channel(FetchProgress::default());
    let first = node.fetch(m.clone(), None, Some(tx));
    let held = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::pin!(first);
        loop {
            tokio::select! {
                r = &mut first => panic!("the first fetch ended although the seed stalled: {r:?}"),
                changed = rx.changed() => {
                    changed.expect("progress channel open while fetching");
                    let p = rx.borrow_and_update().clone();
                    if p.held as i64 >= BUDGET {
                        return p;
                    }
                }
            }
        }
    })
    .await
    .expect("the first fetch made progress within 30 s");
    assert_eq!((held.held, held.total), (BUDGET as usize, CHUNKS));

    // The retry, on the same node and store. Its command is queued by the
    // first poll; commands are handled in order, so once the next one is
    // answered the retry has replaced the abandoned fetch, and only then may
    // the seed serve again (else the abandoned one could finish by itself).
    let second = node.fetch(m.clone(), None, None);
    tokio::pin!(second);
    assert!(futures::poll!(&mut second).is_pending());
    node.connected_peers().await.unwrap();
    gated.open();
    let report = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the retry finished within 60 s")
        .expect("the retry is not refused as 'another fetch is running'");

    let whole = (CHUNK * CHUNKS) as u64;
    let missing = whole - BUDGET as u64 * CHUNK as u64;
    assert!(
        report.bytes < whole,
        "the retry downloaded {} of {whole} bytes: it did not resume",
        report.bytes
    );
    assert!(
        report.bytes >= missing,
        "the retry got {} bytes, less than the {missing} still missing",
        report.bytes
    );
    assert_eq!(
        report.sources.keys().copied().collect::<Vec<_>>(),
        vec![Source::Peer(seed.peer_id())]
    );
    let art = &m.manifest().artifacts[0];
    assert!(
        art.chunks.iter().all(|h| store.has(h)),
        "every chunk is in the store"
    );
}
