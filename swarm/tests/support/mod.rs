//! Adversary peers for the abuse tests: real libp2p swarms on loopback that
//! speak `/phase/chunk/1` through the crate's own message types, but answer
//! (or do not read) as an attacker would.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::prelude::*;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, Swarm, noise, tcp, yamux};
use phase_content::publish::{chunk_bytes, sign_artifacts};
use phase_content::{ChunkStore, Hash, MemStore, SecretKey, SignedManifest};
use phase_swarm::Fallback;
use phase_swarm::protocol::{
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, PROTOCOL, Piece, Request, Response, decode_request,
    decode_response, encode_response, pack_bits,
};

/// Frames as raw bytes (length prefix included) both ways. `unread`: never
/// read an answer over 64 KiB (an attacker holding upload slots).
#[derive(Clone, Default)]
pub struct Raw {
    pub unread: bool,
}

async fn frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let mut v = len.to_vec();
    io.take(n as u64).read_to_end(&mut v).await?;
    Ok(v)
}

impl request_response::Codec for Raw {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        frame(io, MAX_REQUEST_BYTES).await
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let n = u32::from_be_bytes(len) as usize;
        if self.unread && n > 64 << 10 {
            // Holds the stream open without reading a byte of the chunk.
            future::pending::<()>().await;
        }
        if n > MAX_RESPONSE_BYTES {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let mut v = len.to_vec();
        io.take(n as u64).read_to_end(&mut v).await?;
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

pub type Peer = Swarm<request_response::Behaviour<Raw>>;

/// A swarm with a fresh identity over tcp + noise + yamux, listening on
/// loopback, running `behaviour`.
pub fn loopback_swarm<B: libp2p::swarm::NetworkBehaviour>(
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> Swarm<B> {
    let mut s = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    s.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    s
}

/// A raw libp2p peer with a fresh identity, listening on loopback.
pub fn peer(codec: Raw, support: ProtocolSupport) -> Peer {
    loopback_swarm(|_| {
        request_response::Behaviour::with_codec(
            codec,
            [(StreamProtocol::new(PROTOCOL), support)],
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(300))
                .with_max_concurrent_streams(1000),
        )
    })
}

/// The answer to `b`'s request `id` (its swarm driven until it comes,
/// at most 20 s).
pub async fn response(b: &mut Peer, id: request_response::OutboundRequestId) -> Response {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match b.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => return decode_response(&response).unwrap(),
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                }) if request_id == id => panic!("request failed: {error}"),
                _ => {}
            }
        }
    })
    .await
    .expect("an answer within 20 s")
}

/// A manifest of `len` pseudo-random bytes in `chunk`-byte chunks, all in `store`.
pub fn manifest(store: &MemStore, len: usize, chunk: u32) -> SignedManifest {
    let key = SecretKey::from_seed([3; 32]);
    let data: Vec<u8> = (0..len)
        .map(|i| (i * 31 % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    let art = chunk_bytes("kernel", &data, store, chunk).unwrap();
    sign_artifacts(&key, "stable", "x86_64", 1, vec![art]).unwrap()
}

pub fn loopback() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]
}

/// The HTTP seed's part in a fetch: chunks by hash from a store (the real
/// HTTP rescue is `plasmd fetch` against `plasmd serve`, tests/tests).
pub struct StoreFallback(pub Arc<MemStore>);

