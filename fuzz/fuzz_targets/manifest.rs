#![no_main]
//! Manifest envelopes from untrusted peers and seeds: parsing must never panic
//! and must never accept bytes the pinned key did not sign.

use libfuzzer_sys::fuzz_target;
use phase_content::{SecretKey, SignedManifest};

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_seed([7; 32]).public();
    if let Ok(m) = SignedManifest::verify(data, &key) {
        // Only a real signature by seed [7; 32] could get here.
        assert_eq!(m.manifest().publisher, key);
    }
    let _ = SignedManifest::claimed_publisher(data);
});
