//! A raw libp2p client asks for six 1 MiB chunks and never reads them: it
//! holds at most its per-peer share of the seed's upload slots, and only until
//! the upload makes no progress for a few seconds. An honest fetch beside it
//! finishes about as fast as it does alone.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use phase_content::MemStore;
use phase_content::SignedManifest;
use phase_swarm::protocol::{Request, encode_request};
use phase_swarm::{Handle, Multiaddr, Node, NodeConfig};
use support::{Raw, loopback, manifest, peer};

const LEN: usize = 32 << 20;
const CHUNK: u32 = 1 << 20;

fn cfg() -> NodeConfig {
    NodeConfig::default()
        .with_mdns(false)
        .with_dht(false)
        .with_listen(loopback())
}

async fn honest_fetch(seed: &Multiaddr, m: &SignedManifest) -> f64 {
    let h: Handle = Node::spawn(
        cfg().with_peers(vec![seed.clone()]),
        Arc::new(MemStore::new()),
    )
    .unwrap();
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(120), h.fetch(m.clone(), None, None))
        .await
        .expect("the honest fetch finished within 120 s")
        .unwrap();
    assert_eq!(r.bytes, LEN as u64);
    start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_uploads_do_not_stall_an_honest_fetch() {
    let store = MemStore::new();
    let m = manifest(&store, LEN, CHUNK);
    let root = *m.root().as_bytes();
    let seed = Node::spawn(cfg(), Arc::new(store)).unwrap();
    seed.seed(m.clone()).await.unwrap();
    let addr = seed.listen_addrs().await.unwrap()[0].clone();
    let full = addr.clone().with_p2p(seed.peer_id()).unwrap();

    let clean = honest_fetch(&full, &m).await;

    // The attacker: six chunk requests it never reads, then a have-map
    // request it does read, so we know the six have been taken up.
    let mut a = peer(Raw { unread: true }, ProtocolSupport::Outbound);
    a.dial(full.clone()).unwrap();
    let deadline = Duration::from_secs(20);
    tokio::time::timeout(deadline, async {
        loop {
            if let SwarmEvent::ConnectionEstablished { .. } = a.select_next_some().await {
                break;
            }
        }
    })
    .await
    .expect("attacker connects");
    let sp = seed.peer_id();
    for index in 0..6 {
        a.behaviour_mut().send_request(
            &sp,
            encode_request(&Request::Chunk { root, index }).unwrap(),
        );
    }
    a.behaviour_mut()
        .send_request(&sp, encode_request(&Request::HaveMap { root }).unwrap());
    tokio::time::timeout(deadline, async {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message { .. }) =
                a.select_next_some().await
            {
                break;
            }
        }
    })
    .await
    .expect("the have-map answer");

    // The honest fetch while the attacker sits on its requests.
    let held = Instant::now();
    let (attacked, closed) = tokio::join!(honest_fetch(&full, &m), async {
        // Unread for WRITE_STALL: the seed cancels the uploads and drops us.
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let SwarmEvent::ConnectionClosed { .. } = a.select_next_some().await {
                    return held.elapsed().as_secs_f64();
                }
            }
        })
        .await
        .expect("the seed drops a client that does not read")
    });
    println!(
        "32 MiB honest fetch: clean {clean:.2} s, beside 6 unread requests {attacked:.2} s; \
         the non-reader was dropped after {closed:.1} s"
    );
    assert!(
        attacked <= 2.0 * clean + 1.0,
        "clean {clean:.2} s, attacked {attacked:.2} s"
    );
    assert!(
        closed < 20.0,
        "dropped before libp2p's request timeout: {closed:.1} s"
    );
    assert!(
        !seed
            .connected_peers()
            .await
            .unwrap()
            .contains(a.local_peer_id()),
        "the non-reader is not connected"
    );
}
