//! The frames of `/phase/swarm/2` and their binary encoding.
//!
//! Every frame is a 4-byte big-endian length `L` (of what follows, at least
//! 1), a tag byte, then `L - 1` bytes of fields, all integers big-endian:
//!
//! | tag | frame        | fields                                              |
//! |-----|--------------|-----------------------------------------------------|
//! | 1   | `Hello`      | root (32), chunks (u32), depth (u16), bitfield (`ceil(chunks/8)`, LSB first) |
//! | 2   | `Have`       | chunk (u32) x n, 1 <= n <= [`MAX_HAVE_BATCH`]       |
//! | 3   | `Request`    | chunk (u32)                                         |
//! | 4   | `Piece`      | chunk (u32), data (the rest, at most [`MAX_PIECE_BYTES`]) |
//! | 5   | `Cancel`     | chunk (u32)                                         |
//! | 6   | `Choke`      | -                                                   |
//! | 7   | `Unchoke`    | -                                                   |
//! | 8   | `DoNotHave`  | chunk (u32)                                         |
//!
//! The codec is written by hand rather than with bincode or
//! `LengthDelimitedCodec`: the layout is eight fixed shapes, a hand decoder
//! checks each length against its limit before it allocates anything, and a
//! `Piece` (or a `Hello`'s bitfield) must not be copied. [`FrameCodec`]
//! implements `tokio_util`'s [`Decoder`]: a `Piece`'s data is split out of the
//! read buffer as a [`Bytes`] that shares its memory. On the way out,
//! [`Frame::encode`] gives the small header and the payload separately, so the
//! session writes the header, then the caller's `Bytes`, untouched. (The
//! [`Encoder`] impl, which copies, is for tests and raw peers.)

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::protocol::Root;

/// Chunks at most in one manifest: a manifest is at most
/// [`phase_content::MAX_MANIFEST_BYTES`] and holds a 32-byte hash
/// per chunk, so no real manifest has more.
pub const MAX_CHUNKS: u32 = (phase_content::MAX_MANIFEST_BYTES / 32) as u32;

/// Bytes of a `Hello` bitfield at most: `ceil(MAX_CHUNKS / 8)`.
pub const MAX_BITFIELD_BYTES: usize = (MAX_CHUNKS as usize).div_ceil(8);

/// Chunk indices at most in one `Have`.
pub const MAX_HAVE_BATCH: usize = 1024;

/// Data bytes at most in one `Piece`: the largest chunk a manifest allows.
pub const MAX_PIECE_BYTES: usize = phase_content::MAX_CHUNK_SIZE as usize;

/// The length prefix's size.
const PREFIX: usize = 4;

/// A `Hello`'s fields before its bitfield: root, chunks, depth.
const HELLO_FIXED: usize = 32 + 4 + 2;

const HELLO: u8 = 1;
const HAVE: u8 = 2;
const REQUEST: u8 = 3;
const PIECE: u8 = 4;
const CANCEL: u8 = 5;
const CHOKE: u8 = 6;
const UNCHOKE: u8 = 7;
const DO_NOT_HAVE: u8 = 8;

/// One frame of `/phase/swarm/2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame each way: which manifest this stream is about, how many
    /// chunks it has, and which of them the sender holds.
    Hello {
        /// The manifest root.
        root: Root,
        /// Its number of chunks.
        chunks: u32,
        /// Requests the sender accepts outstanding from us at most; a peer
        /// that sends more is ended.
        depth: u16,
        /// `ceil(chunks / 8)` bytes, least significant bit first; bits past
        /// `chunks` are zero.
        bits: Bytes,
    },
    /// The sender has verified these chunks since its last `Hello`/`Have`.
    Have(Vec<u32>),
    /// Send me this chunk.
    Request(u32),
    /// A chunk's bytes (unverified until the receiver checks the hash).
    Piece {
        /// The chunk's index.
        chunk: u32,
        /// Its bytes.
        data: Bytes,
    },
    /// Forget my request for this chunk (end-game duplicate answered elsewhere).
    Cancel(u32),
    /// The sender will not serve requests now; the ones queued are dropped.
    Choke,
    /// The sender serves requests again.
    Unchoke,
    /// The sender does not hold (or will not offer) this chunk.
    DoNotHave(u32),
}

/// Limits a decoder enforces, all checked before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Chunks at most in a `Hello`.
    pub max_chunks: u32,
    /// Data bytes at most in a `Piece`.
    pub max_piece: usize,
    /// Indices at most in a `Have`.
    pub max_have: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_chunks: MAX_CHUNKS,
            max_piece: MAX_PIECE_BYTES,
            max_have: MAX_HAVE_BATCH,
        }
    }
}

