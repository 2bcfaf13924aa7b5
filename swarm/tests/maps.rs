//! Have-maps that travel with chunks (`NodeConfig::maps_with_chunks`): a
//! node sends its have-map along with the chunks it serves, and with the
//! chunk requests it sends, to peers that list `MAPS_PROTOCOL` in identify;
//! a map that came that way counts as a pull. Peers that do not list it (an
//! older node, or these tests' bare peers) get the plain messages.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{PeerId, StreamProtocol, Swarm, identify};
use phase_content::{ChunkStore, MemStore};
use phase_swarm::protocol::{
    MAPS_PROTOCOL, PROTOCOL, Request, Response, decode_request, decode_response, encode_request,
    encode_response, pack_bits, unpack_bits,
};
use phase_swarm::{Node, NodeConfig};
use support::{
    Claim, Raw, addr, hashes, loopback, loopback_swarm, manifest, peer, response, spawn_claimer,
};

const CHUNK: u32 = 16 << 10;
const CHUNKS: usize = 8;
const WAIT: Duration = Duration::from_secs(20);

/// A bare peer that lists `MAPS_PROTOCOL` (through identify, as a node does).
#[derive(NetworkBehaviour)]
struct Reads {
    rr: request_response::Behaviour<Raw>,
    identify: identify::Behaviour,
}

fn reader() -> Swarm<Reads> {
    loopback_swarm(|key| Reads {
        rr: request_response::Behaviour::with_codec(
            Raw::default(),
            [
                (StreamProtocol::new(PROTOCOL), ProtocolSupport::Full),
                (StreamProtocol::new(MAPS_PROTOCOL), ProtocolSupport::Inbound),
            ],
            request_response::Config::default(),
        ),
        identify: identify::Behaviour::new(identify::Config::new(
            "/phase/id/1".into(),
            key.public(),
        )),
    })
}

/// The answer to the reader's request `id` (its swarm driven until it
/// comes, bounded).
async fn answer(b: &mut Swarm<Reads>, id: request_response::OutboundRequestId) -> Response {
    tokio::time::timeout(WAIT, async {
        loop {
            if let SwarmEvent::Behaviour(ReadsEvent::Rr(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            })) = b.select_next_some().await
                && request_id == id
            {
                return decode_response(&response).unwrap();
            }
        }
    })
    .await
    .expect("an answer")
}

fn node_cfg() -> NodeConfig {
    NodeConfig::default()
        .with_mdns(false)
        .with_dht(false)
        .with_listen(loopback())
}

/// Drives `s` until it is connected to `to`.
async fn connect<B: NetworkBehaviour>(s: &mut Swarm<B>, to: libp2p::Multiaddr, id: PeerId) {
    s.dial(to).unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } = s.select_next_some().await
                && peer_id == id
            {
                return;
            }
        }
    })
    .await
    .expect("connected");
}

