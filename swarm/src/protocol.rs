//! The chunk protocol `/phase/chunk/1`: request and response messages.
//!
//! Every message is one bincode 2 (serde, standard config) value behind a
//! 4-byte big-endian length. Lengths above [`MAX_REQUEST_BYTES`] or
//! [`MAX_RESPONSE_BYTES`] are refused before anything is allocated. Chunks
//! are named by their index in the manifest (artifacts in manifest order);
//! the receiver verifies every chunk against the manifest's hash.

use serde::{Deserialize, Serialize};

/// The protocol name.
pub const PROTOCOL: &str = "/phase/chunk/1";

/// A name a node lists (through identify) when it reads
/// [`Response::ChunksWithMap`]; streams on it carry the same messages as on
/// [`PROTOCOL`]. A node sends that answer only to peers that list it, so
/// older peers keep getting [`Response::Chunks`].
pub const MAPS_PROTOCOL: &str = "/phase/chunk/1/maps";

/// A name a node lists (through identify) when it answers
/// [`Request::LatestAbove`]; streams on it carry the same messages as on
/// [`PROTOCOL`]. A node sends that request only to peers that list it (an
/// older node would take the unknown request for a malformed one), and
/// [`Request::Latest`] to the others.
pub const ABOVE_PROTOCOL: &str = "/phase/chunk/1/above";

/// The largest have-map sent along with a chunk: a larger manifest's map is
/// pulled as before.
pub const MAX_PIGGYBACK_MAP_BYTES: usize = 16 << 10;

/// The largest have-map sent along with a chunk request (under
/// [`MAX_REQUEST_BYTES`] with the rest of the request).
pub const MAX_REQUEST_MAP_BYTES: usize = 3 << 10;

/// The largest request accepted (bytes after the length prefix).
pub const MAX_REQUEST_BYTES: usize = 4 << 10;

/// The largest response accepted: one range of chunks or one manifest.
pub const MAX_RESPONSE_BYTES: usize = (8 << 20) + (64 << 10);

/// Bytes of chunk data at most in one [`Response::Chunks`].
pub const MAX_RANGE_BYTES: usize = 8 << 20;

/// Chunks at most in one [`Request::Range`].
pub const MAX_RANGE_CHUNKS: u32 = 64;

/// Channel and arch names at most this long on the wire.
pub const MAX_NAME: usize = 64;

/// A manifest root (the blake3 hash of the signed manifest body).
pub type Root = [u8; 32];

/// What a peer can ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// One chunk of the manifest `root`.
    Chunk {
        /// The manifest root.
        root: Root,
        /// The chunk's index.
        index: u32,
    },
    /// `count` consecutive chunks starting at `start` (at most
    /// [`MAX_RANGE_CHUNKS`] and [`MAX_RANGE_BYTES`]; the answer may hold fewer).
    Range {
        /// The manifest root.
        root: Root,
        /// The first chunk.
        start: u32,
        /// How many.
        count: u32,
    },
    /// Which chunks of `root` the peer holds.
    HaveMap {
        /// The manifest root.
        root: Root,
    },
    /// The signed manifest envelope of `root`.
    Manifest {
        /// The manifest root.
        root: Root,
    },
    /// The newest signed manifest the peer holds for a channel and arch.
    Latest {
        /// The channel, e.g. `stable`.
        channel: String,
        /// The arch, e.g. `x86_64`.
        arch: String,
    },
    /// [`Request::Chunk`] with the asker's have-map, so the peer asked need
    /// not pull it. Sent only to peers that list [`MAPS_PROTOCOL`].
    ChunkWithMap {
        /// The manifest root.
        root: Root,
        /// The chunk's index.
        index: u32,
        /// The number of chunks in the manifest.
        chunks: u32,
        /// `ceil(chunks / 8)` bytes, least significant bit first.
        #[serde(with = "serde_bytes")]
        bits: Vec<u8>,
    },
    /// [`Request::Latest`] from a node that holds `sequence` already: the
    /// answer is the manifest only if it is newer, else
    /// [`Response::DoNotHave`], so a manifest the asker holds (often 10 KB
    /// and more) does not cross the link again. Sent only to peers that
    /// list [`ABOVE_PROTOCOL`].
    LatestAbove {
        /// The channel, e.g. `stable`.
        channel: String,
        /// The arch, e.g. `x86_64`.
        arch: String,
        /// The sequence the asker holds.
        sequence: u64,
    },
}

