#![no_main]
//! `/proc/iomem` text: parsing never panics and every range it returns is
//! non-empty.

use libfuzzer_sys::fuzz_target;
use phase_boot::kexec::parse_iomem;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ranges = parse_iomem(text);
    assert!(ranges.len() <= text.lines().count());
    for r in ranges {
        assert!(r.start < r.end, "{r:?}");
    }
});
