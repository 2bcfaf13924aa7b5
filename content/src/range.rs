//! The HTTP `Range` header of the seed's raw artifact downloads, parsed
//! purely (RFC 9110 section 14), so it can be unit-tested and fuzzed apart
//! from the server.
//!
//! ```
//! use phase_content::range::{RangeReq, parse_range};
//!
//! assert_eq!(parse_range(Some("bytes=0-3"), 10), RangeReq::Part(0, 4));
//! assert_eq!(parse_range(Some("bytes=-3"), 10), RangeReq::Part(7, 10));
//! assert_eq!(parse_range(Some("bytes=10-"), 10), RangeReq::Unsatisfiable);
//! ```

/// A byte range request, resolved against a length: `start..end` (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeReq {
    /// No usable Range header: the whole body.
    Full,
    /// One satisfiable range, `start < end <= len`.
    Part(u64, u64),
    /// A range outside the body.
    Unsatisfiable,
}

/// Parses a `Range` header value (`None` when absent or not visible ASCII)
/// for one range against a body of `len` bytes; several ranges are served as
/// the whole body, which RFC 9110 allows.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeReq {
    let Some(spec) = header.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeReq::Unsatisfiable;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, false) => b
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .map(|n| (len.saturating_sub(n), len)),
        (false, true) => a.parse::<u64>().ok().map(|s| (s, len)),
        (false, false) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some((s, e.saturating_add(1).min(len))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        Some((s, e)) if s < len && s < e => RangeReq::Part(s, e),
        _ => RangeReq::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |s: &str, len| parse_range(Some(s), len);
        assert_eq!(parse_range(None, 10), RangeReq::Full);
        assert_eq!(r("bytes=0-3", 10), RangeReq::Part(0, 4));
        assert_eq!(r(" bytes= 2 - 3 ", 10), RangeReq::Part(2, 4));
        assert_eq!(r("bytes=5-", 10), RangeReq::Part(5, 10));
        assert_eq!(r("bytes=-3", 10), RangeReq::Part(7, 10));
        assert_eq!(r("bytes=-30", 10), RangeReq::Part(0, 10));
        assert_eq!(r("bytes=8-100", 10), RangeReq::Part(8, 10));
        assert_eq!(r("bytes=0-18446744073709551615", 10), RangeReq::Part(0, 10));
        assert_eq!(r("bytes=-0", 10), RangeReq::Unsatisfiable);
        assert_eq!(r("bytes=10-", 10), RangeReq::Unsatisfiable);
        assert_eq!(r("bytes=0-0", 0), RangeReq::Unsatisfiable);
        assert_eq!(r("bytes=4-2", 10), RangeReq::Unsatisfiable);
        assert_eq!(r("bytes=x-2", 10), RangeReq::Unsatisfiable);
        assert_eq!(r("bytes=-", 10), RangeReq::Unsatisfiable);
        assert_eq!(r("bytes=3", 10), RangeReq::Unsatisfiable);
        assert_eq!(r("bytes=0-1,4-5", 10), RangeReq::Full);
        assert_eq!(r("items=0-1", 10), RangeReq::Full);
    }
}