impl Fallback for StoreFallback {
    fn get(&self, hash: &Hash) -> Result<Vec<u8>, String> {
        match self.0.get(hash) {
            Ok(Some(b)) => Ok(b.to_vec()),
            Ok(None) => Err("no such chunk".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// How a claiming adversary answers chunk requests.
#[derive(Clone)]
pub enum Claim {
    /// "Busy", for ever.
    Busy,
    /// The real chunk, one every `every`, oldest request first.
    Trickle {
        store: Arc<MemStore>,
        hashes: Vec<Hash>,
        every: Duration,
    },
}

/// An inbound request and its channel, from a raw peer's event.
pub fn request_of(
    ev: SwarmEvent<request_response::Event<Vec<u8>, Vec<u8>>>,
) -> Option<(Vec<u8>, ResponseChannel<Vec<u8>>)> {
    match ev {
        SwarmEvent::Behaviour(request_response::Event::Message {
            message:
                request_response::Message::Request {
                    request, channel, ..
                },
            ..
        }) => Some((request, channel)),
        _ => None,
    }
}

/// A peer claiming all of `chunks` chunks answers `request`: its have-map
/// says every chunk, anything but a chunk request is do-not-have, and a
/// chunk request is handed back (`Err(index)`) for the caller to answer.
pub fn claim_all(chunks: usize, request: &[u8]) -> Result<Response, u32> {
    match decode_request(request) {
        Ok(Request::HaveMap { .. }) => Ok(Response::HaveMap {
            chunks: chunks as u32,
            bits: pack_bits(&vec![true; chunks]),
        }),
        Ok(Request::Chunk { index, .. }) => Err(index),
        _ => Ok(Response::DoNotHave),
    }
}

/// Spawns a peer that claims every one of `chunks` chunks and answers chunk
/// requests as `claim` says; returns its full address.
pub async fn spawn_claimer(chunks: usize, claim: Claim) -> Multiaddr {
    let mut s = peer(Raw::default(), ProtocolSupport::Inbound);
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = s.select_next_some().await {
            break address;
        }
    };
    let full = addr.with_p2p(*s.local_peer_id()).unwrap();
    tokio::spawn(async move {
        let every = match &claim {
            Claim::Trickle { every, .. } => *every,
            Claim::Busy => Duration::from_secs(3600),
        };
        let mut tick = tokio::time::interval(every);
        let mut queue: VecDeque<(ResponseChannel<Vec<u8>>, u32)> = VecDeque::new();
        loop {
            tokio::select! {
                ev = s.select_next_some() => {
                    let Some((request, channel)) = request_of(ev) else { continue };
                    let resp = match claim_all(chunks, &request) {
                        Ok(resp) => resp,
                        Err(index) => match claim {
                            Claim::Busy => Response::Busy,
                            Claim::Trickle { .. } => {
                                queue.push_back((channel, index));
                                continue;
                            }
                        },
                    };
                    let _ = s.behaviour_mut().send_response(channel, encode_response(&resp).unwrap());
                }
                _ = tick.tick() => {
                    let (Claim::Trickle { store, hashes, .. }, Some((ch, index))) = (&claim, queue.pop_front()) else {
                        continue;
                    };
                    let data = store.get(&hashes[index as usize]).unwrap().unwrap().to_vec();
                    let resp = Response::Chunks(vec![Piece { index, data }]);
                    let _ = s.behaviour_mut().send_response(ch, encode_response(&resp).unwrap());
                }
            }
        }
    });
    full
}

/// Every chunk hash of `m`, in manifest order.
pub fn hashes(m: &SignedManifest) -> Vec<Hash> {
    m.manifest()
        .artifacts
        .iter()
        .flat_map(|a| a.chunks.iter().copied())
        .collect()
}

/// `h`'s first listen address with its peer id.
pub async fn addr(h: &phase_swarm::Handle) -> Multiaddr {
    let a = h.listen_addrs().await.unwrap()[0].clone();
    a.with_p2p(h.peer_id()).unwrap()
}

/// The artifacts as the user gets them: reassembled from the node's store
/// (lengths and whole-artifact hashes checked).
pub fn artifacts(store: &dyn ChunkStore, m: &SignedManifest) -> Vec<Vec<u8>> {
    m.manifest()
        .artifacts
        .iter()
        .map(|a| {
            let mut out = Vec::new();
            phase_content::reassemble(store, a, &mut out).unwrap();
            out
        })
        .collect()
}
