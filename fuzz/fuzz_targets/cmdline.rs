#![no_main]
//! Kernel command lines: parsing never panics, and what parses renders with
//! `to_cmdline` and parses back equal.

use libfuzzer_sys::fuzz_target;
use phase_boot::cmdline::{PhaseConfig, split};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let _ = split(line);
    if let Ok((cfg, _)) = PhaseConfig::parse(line) {
        let again = cfg.to_cmdline();
        let (back, warnings) = PhaseConfig::parse(&again).expect("a rendered line parses");
        assert_eq!(back, cfg, "{line:?} rendered as {again:?}");
        assert!(warnings.is_empty(), "{again:?}: {warnings:?}");
    }
});
