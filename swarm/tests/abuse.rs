//! Bad input over a real loopback connection: a raw libp2p client sends
//! oversized frames, garbage and request floods to a seeding node. The
//! offender is dropped, memory stays bounded, and an honest fetcher beside it
//! completes.

#![allow(clippy::unwrap_used)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::prelude::*;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};
use phase_content::publish::{chunk_bytes, sign_artifacts};
use phase_content::{MemStore, SecretKey, SignedManifest};
use phase_swarm::protocol::{PROTOCOL, Request, Response, decode_response, encode_request};
use phase_swarm::{Handle, Node, NodeConfig};

/// Sends raw bytes as a request and hands back whatever bytes come back.
#[derive(Clone, Default)]
struct Raw;

impl request_response::Codec for Raw {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(1 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; 64];
        // Read only the head of an answer: a flooder does not drain answers.
        let n = io.read(&mut v).await?;
        v.truncate(n);
        if v.len() < 16 {
            io.take(64).read_to_end(&mut v).await?;
        }
        if v.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(v)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&res).await?;
        io.close().await
    }
}

type Attacker = Swarm<request_response::Behaviour<Raw>>;

fn attacker() -> Attacker {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                Raw,
                [(StreamProtocol::new(PROTOCOL), ProtocolSupport::Outbound)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(10))
                    .with_max_concurrent_streams(1000),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Runs the attacker's swarm until `pred` says stop, or panics after 20 s.
async fn until<T>(
    s: &mut Attacker,
    what: &str,
    mut pred: impl FnMut(SwarmEvent<request_response::Event<Vec<u8>, Vec<u8>>>) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(t) = pred(s.select_next_some().await) {
                return t;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn connect(s: &mut Attacker, addr: &Multiaddr) -> PeerId {
    s.dial(addr.clone()).unwrap();
    until(s, "connection", |e| match e {
        SwarmEvent::ConnectionEstablished { peer_id, .. } => Some(peer_id),
        _ => None,
    })
    .await
}

async fn closed(s: &mut Attacker, peer: PeerId) {
    until(s, "the server to drop us", |e| match e {
        SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == peer => Some(()),
        _ => None,
    })
    .await
}

/// A manifest of `len` pseudo-random bytes in 16 KiB chunks, all in `store`.
fn manifest(store: &MemStore, len: usize) -> SignedManifest {
    let key = SecretKey::from_seed([3; 32]);
    let data: Vec<u8> = (0..len)
        .map(|i| (i * 31 % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    let cs = 16 << 10;
    let art = chunk_bytes("kernel", &data, store, cs).unwrap();
    sign_artifacts(&key, "stable", "x86_64", 1, vec![art]).unwrap()
}

fn loopback() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]
}

async fn server(len: usize) -> (Handle, Multiaddr, SignedManifest) {
    let store = MemStore::new();
    let m = manifest(&store, len);
    let h = Node::spawn(
        NodeConfig::default()
            .with_mdns(false)
            .with_listen(loopback()),
        Arc::new(store),
    )
    .unwrap();
    h.seed(m.clone()).await.unwrap();
    let addr = h.listen_addrs().await.unwrap()[0].clone();
    (h, addr, m)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_garbage_and_floods_drop_the_offender_only() {
    let (srv, addr, m) = server(4 << 20).await;
    let root = *m.root().as_bytes();
    let full = addr.clone().with_p2p(srv.peer_id()).unwrap();

    // An honest fetcher runs beside the attacks.
    let honest = Node::spawn(
        NodeConfig::default()
            .with_mdns(false)
            .with_listen(loopback())
            .with_peers(vec![full.clone()]),
        Arc::new(MemStore::new()),
    )
    .unwrap();
    let fetch = {
        let (h, m) = (honest.clone(), m.clone());
        tokio::spawn(async move { h.fetch(m, None, None).await })
    };

    let rss_before = peak_rss_kib();

    // 1. A frame that claims 4 GiB, followed by 64 MiB of junk.
    let mut a = attacker();
    let p = connect(&mut a, &addr).await;
    let mut frame = vec![0xff, 0xff, 0xff, 0xff];
    frame.extend(std::iter::repeat_n(0u8, 64 << 20));
    a.behaviour_mut().send_request(&p, frame);
    closed(&mut a, p).await;
    // Blocked: a new connection is dropped at once.
    let p = connect(&mut a, &addr).await;
    closed(&mut a, p).await;

    // 2. A well-framed message that is not a request.
    let mut a = attacker();
    let p = connect(&mut a, &addr).await;
    let mut garbage = vec![0, 0, 0, 8];
    garbage.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xfe, 0xed, 0xfa, 0xce]);
    a.behaviour_mut().send_request(&p, garbage);
    closed(&mut a, p).await;

    // 3. Requests for what the server does not have are answered, cheaply.
    let mut a = attacker();
    let p = connect(&mut a, &addr).await;
    for req in [
        Request::Chunk {
            root: [9; 32],
            index: 0,
        },
        Request::HaveMap { root: [9; 32] },
        Request::Chunk {
            root,
            index: 1_000_000,
        },
    ] {
        a.behaviour_mut()
            .send_request(&p, encode_request(&req).unwrap());
        let resp = until(&mut a, "an answer", |e| match e {
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            }) => Some(response),
            _ => None,
        })
        .await;
        let resp = decode_response(&resp).unwrap();
        assert!(
            matches!(resp, Response::DoNotHave | Response::Refused(_)),
            "{req:?} -> {resp:?}"
        );
    }

    // 4. A flood: hundreds of chunk requests at once.
    let req = encode_request(&Request::Range {
        root,
        start: 0,
        count: 64,
    })
    .unwrap();
    for _ in 0..500 {
        a.behaviour_mut().send_request(&p, req.clone());
    }
    closed(&mut a, p).await;

    // Bounded: the 4 GiB claim and the flood cost far less than they asked for.
    let grown_mib = peak_rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 256, "peak RSS grew by {grown_mib} MiB");

    // The honest fetcher is unaffected.
    let report = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("honest fetch finished")
        .unwrap()
        .unwrap();
    assert_eq!(report.bytes, 4 << 20);
    assert!(report.banned.is_empty());
    assert!(
        srv.connected_peers()
            .await
            .unwrap()
            .contains(&honest.peer_id()),
        "the honest peer stays connected"
    );
}
