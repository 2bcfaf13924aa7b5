#![no_main]
//! HTTP `Range` headers: parsing never panics and a range it serves lies
//! inside the body.

use libfuzzer_sys::fuzz_target;
use phase_content::range::{RangeReq, parse_range};

fuzz_target!(|data: &[u8]| {
    let Some((raw, header)) = data.split_first_chunk::<8>() else {
        return;
    };
    // Small bodies most of the time, so both ends of a range are reachable.
    let len = u64::from_le_bytes(*raw) >> (raw[7] & 63);
    let header = std::str::from_utf8(header).ok();
    match parse_range(header, len) {
        RangeReq::Part(start, end) => assert!(start < end && end <= len, "{start}..{end} of {len}"),
        RangeReq::Full | RangeReq::Unsatisfiable => {}
    }
    assert_eq!(parse_range(None, len), RangeReq::Full);
});
