//! Freshness without resending: `Request::LatestAbove` answers a manifest
//! only when it is newer than the asker's, and `Handle::newer_manifest` keeps
//! the manifest a fetcher holds (the seed's, from HTTP) unless a connected
//! peer offers a newer one. A holder of the same manifest sends no bytes of
//! it back (its outbound byte count, against the manifest's size).

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::request_response::ProtocolSupport;
use phase_content::publish::{chunk_bytes, sign_artifacts};
use phase_content::{MemStore, SecretKey, SignedManifest};
use phase_swarm::metrics::{Metrics, Registry};
use phase_swarm::protocol::{Request, Response, encode_request};
use phase_swarm::{Handle, Multiaddr, Node, NodeConfig, PeerId};
use support::{Raw, peer, response};

mod support;

/// Far longer than any answer on loopback takes: a call that waited for it
/// would trip the test's own bound.
const OFFER_WINDOW: Duration = Duration::from_secs(120);
/// The bound on every wait of the test.
const WAIT: Duration = Duration::from_secs(20);

fn key() -> SecretKey {
    SecretKey::from_seed([21; 32])
}

/// Sequence `seq` of stable/x86_64, its chunks in `store`.
fn manifest(store: &MemStore, seq: u64) -> SignedManifest {
    let data: Vec<u8> = (0..64 << 10)
        .map(|i| (i * 7 % 251) as u8 ^ seq as u8)
        .collect();
    let art = chunk_bytes("kernel", &data, store, 16 << 10).unwrap();
    sign_artifacts(&key(), "stable", "x86_64", seq, vec![art]).unwrap()
}

fn cfg() -> NodeConfig {
    NodeConfig::default()
        .with_mdns(false)
        .with_dht(false)
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
}

/// A node seeding sequence `seq`, and its address.
async fn holder(seq: u64) -> (Handle, Multiaddr) {
    let store = MemStore::new();
    let m = manifest(&store, seq);
    let h = Node::spawn(cfg(), Arc::new(store)).unwrap();
    h.seed(m).await.unwrap();
    let a = h.listen_addrs().await.unwrap()[0].clone();
    let a = a.with_p2p(h.peer_id()).unwrap();
    (h, a)
}

/// Dials every address and waits (bounded) until all are connected.
async fn connect(c: &Handle, to: &[(PeerId, Multiaddr)]) {
    for (_, a) in to {
        c.dial(a.clone()).await.unwrap();
    }
    let start = tokio::time::Instant::now();
    let mut look = tokio::time::interval(Duration::from_millis(10));
    loop {
        let now = c.connected_peers().await.unwrap();
        if to.iter().all(|(p, _)| now.contains(p)) {
            return;
        }
        assert!(start.elapsed() < WAIT, "not connected within {WAIT:?}");
        look.tick().await;
    }
}

async fn newer(c: &Handle, known: &SignedManifest) -> u64 {
    let m = tokio::time::timeout(
        WAIT,
        c.newer_manifest(known.clone(), key().public(), OFFER_WINDOW),
    )
    .await
    .expect("an answer long before the offer window ends")
    .unwrap();
    m.manifest().sequence
}

/// The sequence of a manifest answer, or `None` for do-not-have.
fn answered(r: Response) -> Option<u64> {
    match r {
        Response::Manifest(bytes) => Some(
            SignedManifest::verify(&bytes, &key().public())
                .unwrap()
                .manifest()
                .sequence,
        ),
        Response::DoNotHave => None,
        other => panic!("not a manifest answer: {other:?}"),
    }
}

#[tokio::test]
async fn latest_above_answers_only_with_a_newer_manifest() {
    let (seed, seed_addr) = holder(2).await;
    let mut b = peer(Raw::default(), ProtocolSupport::Outbound);
    b.dial(seed_addr).unwrap();
    let mut ask = async |req: Request| {
        let id = b
            .behaviour_mut()
            .send_request(&seed.peer_id(), encode_request(&req).unwrap());
        answered(response(&mut b, id).await)
    };
    let above = |sequence| Request::LatestAbove {
        channel: "stable".into(),
        arch: "x86_64".into(),
        sequence,
    };
    assert_eq!(ask(above(1)).await, Some(2), "2 is newer than 1");
    assert_eq!(
        ask(above(2)).await,
        None,
        "the asker holds 2: no manifest back"
    );
    assert_eq!(ask(above(3)).await, None);
    let latest = Request::Latest {
        channel: "stable".into(),
        arch: "x86_64".into(),
    };
    assert_eq!(ask(latest).await, Some(2), "Latest still answers in full");
    let other = Request::LatestAbove {
        channel: "beta".into(),
        arch: "x86_64".into(),
        sequence: 0,
    };
    assert_eq!(ask(other).await, None, "nothing held for that channel");
}

