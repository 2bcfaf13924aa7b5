//! A node's dials never come from its listening port.
//!
//! libp2p's TCP transport binds each dial to the node's listening port
//! unless told otherwise (`PortUse::Reuse`, for NAT hole punching, which
//! phase does not do). In CI that bind failed with "Address already in use"
//! for a fetcher whose kernel-chosen listening port had been in use by
//! another connection of the test's processes a moment before, and every
//! retry of its `--peer` failed the same way: the fetcher never reached its
//! peer (`swarm_faults`, `freshness`). A dial on a fresh port has nothing to
//! collide with; peers dial us back at identify's listen addresses, never at
//! the source port of our dials.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use phase_content::MemStore;
use phase_swarm::{Keypair, Multiaddr, Node, NodeConfig, addr};
use support::loopback;
use tokio::net::TcpListener;

fn tcp_port(a: &Multiaddr) -> u16 {
    a.iter()
        .find_map(|p| match p {
            Protocol::Tcp(t) => Some(t),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn dials_come_from_a_fresh_port_not_the_listening_one() {
    // The "peer": a plain TCP listener, enough to see where a dial comes from.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let someone = Keypair::generate_ed25519().public().to_peer_id();
    let peer = addr::with_peer(addr::tcp(at.ip(), at.port()), someone);
    // Listening on loopback, not the default 0.0.0.0: from 0.0.0.0 libp2p
    // binds dials to the port only once it has listed the interfaces'
    // addresses, after this first dial, so that path passed without the
    // fix too (checked); later dials (retries, the DHT's) were bound.
    let node = Node::spawn(
        NodeConfig::default()
            .with_mdns(false)
            .with_listen(loopback())
            .with_peers(vec![peer]),
        Arc::new(MemStore::new()),
    )
    .unwrap();
    let listening = tcp_port(&support::addr(&node).await);

    let (_conn, from) = tokio::time::timeout(Duration::from_secs(10), l.accept())
        .await
        .expect("the node dials its given peer at once")
        .unwrap();
    assert!(from.ip().is_loopback(), "{from}");
    assert_ne!(
        from.port(),
        listening,
        "the dial came from the node's listening port"
    );
}