impl Limits {
    /// The largest frame (after the prefix) these limits allow.
    pub fn max_frame(&self) -> usize {
        let hello = 1 + HELLO_FIXED + (self.max_chunks as usize).div_ceil(8);
        let piece = 1 + 4 + self.max_piece;
        let have = 1 + 4 * self.max_have;
        hello.max(piece).max(have)
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is over the limit.
    #[error("frame of {len} bytes over the {max}-byte limit")]
    Oversize {
        /// The claimed length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A zero length prefix (no tag).
    #[error("empty frame (length 0)")]
    Empty,
    /// The tag is not one of ours.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// The fields do not fit the frame's length.
    #[error("{frame} frame of {len} bytes, want {want}")]
    BadLength {
        /// The frame's name.
        frame: &'static str,
        /// Its field bytes.
        len: usize,
        /// What was expected.
        want: String,
    },
    /// A `Hello` with too many chunks.
    #[error("hello with {chunks} chunks, more than {max}")]
    TooManyChunks {
        /// The claimed count.
        chunks: u32,
        /// The limit.
        max: u32,
    },
    /// A `Hello` bitfield with bits set past its chunk count.
    #[error("hello bitfield has bits set past chunk {chunks}")]
    StrayBits {
        /// The chunk count.
        chunks: u32,
    },
    /// A `Have` with no index or too many.
    #[error("have batch of {n} chunks, want 1..={max}")]
    HaveBatch {
        /// Indices in the batch.
        n: usize,
        /// The limit.
        max: usize,
    },
    /// A `Piece` over the size limit.
    #[error("piece of {len} bytes over the {max}-byte limit")]
    PieceTooLarge {
        /// Its data bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// Reading or writing the stream failed.
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A frame ready for the wire: `head` (prefix, tag and fixed fields), then
/// `tail` (a `Piece`'s data or a `Hello`'s bitfield, not copied).
#[derive(Debug)]
pub struct Encoded {
    /// Prefix, tag and fixed fields.
    pub head: BytesMut,
    /// The payload, sent as is after `head`.
    pub tail: Option<Bytes>,
}

impl Frame {
    /// The frame's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Have(_) => "have",
            Frame::Request(_) => "request",
            Frame::Piece { .. } => "piece",
            Frame::Cancel(_) => "cancel",
            Frame::Choke => "choke",
            Frame::Unchoke => "unchoke",
            Frame::DoNotHave(_) => "do-not-have",
        }
    }

    /// Splits the frame into header and payload, refusing what a peer with
    /// `limits` would refuse.
    pub fn encode(&self, limits: &Limits) -> Result<Encoded, FrameError> {
        let mut head = BytesMut::with_capacity(PREFIX + 1 + 36);
        let mut tail = None;
        let fields = |head: &mut BytesMut, tag: u8, len: usize| {
            head.put_u32((1 + len) as u32);
            head.put_u8(tag);
        };
        match self {
            Frame::Hello {
                root,
                chunks,
                depth,
                bits,
            } => {
                check_hello(*chunks, bits, limits)?;
                fields(&mut head, HELLO, HELLO_FIXED + bits.len());
                head.put_slice(root);
                head.put_u32(*chunks);
                head.put_u16(*depth);
                tail = Some(bits.clone());
            }
            Frame::Have(list) => {
                if list.is_empty() || list.len() > limits.max_have {
                    return Err(FrameError::HaveBatch {
                        n: list.len(),
                        max: limits.max_have,
                    });
                }
                head.reserve(4 * list.len());
                fields(&mut head, HAVE, 4 * list.len());
                for c in list {
                    head.put_u32(*c);
                }
            }
            Frame::Request(c) | Frame::Cancel(c) | Frame::DoNotHave(c) => {
                let tag = match self {
                    Frame::Request(_) => REQUEST,
                    Frame::Cancel(_) => CANCEL,
                    _ => DO_NOT_HAVE,
                };
                fields(&mut head, tag, 4);
                head.put_u32(*c);
            }
            Frame::Piece { chunk, data } => {
                if data.len() > limits.max_piece {
                    return Err(FrameError::PieceTooLarge {
                        len: data.len(),
                        max: limits.max_piece,
                    });
                }
                fields(&mut head, PIECE, 4 + data.len());
                head.put_u32(*chunk);
                tail = Some(data.clone());
            }
            Frame::Choke => fields(&mut head, CHOKE, 0),
            Frame::Unchoke => fields(&mut head, UNCHOKE, 0),
        }
        Ok(Encoded { head, tail })
    }

    /// The whole frame in one buffer (copies the payload; for tests and raw peers).
    pub fn to_vec(&self, limits: &Limits) -> Result<Vec<u8>, FrameError> {
        let e = self.encode(limits)?;
        let mut v = e.head.to_vec();
        if let Some(t) = e.tail {
            v.extend_from_slice(&t);
        }
        Ok(v)
    }
}

fn check_hello(chunks: u32, bits: &[u8], limits: &Limits) -> Result<(), FrameError> {
    if chunks > limits.max_chunks {
        return Err(FrameError::TooManyChunks {
            chunks,
            max: limits.max_chunks,
        });
    }
    let want = (chunks as usize).div_ceil(8);
    if bits.len() != want {
        return Err(FrameError::BadLength {
            frame: "hello",
            len: HELLO_FIXED + bits.len(),
            want: format!("{} for {chunks} chunks", HELLO_FIXED + want),
        });
    }
    if let Some(last) = bits.last()
        && !chunks.is_multiple_of(8)
        && last >> (chunks % 8) != 0
    {
        return Err(FrameError::StrayBits { chunks });
    }
    Ok(())
}

/// Decodes frames from a byte stream (and, copying, encodes them).
#[derive(Debug, Clone, Default)]
pub struct FrameCodec {
    limits: Limits,
}

impl FrameCodec {
    /// A codec enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }

    /// Its limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(prefix) = src.get(..PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let max = self.limits.max_frame();
        if len > max {
            return Err(FrameError::Oversize { len, max });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if src.len() < PREFIX + len {
            // Bounded by `max` above.
            src.reserve(PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(PREFIX);
        let body = src.split_to(len).freeze();
        parse(body, &self.limits).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(buf)? {
            Some(f) => Ok(Some(f)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(buf.len())),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let e = item.encode(&self.limits)?;
        dst.extend_from_slice(&e.head);
        if let Some(t) = e.tail {
            dst.extend_from_slice(&t);
        }
        Ok(())
    }
}

/// One frame body (tag and fields) whose length is already within limits.
fn parse(mut body: Bytes, limits: &Limits) -> Result<Frame, FrameError> {
    let tag = body.get_u8();
    let len = body.len();
    let exact = |frame: &'static str, want: usize| {
        if len == want {
            Ok(())
        } else {
            Err(FrameError::BadLength {
                frame,
                len,
                want: want.to_string(),
            })
        }
    };
    Ok(match tag {
        HELLO => {
            if len < HELLO_FIXED {
                return Err(FrameError::BadLength {
                    frame: "hello",
                    len,
                    want: format!("at least {HELLO_FIXED}"),
                });
            }
            let mut root = [0u8; 32];
            body.copy_to_slice(&mut root);
            let chunks = body.get_u32();
            let depth = body.get_u16();
            check_hello(chunks, &body, limits)?;
            Frame::Hello {
                root,
                chunks,
                depth,
                bits: body,
            }
        }
        HAVE => {
            if !len.is_multiple_of(4) {
                return Err(FrameError::BadLength {
                    frame: "have",
                    len,
                    want: "a multiple of 4".into(),
                });
            }
            let n = len / 4;
            if n == 0 || n > limits.max_have {
                return Err(FrameError::HaveBatch {
                    n,
                    max: limits.max_have,
                });
            }
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                list.push(body.get_u32());
            }
            Frame::Have(list)
        }
        REQUEST | CANCEL | DO_NOT_HAVE => {
            let name = match tag {
                REQUEST => "request",
                CANCEL => "cancel",
                _ => "do-not-have",
            };
            exact(name, 4)?;
            let c = body.get_u32();
            match tag {
                REQUEST => Frame::Request(c),
                CANCEL => Frame::Cancel(c),
                _ => Frame::DoNotHave(c),
            }
        }
        PIECE => {
            if len < 4 {
                return Err(FrameError::BadLength {
                    frame: "piece",
                    len,
                    want: "at least 4".into(),
                });
            }
            if len - 4 > limits.max_piece {
                return Err(FrameError::PieceTooLarge {
                    len: len - 4,
                    max: limits.max_piece,
                });
            }
            let chunk = body.get_u32();
            Frame::Piece { chunk, data: body }
        }
        CHOKE => {
            exact("choke", 0)?;
            Frame::Choke
        }
        UNCHOKE => {
            exact("unchoke", 0)?;
            Frame::Unchoke
        }
        t => return Err(FrameError::UnknownTag(t)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn small() -> Limits {
        Limits {
            max_chunks: 64,
            max_piece: 1024,
            max_have: 8,
        }
    }

    fn decode_all(bytes: &[u8], limits: Limits) -> Result<Vec<Frame>, FrameError> {
        let mut c = FrameCodec::new(limits);
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = c.decode_eof(&mut buf)? {
            out.push(f);
        }
        Ok(out)
    }

    fn raw(len: u32, tag: u8, fields: &[u8]) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.push(tag);
        v.extend_from_slice(fields);
        v
    }

    #[test]
    fn every_frame_round_trips() {
        let l = Limits::default();
        let frames = vec![
            Frame::Hello {
                root: [7; 32],
                chunks: 10,
                depth: 8,
                bits: Bytes::from_static(&[0xff, 0x03]),
            },
            Frame::Have(vec![1, 2, 900]),
            Frame::Request(3),
            Frame::Piece {
                chunk: 4,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Cancel(5),
            Frame::Choke,
            Frame::Unchoke,
            Frame::DoNotHave(6),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(f.to_vec(&l).unwrap());
        }
        assert_eq!(decode_all(&wire, l).unwrap(), frames);
    }

    #[test]
    fn piece_data_shares_the_read_buffer() {
        let l = Limits::default();
        let wire = Frame::Piece {
            chunk: 1,
            data: Bytes::from(vec![9u8; 4096]),
        }
        .to_vec(&l)
        .unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        let start = buf.as_ptr() as usize;
        let Some(Frame::Piece { data, .. }) = FrameCodec::new(l).decode(&mut buf).unwrap() else {
            panic!("not a piece");
        };
        // The data starts 9 bytes into the buffer it was read into: no copy.
        assert_eq!(data.as_ptr() as usize, start + 9);
    }

    #[test]
    fn piece_encodes_without_copying_its_payload() {
        let data = Bytes::from(vec![1u8; 1000]);
        let e = Frame::Piece {
            chunk: 2,
            data: data.clone(),
        }
        .encode(&Limits::default())
        .unwrap();
        assert_eq!(e.head.len(), 9);
        assert_eq!(e.tail.unwrap().as_ptr(), data.as_ptr());
    }

    #[test]
    fn oversize_length_is_refused_before_allocating() {
        let mut c = FrameCodec::new(small());
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let e = c.decode(&mut buf).unwrap_err();
        assert!(matches!(e, FrameError::Oversize { len, .. } if len == u32::MAX as usize));
        assert!(buf.capacity() < 1024, "reserved {}", buf.capacity());
        assert!(e.to_string().contains("over the"), "{e}");
    }

    #[test]
    fn default_max_frame_is_a_piece_plus_header() {
        assert_eq!(Limits::default().max_frame(), MAX_PIECE_BYTES + 5);
        assert_eq!(MAX_BITFIELD_BYTES, 32 << 10);
    }

    #[test]
    fn empty_and_unknown_tag() {
        assert!(matches!(
            decode_all(&0u32.to_be_bytes(), small()),
            Err(FrameError::Empty)
        ));
        let e = decode_all(&raw(1, 99, &[]), small()).unwrap_err();
        assert_eq!(e.to_string(), "unknown frame tag 99");
    }

    #[test]
    fn truncated_frame_at_end_of_stream() {
        let mut wire = Frame::Request(1).to_vec(&small()).unwrap();
        wire.pop();
        let e = decode_all(&wire, small()).unwrap_err();
        assert!(matches!(e, FrameError::Truncated(8)), "{e}");
        // A partial frame mid-stream just waits for more.
        let mut buf = BytesMut::from(&wire[..]);
        assert!(FrameCodec::new(small()).decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn fixed_frames_of_wrong_length() {
        for tag in [REQUEST, CANCEL, DO_NOT_HAVE] {
            let e = decode_all(&raw(4, tag, &[0, 0, 1]), small()).unwrap_err();
            assert!(matches!(e, FrameError::BadLength { len: 3, .. }), "{e}");
        }
        for tag in [CHOKE, UNCHOKE] {
            let e = decode_all(&raw(2, tag, &[0]), small()).unwrap_err();
            assert!(matches!(e, FrameError::BadLength { len: 1, .. }), "{e}");
        }
        let e = decode_all(&raw(3, PIECE, &[0, 0]), small()).unwrap_err();
        assert!(matches!(e, FrameError::BadLength { .. }), "{e}");
    }

    #[test]
    fn hello_limits() {
        let l = small();
        let hello = |chunks: u32, bits: &[u8]| {
            let mut f = vec![3u8; 32];
            f.extend_from_slice(&chunks.to_be_bytes());
            f.extend_from_slice(&8u16.to_be_bytes());
            f.extend_from_slice(bits);
            raw(1 + f.len() as u32, HELLO, &f)
        };
        let e = decode_all(&hello(65, &[0; 9]), l).unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::TooManyChunks {
                    chunks: 65,
                    max: 64
                }
            ),
            "{e}"
        );
        let e = decode_all(&hello(10, &[0; 3]), l).unwrap_err();
        assert!(matches!(e, FrameError::BadLength { .. }), "{e}");
        let e = decode_all(&hello(10, &[0, 0b100]), l).unwrap_err();
        assert!(matches!(e, FrameError::StrayBits { chunks: 10 }), "{e}");
        let e = decode_all(&raw(20, HELLO, &[0; 19]), l).unwrap_err();
        assert!(matches!(e, FrameError::BadLength { .. }), "{e}");
        assert_eq!(decode_all(&hello(10, &[0xff, 0b11]), l).unwrap().len(), 1);
        // The encoder refuses the same.
        let bad = Frame::Hello {
            root: [0; 32],
            chunks: 65,
            depth: 8,
            bits: Bytes::from(vec![0; 9]),
        };
        assert!(bad.encode(&l).is_err());
    }

    #[test]
    fn have_limits() {
        let l = small();
        let e = decode_all(&raw(1, HAVE, &[]), l).unwrap_err();
        assert!(matches!(e, FrameError::HaveBatch { n: 0, .. }), "{e}");
        let e = decode_all(&raw(6, HAVE, &[0; 5]), l).unwrap_err();
        assert!(matches!(e, FrameError::BadLength { .. }), "{e}");
        // Nine indices fit the frame limit (a piece is bigger) but not the batch limit.
        let e = decode_all(&raw(37, HAVE, &[0; 36]), l).unwrap_err();
        assert!(matches!(e, FrameError::HaveBatch { n: 9, max: 8 }), "{e}");
        assert!(Frame::Have(vec![0; 9]).encode(&l).is_err());
        assert!(Frame::Have(vec![]).encode(&l).is_err());
    }

    #[test]
    fn piece_limit() {
        let l = Limits {
            max_have: 1024,
            ..small()
        };
        // A frame within max_frame (a big have) but a piece over max_piece.
        let e = decode_all(&raw(1 + 4 + 1025, PIECE, &[0; 1029]), l).unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::PieceTooLarge {
                    len: 1025,
                    max: 1024
                }
            ),
            "{e}"
        );
        let big = Frame::Piece {
            chunk: 0,
            data: Bytes::from(vec![0; 1025]),
        };
        assert!(big.encode(&l).is_err());
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<[u8; 32]>(),
                any::<u16>(),
                proptest::collection::vec(any::<bool>(), 0..200)
            )
                .prop_map(|(root, depth, have)| Frame::Hello {
                    root,
                    chunks: have.len() as u32,
                    depth,
                    bits: Bytes::from(crate::protocol::pack_bits(&have)),
                }),
            proptest::collection::vec(any::<u32>(), 1..=MAX_HAVE_BATCH).prop_map(Frame::Have),
            any::<u32>().prop_map(Frame::Request),
            (
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..3000)
            )
                .prop_map(|(chunk, d)| Frame::Piece {
                    chunk,
                    data: Bytes::from(d)
                }),
            any::<u32>().prop_map(Frame::Cancel),
            Just(Frame::Choke),
            Just(Frame::Unchoke),
            any::<u32>().prop_map(Frame::DoNotHave),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(arb_frame(), 0..8), cut in 1usize..64) {
            let l = Limits::default();
            let mut wire = Vec::new();
            for f in &frames {
                wire.extend(f.to_vec(&l).unwrap());
            }
            // Fed in arbitrary slices, as a socket would deliver them.
            let mut c = FrameCodec::new(l);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for part in wire.chunks(cut) {
                buf.extend_from_slice(part);
                while let Some(f) = c.decode(&mut buf).unwrap() {
                    out.push(f);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_all(&bytes, small());
            let _ = decode_all(&bytes, Limits::default());
        }

        #[test]
        fn valid_prefix_arbitrary_body_never_panics(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let wire = raw(1 + body.len() as u32, tag, &body);
            let _ = decode_all(&wire, small());
        }
    }
}
