#![no_main]
//! Chunk-protocol responses, both directions: any frame that decodes encodes
//! and decodes back to the same response, and any response that encodes
//! decodes back equal.

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use phase_swarm::protocol::{Piece, Response, decode_response, encode_response};

fn response(u: &mut Unstructured<'_>) -> arbitrary::Result<Response> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => {
            let mut pieces = Vec::new();
            for _ in 0..u.int_in_range(0..=8u8)? {
                pieces.push(Piece {
                    index: u.arbitrary()?,
                    data: u.arbitrary()?,
                });
            }
            Response::Chunks(pieces)
        }
        1 => Response::DoNotHave,
        2 => Response::Busy,
        3 => Response::HaveMap {
            chunks: u.arbitrary()?,
            bits: u.arbitrary()?,
        },
        4 => Response::Manifest(u.arbitrary()?),
        _ => Response::Refused(u.arbitrary()?),
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = decode_response(data) {
        let wire = encode_response(&resp).expect("a response that decoded encodes");
        assert_eq!(decode_response(&wire).expect("and decodes again"), resp);
    }
    if let Ok(resp) = response(&mut Unstructured::new(data))
        && let Ok(wire) = encode_response(&resp)
    {
        assert_eq!(decode_response(&wire).expect("what encodes decodes"), resp);
    }
});