/// A seeding node answers a peer that lists `MAPS_PROTOCOL` with the chunk
/// and its have-map, and a peer that does not with the chunk alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_sends_its_map_with_chunks_to_peers_that_read_it() {
    let store = Arc::new(MemStore::new());
    let m = manifest(&store, CHUNKS * CHUNK as usize, CHUNK);
    let hashes = hashes(&m);
    let root = *m.root().as_bytes();
    let seed = Node::spawn(node_cfg(), store.clone()).unwrap();
    seed.seed(m.clone()).await.unwrap();
    let (seed_addr, seed_id) = (addr(&seed).await, seed.peer_id());

    // A bare peer without identify: plain chunks.
    let mut old = peer(Raw::default(), ProtocolSupport::Outbound);
    connect(&mut old, seed_addr.clone(), seed_id).await;
    let id = old.behaviour_mut().send_request(
        &seed_id,
        encode_request(&Request::Chunk { root, index: 0 }).unwrap(),
    );
    let resp = response(&mut old, id).await;
    let Response::Chunks(pieces) = resp else {
        panic!("a peer that does not read maps got {resp:?}");
    };
    assert_eq!(
        pieces[0].data,
        store.get(&hashes[0]).unwrap().unwrap().to_vec()
    );

    // A peer that lists MAPS_PROTOCOL. The seed learns that from identify,
    // which may land after the first requests: B asks chunk after chunk
    // (each sent once, so super-seeding serves it) until a map comes.
    let mut b = reader();
    connect(&mut b, seed_addr, seed_id).await;
    let mut with_map = None;
    for asked in 0..500u32 {
        let index = asked % CHUNKS as u32;
        let req = encode_request(&Request::Chunk { root, index }).unwrap();
        let id = b.behaviour_mut().rr.send_request(&seed_id, req);
        match answer(&mut b, id).await {
            Response::ChunksWithMap {
                pieces,
                chunks,
                bits,
            } => {
                assert_eq!(pieces[0].index, index);
                with_map = Some((pieces, chunks, bits));
                break;
            }
            Response::Chunks(_) | Response::DoNotHave => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let (pieces, chunks, bits) = with_map.expect("a chunk with the seed's map in 500 asks");
    let i = pieces[0].index as usize;
    assert_eq!(
        pieces[0].data,
        store.get(&hashes[i]).unwrap().unwrap().to_vec()
    );
    // The map is the one a pull gets (a super-seeding seed offers the
    // chunks it has sent least, so not every chunk).
    let req = encode_request(&Request::HaveMap { root }).unwrap();
    let id = b.behaviour_mut().rr.send_request(&seed_id, req);
    let pulled = answer(&mut b, id).await;
    assert_eq!(
        pulled,
        Response::HaveMap {
            chunks,
            bits: bits.clone()
        }
    );
    let have = unpack_bits(chunks, &bits).unwrap();
    assert_eq!(have.len(), CHUNKS);
    assert!(have.iter().any(|h| *h), "the seed offers chunks");
}

/// A fetching node reads the map a peer sends with its chunk request: B's
/// pulled map says it holds nothing, the map in B's request says it holds
/// everything, and the node (whose only other source answers busy) then
/// asks B for chunks. With the maps off it never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_that_comes_with_a_request_is_used() {
    let store = Arc::new(MemStore::new());
    let m = manifest(&store, CHUNKS * CHUNK as usize, CHUNK);
    let root = *m.root().as_bytes();
    let busy = spawn_claimer(CHUNKS, Claim::Busy).await;
    let a = Node::spawn(node_cfg().with_peers(vec![busy]), Arc::new(MemStore::new())).unwrap();
    let (a2, m2) = (a.clone(), m.clone());
    tokio::spawn(async move { a2.fetch(m2, None, None).await });
    let (a_addr, a_id) = (addr(&a).await, a.peer_id());

    let mut b = reader();
    connect(&mut b, a_addr, a_id).await;
    // B's request: chunk 0, and B's map: every chunk.
    let req = Request::ChunkWithMap {
        root,
        index: 0,
        chunks: CHUNKS as u32,
        bits: pack_bits(&[true; CHUNKS]),
    };
    b.behaviour_mut()
        .rr
        .send_request(&a_id, encode_request(&req).unwrap());
    let nothing = Response::HaveMap {
        chunks: CHUNKS as u32,
        bits: pack_bits(&[false; CHUNKS]),
    };
    let asked = tokio::time::timeout(WAIT, async {
        loop {
            if let SwarmEvent::Behaviour(ReadsEvent::Rr(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) = b.select_next_some().await
            {
                match decode_request(&request).unwrap() {
                    // Pulled, B says it holds nothing.
                    Request::HaveMap { .. } => {
                        let r = encode_response(&nothing).unwrap();
                        let _ = b.behaviour_mut().rr.send_response(channel, r);
                    }
                    Request::Chunk { index, .. } | Request::ChunkWithMap { index, .. } => {
                        return index;
                    }
                    other => panic!("unexpected request {other:?}"),
                }
            }
        }
    })
    .await
    .expect("A asked B for a chunk: it read the map that came with B's request");
    assert!((asked as usize) < CHUNKS);
}
