//! The length-prefixed bincode codec of the chunk protocol.

use std::io;

use futures::prelude::*;
use libp2p::StreamProtocol;
use serde::{Serialize, de::DeserializeOwned};

use crate::protocol::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Request, Response};

/// An answer is written in slices of this many bytes...
const WRITE_SLICE: usize = 64 << 10;

/// ...and each slice must leave within this, or the upload is cancelled: a
/// peer that asks and does not read must not hold an upload slot for the
/// whole request timeout.
pub(crate) const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// The I/O error of an upload cancelled for making no progress.
pub(crate) const STALLED: &str = "upload made no progress";

/// A request as read off the wire. Malformed or oversize requests are not
/// I/O errors here: libp2p drops those silently, and the node needs to see
/// them to drop the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A well-formed request.
    Ok(Request),
    /// Why the request was refused.
    Bad(String),
}

/// The codec: a 4-byte big-endian length, then one bincode value.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChunkCodec;

/// Standard bincode with a decode limit, so a claimed length inside a
/// message cannot make the decoder allocate more than a frame can hold.
fn config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

pub(crate) fn encode<T: Serialize>(v: &T, max: usize) -> io::Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(v, config::<{ MAX_RESPONSE_BYTES }>())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if body.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {} bytes over the {max}-byte limit", body.len()),
        ));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// A request body: a claimed length inside it is checked against the
/// request limit, so a 4 KiB request cannot make us allocate more.
pub(crate) fn decode_request(body: &[u8]) -> io::Result<Request> {
    decode::<Request, { MAX_REQUEST_BYTES }>(body)
}

/// A response body.
pub(crate) fn decode_response(body: &[u8]) -> io::Result<Response> {
    decode::<Response, { MAX_RESPONSE_BYTES }>(body)
}

fn decode<T: DeserializeOwned, const LIMIT: usize>(body: &[u8]) -> io::Result<T> {
    let (v, used) = bincode::serde::decode_from_slice(body, config::<LIMIT>())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if used != body.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "trailing bytes after the message",
        ));
    }
    Ok(v)
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        // Refused before allocating anything for it.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes over the {max}-byte limit"),
        ));
    }
    // Grown as bytes arrive, not allocated to the claimed length up front: a
    // peer that claims 8 MiB and sends nothing costs nothing.
    let mut body = Vec::new();
    io.take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(body)
}

