#![no_main]
//! `/phase/swarm/2` frames off the wire: decoding never panics, and every
//! frame decoded re-encodes to exactly the bytes it came from (the format
//! has one encoding per frame).

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use phase_swarm::v2::{FrameCodec, Limits};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    // Tight limits half the time, so every limit check is reached by small inputs.
    let limits = if pick & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_chunks: 100,
            max_piece: 64,
            max_have: 4,
        }
    };
    let mut codec = FrameCodec::new(limits);
    let mut buf = BytesMut::from(stream);
    loop {
        let at = stream.len() - buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                let used = &stream[at..stream.len() - buf.len()];
                let again = frame.to_vec(&limits).expect("a decoded frame encodes");
                assert_eq!(again, used, "{frame:?}");
            }
            Ok(None) => {
                let _ = codec.decode_eof(&mut buf);
                break;
            }
            Err(_) => break,
        }
    }
});