/// One chunk in a [`Response::Chunks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The chunk's index.
    pub index: u32,
    /// Its bytes (unverified until the receiver checks the hash).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// What a peer answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The chunks asked for (a prefix of a range if the byte cap cut it).
    Chunks(Vec<Piece>),
    /// The peer does not hold that chunk or manifest.
    DoNotHave,
    /// The peer is serving too much right now: ask again later or elsewhere.
    Busy,
    /// One bit per chunk, least significant bit first.
    HaveMap {
        /// The number of chunks.
        chunks: u32,
        /// `ceil(chunks / 8)` bytes.
        #[serde(with = "serde_bytes")]
        bits: Vec<u8>,
    },
    /// A signed manifest envelope, bytes exactly as signed.
    Manifest(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The request was malformed (out of range, oversize).
    Refused(String),
    /// [`Response::Chunks`] with the sender's have-map as its
    /// [`Response::HaveMap`] answer would give it now, so the asker need not
    /// pull the map while chunks flow. Sent only to peers that list
    /// [`MAPS_PROTOCOL`].
    ChunksWithMap {
        /// The chunks asked for.
        pieces: Vec<Piece>,
        /// The number of chunks in the manifest.
        chunks: u32,
        /// `ceil(chunks / 8)` bytes, least significant bit first.
        #[serde(with = "serde_bytes")]
        bits: Vec<u8>,
    },
}

impl Response {
    /// The chunks a [`Response::Chunks`] or [`Response::ChunksWithMap`] carries.
    pub fn pieces(&self) -> Option<&[Piece]> {
        match self {
            Response::Chunks(p) | Response::ChunksWithMap { pieces: p, .. } => Some(p),
            _ => None,
        }
    }
}

/// A request as it goes on the wire (length prefix included), for other
/// implementations and tests.
pub fn encode_request(r: &Request) -> std::io::Result<Vec<u8>> {
    crate::codec::encode(r, MAX_REQUEST_BYTES)
}

/// A response as it goes on the wire (length prefix included).
pub fn encode_response(r: &Response) -> std::io::Result<Vec<u8>> {
    crate::codec::encode(r, MAX_RESPONSE_BYTES)
}

/// Decodes a request frame as read off the wire (length prefix included),
/// with the limits the node applies to what peers send.
pub fn decode_request(frame: &[u8]) -> std::io::Result<Request> {
    crate::codec::decode_request(split_frame(frame, MAX_REQUEST_BYTES)?)
}

/// Decodes a response frame as read off the wire (length prefix included).
pub fn decode_response(frame: &[u8]) -> std::io::Result<Response> {
    crate::codec::decode_response(split_frame(frame, MAX_RESPONSE_BYTES)?)
}

/// The body of a whole frame whose length prefix matches and is at most `max`.
fn split_frame(frame: &[u8], max: usize) -> std::io::Result<&[u8]> {
    let (len, body) = frame
        .split_at_checked(4)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short frame"))?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len != body.len() || len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad length prefix",
        ));
    }
    Ok(body)
}

/// Packs flags into a little-endian bitfield.
pub fn pack_bits(have: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; have.len().div_ceil(8)];
    for (i, h) in have.iter().enumerate() {
        if *h {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// Unpacks `chunks` flags from a bitfield; `None` if it has the wrong length.
pub fn unpack_bits(chunks: u32, bits: &[u8]) -> Option<Vec<bool>> {
    let n = chunks as usize;
    if bits.len() != n.div_ceil(8) {
        return None;
    }
    Some((0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn bits_round_trip(have in proptest::collection::vec(any::<bool>(), 0..300)) {
            let bits = pack_bits(&have);
            prop_assert_eq!(unpack_bits(have.len() as u32, &bits).unwrap(), have);
        }
    }

    #[test]
    fn bits_wrong_length() {
        assert!(unpack_bits(9, &[0]).is_none());
        assert!(unpack_bits(8, &[0, 0]).is_none());
    }
}