impl libp2p::request_response::Codec for ChunkCodec {
    type Protocol = StreamProtocol;
    type Request = Inbound;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Inbound>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = match read_frame(io, MAX_REQUEST_BYTES).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Ok(Inbound::Bad(e.to_string()));
            }
            Err(e) => return Err(e),
        };
        Ok(match decode_request(&frame) {
            Ok(r) => Inbound::Ok(r),
            Err(e) => Inbound::Bad(e.to_string()),
        })
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        decode_response(&read_frame(io, MAX_RESPONSE_BYTES).await?)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        req: Inbound,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let Inbound::Ok(req) = req else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a request"));
        };
        io.write_all(&encode(&req, MAX_REQUEST_BYTES)?).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode(&res, MAX_RESPONSE_BYTES)?;
        let stalled = || io::Error::new(io::ErrorKind::TimedOut, STALLED);
        for slice in bytes.chunks(WRITE_SLICE) {
            tokio::time::timeout(WRITE_STALL, io.write_all(slice))
                .await
                .map_err(|_| stalled())??;
        }
        tokio::time::timeout(WRITE_STALL, io.close())
            .await
            .map_err(|_| stalled())?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::Piece;
    use libp2p::request_response::Codec;
    use proptest::prelude::*;

    fn proto() -> StreamProtocol {
        StreamProtocol::new(crate::protocol::PROTOCOL)
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<[u8; 32]>(), any::<u32>())
                .prop_map(|(root, index)| Request::Chunk { root, index }),
            (any::<[u8; 32]>(), any::<u32>(), any::<u32>())
                .prop_map(|(root, start, count)| Request::Range { root, start, count }),
            any::<[u8; 32]>().prop_map(|root| Request::HaveMap { root }),
            any::<[u8; 32]>().prop_map(|root| Request::Manifest { root }),
            (".{0,20}", ".{0,20}").prop_map(|(channel, arch)| Request::Latest { channel, arch }),
            (".{0,20}", ".{0,20}", any::<u64>()).prop_map(|(channel, arch, sequence)| {
                Request::LatestAbove {
                    channel,
                    arch,
                    sequence,
                }
            }),
            (
                any::<[u8; 32]>(),
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..3072)
            )
                .prop_map(|(root, index, chunks, bits)| Request::ChunkWithMap {
                    root,
                    index,
                    chunks,
                    bits
                }),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            proptest::collection::vec(
                (
                    any::<u32>(),
                    proptest::collection::vec(any::<u8>(), 0..2000)
                )
                    .prop_map(|(index, data)| Piece { index, data }),
                0..4
            )
            .prop_map(Response::Chunks),
            Just(Response::DoNotHave),
            Just(Response::Busy),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..100))
                .prop_map(|(chunks, bits)| Response::HaveMap { chunks, bits }),
            proptest::collection::vec(any::<u8>(), 0..500).prop_map(Response::Manifest),
            ".{0,30}".prop_map(Response::Refused),
            (
                proptest::collection::vec(
                    (
                        any::<u32>(),
                        proptest::collection::vec(any::<u8>(), 0..2000)
                    )
                        .prop_map(|(index, data)| Piece { index, data }),
                    0..2
                ),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..100)
            )
                .prop_map(|(pieces, chunks, bits)| Response::ChunksWithMap {
                    pieces,
                    chunks,
                    bits
                }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trip(req in arb_request()) {
            let bytes = encode(&req, MAX_REQUEST_BYTES).unwrap();
            let back = futures::executor::block_on(
                ChunkCodec.read_request(&proto(), &mut &bytes[..])).unwrap();
            prop_assert_eq!(back, Inbound::Ok(req));
        }

        #[test]
        fn response_round_trip(res in arb_response()) {
            let bytes = encode(&res, MAX_RESPONSE_BYTES).unwrap();
            let back: Response = futures::executor::block_on(
                ChunkCodec.read_response(&proto(), &mut &bytes[..])).unwrap();
            prop_assert_eq!(back, res);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = futures::executor::block_on(ChunkCodec.read_request(&proto(), &mut &bytes[..]));
            let _ = futures::executor::block_on(ChunkCodec.read_response(&proto(), &mut &bytes[..]));
        }
    }

    #[test]
    fn oversize_length_refused_before_reading() {
        // Claims 4 GiB; only the prefix exists. Must fail fast, not allocate.
        let bytes = [0xff, 0xff, 0xff, 0xff];
        let r = futures::executor::block_on(ChunkCodec.read_request(&proto(), &mut &bytes[..]))
            .unwrap();
        assert!(
            matches!(&r, Inbound::Bad(e) if e.contains("limit")),
            "{r:?}"
        );
        let e = futures::executor::block_on(ChunkCodec.read_response(&proto(), &mut &bytes[..]))
            .unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }

    #[test]
    fn garbage_request_is_bad_not_an_error() {
        let bytes = [0, 0, 0, 3, 0xde, 0xad, 0xbe];
        let r = futures::executor::block_on(ChunkCodec.read_request(&proto(), &mut &bytes[..]))
            .unwrap();
        assert!(matches!(r, Inbound::Bad(_)), "{r:?}");
        // A stream cut short is an I/O error (the peer went away), not abuse.
        let bytes = [0, 0, 0, 9, 1];
        assert!(
            futures::executor::block_on(ChunkCodec.read_request(&proto(), &mut &bytes[..]))
                .is_err()
        );
    }

    #[test]
    fn claimed_length_over_request_limit_refused_before_allocating() {
        // A 6-byte `Latest` request claiming an 8 MiB channel name: requests
        // used to be decoded under the response limit, so bincode allocated
        // the 8 MiB before noticing the bytes were not there.
        let mut body = vec![4u8, 0xfc];
        body.extend_from_slice(&(8u32 << 20).to_le_bytes());
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let r = futures::executor::block_on(ChunkCodec.read_request(&proto(), &mut &frame[..]))
            .unwrap();
        assert!(
            matches!(&r, Inbound::Bad(e) if e.contains("LimitExceeded")),
            "{r:?}"
        );
        let e = crate::protocol::decode_request(&frame).unwrap_err();
        assert!(e.to_string().contains("LimitExceeded"), "{e}");
    }

    #[test]
    fn oversize_message_not_written() {
        let big = Request::Latest {
            channel: "x".repeat(MAX_REQUEST_BYTES),
            arch: String::new(),
        };
        assert!(encode(&big, MAX_REQUEST_BYTES).is_err());
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut bytes = encode(&Response::Busy, MAX_RESPONSE_BYTES).unwrap();
        bytes.push(0);
        let n = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        assert!(
            futures::executor::block_on(ChunkCodec.read_response(&proto(), &mut &bytes[..]))
                .is_err()
        );
    }
}
