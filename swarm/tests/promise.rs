//! A fetching node promises the chunks on their way to it (`NodeConfig::promise`):
//! its have-map lists a chunk it has asked a seed for, and a request for that
//! chunk waits at it until the bytes arrive, instead of being refused and
//! asked again after the next have-map pull.
//!
//! The seed here is a raw libp2p peer that holds node A's chunk requests until
//! the test lets them go, so every step is ordered by the test: B sees the
//! promise while the seed still holds the only copy, B's request is held at A
//! (A's `chunk_requests_waiting` gauge), and B gets the chunk only after the
//! seed answers A. A promise that is not kept ends in a refusal, not a hang.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use phase_content::{ChunkStore, Hash, MemStore};
use phase_swarm::metrics::{Metrics, Registry};
use phase_swarm::protocol::{
    Piece, Request, Response, encode_request, encode_response, unpack_bits,
};
use phase_swarm::{Node, NodeConfig};
use support::{Raw, addr, claim_all, hashes, loopback, manifest, peer, request_of, response};
use tokio::sync::mpsc;

const CHUNK: u32 = 16 << 10;
const CHUNKS: usize = 4;
const WAIT: Duration = Duration::from_secs(20);

/// What the holding seed does with the chunk requests it holds.
enum Let {
    Serve,
    Refuse,
}

/// A seed that claims every chunk and holds each chunk request until told;
/// reports every chunk index asked. Returns its address.
async fn holding_seed(
    store: Arc<MemStore>,
    hashes: Vec<Hash>,
) -> (Multiaddr, mpsc::Receiver<u32>, mpsc::Sender<Let>) {
    let mut s = peer(Raw::default(), ProtocolSupport::Inbound);
    let a = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = s.select_next_some().await {
            break address;
        }
    };
    let full = a.with_p2p(*s.local_peer_id()).unwrap();
    let (asked_tx, asked) = mpsc::channel(64);
    let (let_tx, mut let_rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut held: Vec<(ResponseChannel<Vec<u8>>, u32)> = Vec::new();
        loop {
            tokio::select! {
                ev = s.select_next_some() => {
                    let Some((request, channel)) = request_of(ev) else { continue };
                    let resp = match claim_all(CHUNKS, &request) {
                        Ok(resp) => resp,
                        Err(index) => {
                            held.push((channel, index));
                            let _ = asked_tx.try_send(index);
                            continue;
                        }
                    };
                    let _ = s.behaviour_mut().send_response(channel, encode_response(&resp).unwrap());
                }
                Some(what) = let_rx.recv() => {
                    for (ch, index) in held.drain(..) {
                        let resp = match what {
                            Let::Serve => Response::Chunks(vec![Piece {
                                index,
                                data: store.get(&hashes[index as usize]).unwrap().unwrap().to_vec(),
                            }]),
                            Let::Refuse => Response::DoNotHave,
                        };
                        let _ = s.behaviour_mut().send_response(ch, encode_response(&resp).unwrap());
                    }
                }
            }
        }
    });
    (full, asked, let_tx)
}

/// Node A: fetching from the holding seed only, counting into a registry.
async fn node_a(
    seed: Multiaddr,
    m: &phase_content::SignedManifest,
) -> (phase_swarm::Handle, Arc<Mutex<Registry>>) {
    let metrics = Metrics::new();
    let mut r = Registry::with_prefix("plasmd");
    metrics.register(&mut r);
    let registry = Arc::new(Mutex::new(r));
    let cfg = NodeConfig::default()
        .with_mdns(false)
        .with_dht(false)
        .with_listen(loopback())
        .with_peers(vec![seed])
        .with_metrics(metrics, registry.clone());
    let a = Node::spawn(cfg, Arc::new(MemStore::new())).unwrap();
    let (a2, m2) = (a.clone(), m.clone());
    tokio::spawn(async move { a2.fetch(m2, None, None).await });
    (a, registry)
}

fn metric(r: &Mutex<Registry>, line: &str) -> bool {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r.lock().unwrap()).unwrap();
    text.lines().any(|l| l == line)
}

/// Waits (bounded) until the registry has `line` (the node's loop sets
/// it), driving B's swarm meanwhile so its requests go out.
async fn until_metric(b: &mut B, r: &Mutex<Registry>, line: &str) {
    let t = tokio::time::Instant::now();
    let mut look = tokio::time::interval(Duration::from_millis(10));
    while !metric(r, line) {
        assert!(t.elapsed() < WAIT, "no `{line}` in A's metrics");
        tokio::select! {
            _ = b.select_next_some() => {}
            _ = look.tick() => {}
        }
    }
}