#[tokio::test]
async fn the_known_manifest_stands_unless_a_peer_offers_a_newer_one() {
    // A "seed" holding what the caller knows: the answer is the known one.
    let (seed, seed_addr) = holder(1).await;
    let c = Node::spawn(cfg(), Arc::new(MemStore::new())).unwrap();
    connect(&c, &[(seed.peer_id(), seed_addr)]).await;
    let known = manifest(&MemStore::new(), 1);
    assert_eq!(newer(&c, &known).await, 1);
    // A peer with a newer one joins: it wins.
    let (peer, peer_addr) = holder(3).await;
    connect(&c, &[(peer.peer_id(), peer_addr)]).await;
    assert_eq!(newer(&c, &known).await, 3);
    // Knowing a newer one than any peer holds, the known one stands.
    let newest = manifest(&MemStore::new(), 5);
    assert_eq!(newer(&c, &newest).await, 5);
}

#[tokio::test]
async fn with_no_peer_connected_the_known_manifest_answers_at_once() {
    // Nobody to ask: the answer must not wait for the offer window.
    let c = Node::spawn(cfg(), Arc::new(MemStore::new())).unwrap();
    let known = manifest(&MemStore::new(), 4);
    assert_eq!(newer(&c, &known).await, 4);
}

/// A registry the node counts into, libp2p's metrics (bandwidth, identify)
/// included.
fn registry() -> (Metrics, Arc<Mutex<Registry>>) {
    let m = Metrics::new();
    let mut r = Registry::with_prefix("plasmd");
    m.register(&mut r);
    (m, Arc::new(Mutex::new(r)))
}

/// The value of the first sample whose line starts with `name`.
fn sample(r: &Mutex<Registry>, name: &str) -> Option<u64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r.lock().unwrap()).unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

const SENT: &str =
    "plasmd_libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp\",direction=\"Outbound\"}";

#[tokio::test]
async fn a_holder_of_the_same_manifest_does_not_send_it_back() {
    // A manifest of 2,048 chunks: its envelope (about 150 KB) dwarfs
    // everything else on the connection, so the holder's outbound bytes
    // show whether it crossed.
    let store = MemStore::new();
    let data: Vec<u8> = (0..8 << 20).map(|i| (i * 13 % 251) as u8).collect();
    let art = chunk_bytes("kernel", &data, &store, 4 << 10).unwrap();
    let m = sign_artifacts(&key(), "stable", "x86_64", 1, vec![art]).unwrap();
    let envelope = m.envelope().len() as u64;
    assert!(envelope > 100_000, "a big envelope: {envelope} bytes");

    let (hm, hr) = registry();
    let h = Node::spawn(cfg().with_metrics(hm, hr.clone()), Arc::new(store)).unwrap();
    h.seed(m.clone()).await.unwrap();
    let h_addr = h.listen_addrs().await.unwrap()[0]
        .clone()
        .with_p2p(h.peer_id())
        .unwrap();
    let (cm, cr) = registry();
    let c = Node::spawn(
        cfg().with_metrics(cm, cr.clone()),
        Arc::new(MemStore::new()),
    )
    .unwrap();
    connect(&c, &[(h.peer_id(), h_addr)]).await;
    // C learns what H lists (identify) before it asks: the node records
    // the event and handles it in one step of its loop.
    let start = tokio::time::Instant::now();
    let mut look = tokio::time::interval(Duration::from_millis(10));
    while sample(&cr, "plasmd_libp2p_identify_received_total").unwrap_or(0) == 0 {
        assert!(start.elapsed() < WAIT, "no identify from the holder");
        look.tick().await;
    }

    let before = sample(&hr, SENT).unwrap();
    assert_eq!(newer(&c, &m).await, 1);
    let above = sample(&hr, SENT).unwrap() - before;
    assert!(
        above < envelope / 10,
        "the holder sent {above} bytes for a manifest of {envelope} the asker holds"
    );

    // The same question without a known manifest (`Latest`) brings it all:
    // the count above would have seen it.
    let before = sample(&hr, SENT).unwrap();
    let got = tokio::time::timeout(
        WAIT,
        c.find_manifest("stable", "x86_64", key().public(), OFFER_WINDOW),
    )
    .await
    .expect("an answer")
    .unwrap();
    assert_eq!(got.manifest().sequence, 1);
    let latest = sample(&hr, SENT).unwrap() - before;
    assert!(
        latest >= envelope,
        "Latest sent {latest} of {envelope} bytes"
    );
}
