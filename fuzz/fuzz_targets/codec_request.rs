#![no_main]
//! Chunk-protocol requests, both directions: any frame that decodes encodes
//! and decodes back to the same request, and any request that encodes
//! decodes back equal.

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use phase_swarm::protocol::{Request, decode_request, encode_request};

fn request(u: &mut Unstructured<'_>) -> arbitrary::Result<Request> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 => Request::Chunk {
            root: u.arbitrary()?,
            index: u.arbitrary()?,
        },
        1 => Request::Range {
            root: u.arbitrary()?,
            start: u.arbitrary()?,
            count: u.arbitrary()?,
        },
        2 => Request::HaveMap {
            root: u.arbitrary()?,
        },
        3 => Request::Manifest {
            root: u.arbitrary()?,
        },
        _ => Request::Latest {
            channel: u.arbitrary()?,
            arch: u.arbitrary()?,
        },
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_request(data) {
        let wire = encode_request(&req).expect("a request that decoded encodes");
        assert_eq!(decode_request(&wire).expect("and decodes again"), req);
    }
    if let Ok(req) = request(&mut Unstructured::new(data))
        && let Ok(wire) = encode_request(&req)
    {
        assert_eq!(decode_request(&wire).expect("what encodes decodes"), req);
    }
});