type B = libp2p::Swarm<request_response::Behaviour<Raw>>;

/// Sends `req` from B to A and returns A's answer.
async fn ask(b: &mut B, a: PeerId, req: &Request) -> Response {
    let id = b
        .behaviour_mut()
        .send_request(&a, encode_request(req).unwrap());
    response(b, id).await
}

/// The seed holding A's request for chunk `c`, node A, and B connected to A.
struct Scene {
    b: B,
    a: PeerId,
    c: u32,
    root: [u8; 32],
    store: Arc<MemStore>,
    hashes: Vec<Hash>,
    registry: Arc<Mutex<Registry>>,
    seed: mpsc::Sender<Let>,
    _node: phase_swarm::Handle,
}

impl Scene {
    async fn start() -> Scene {
        let store = Arc::new(MemStore::new());
        let m = manifest(&store, CHUNKS * CHUNK as usize, CHUNK);
        let hashes = hashes(&m);
        let (seed_addr, mut asked, seed) = holding_seed(store.clone(), hashes.clone()).await;
        let (node, registry) = node_a(seed_addr, &m).await;
        let c = tokio::time::timeout(WAIT, asked.recv())
            .await
            .expect("A asked the seed for a chunk")
            .unwrap();
        let mut b = peer(Raw::default(), ProtocolSupport::Outbound);
        b.dial(addr(&node).await).unwrap();
        let a = node.peer_id();
        tokio::time::timeout(WAIT, async {
            loop {
                if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                    b.select_next_some().await
                    && peer_id == a
                {
                    return;
                }
            }
        })
        .await
        .expect("B connected to A");
        Scene {
            b,
            a,
            c,
            root: *m.root().as_bytes(),
            store,
            hashes,
            registry,
            seed,
            _node: node,
        }
    }

    /// B asks A for chunk `c`, and A holds the request (its gauge says so).
    async fn ask_held(&mut self) -> request_response::OutboundRequestId {
        let req = Request::Chunk {
            root: self.root,
            index: self.c,
        };
        let id = self
            .b
            .behaviour_mut()
            .send_request(&self.a, encode_request(&req).unwrap());
        self.until("plasmd_chunk_requests_waiting 1").await;
        id
    }

    async fn until(&mut self, line: &str) {
        until_metric(&mut self.b, &self.registry, line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_chunk_on_its_way_waits_for_it() {
    let mut s = Scene::start().await;
    let c = s.c;

    // The seed holds the only copy, and A lists exactly the chunk it asked
    // the seed for (it holds none).
    let (a, root) = (s.a, s.root);
    let Response::HaveMap { chunks, bits } = ask(&mut s.b, a, &Request::HaveMap { root }).await
    else {
        panic!("no have-map from A");
    };
    let have = unpack_bits(chunks, &bits).unwrap();
    let want: Vec<bool> = (0..CHUNKS).map(|i| i == c as usize).collect();
    assert_eq!(have, want, "only chunk {c}, on its way, is promised");

    // B's request waits at A ...
    let id = s.ask_held().await;
    // ... until the seed lets A's copy go; then A serves it.
    s.seed.send(Let::Serve).await.unwrap();
    let resp = response(&mut s.b, id).await;
    let want = s
        .store
        .get(&s.hashes[c as usize])
        .unwrap()
        .unwrap()
        .to_vec();
    match resp {
        Response::Chunks(p) => {
            assert_eq!(p.len(), 1);
            assert_eq!(p[0].index, c);
            assert!(p[0].data == want, "the seed's bytes, relayed by A");
        }
        other => panic!("A did not serve the chunk it promised: {other:?}"),
    }
    s.until("plasmd_chunk_requests_held_total{outcome=\"served\"} 1")
        .await;
    assert!(metric(&s.registry, "plasmd_chunk_requests_waiting 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promise_not_kept_is_refused_not_left_hanging() {
    let mut s = Scene::start().await;
    let id = s.ask_held().await;
    // The seed refuses A: the chunk is no longer on its way (or A asks the
    // seed again, and B's wait ends at its bound): B hears do-not-have.
    s.seed.send(Let::Refuse).await.unwrap();
    let resp = response(&mut s.b, id).await;
    assert!(
        matches!(resp, Response::DoNotHave),
        "a promise A could not keep: {resp:?}"
    );
    s.until("plasmd_chunk_requests_held_total{outcome=\"refused\"} 1")
        .await;
}
