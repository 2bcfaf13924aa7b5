#![no_main]
//! Device tree blobs: parsing never panics; a tree that parses encodes and
//! parses back equal, and the kexec `/chosen` patch applies to it and reads
//! back.

use libfuzzer_sys::fuzz_target;
use phase_boot::dtb::{ChosenPatch, Fdt, MAX_DTB, patch_chosen};

fuzz_target!(|data: &[u8]| {
    let Ok(fdt) = Fdt::parse(data) else {
        return;
    };
    let bytes = fdt.to_bytes();
    assert_eq!(Fdt::parse(&bytes).expect("a re-encoded tree parses"), fdt);

    let patch = ChosenPatch {
        bootargs: "console=ttyAMA0 phase.provider=http://10.0.2.2",
        initrd: Some((0x4800_0000, 0x4900_0000)),
        kaslr_seed: 0x0123_4567_89ab_cdef,
        rng_seed: Some(vec![7; 32]),
    };
    let patched = match patch_chosen(data, &patch) {
        Ok(p) => p,
        Err(e) => {
            assert!(data.len() > MAX_DTB / 2, "small tree refused: {e}");
            return;
        }
    };
    let back = Fdt::parse(&patched).expect("a patched tree parses");
    let chosen = back.node("/chosen").expect("/chosen exists");
    let cell = |name| chosen.prop(name).map(<[u8]>::to_vec);
    assert_eq!(
        cell("bootargs").as_deref(),
        Some(&b"console=ttyAMA0 phase.provider=http://10.0.2.2\0"[..])
    );
    assert_eq!(
        cell("linux,initrd-start"),
        Some(0x4800_0000u64.to_be_bytes().to_vec())
    );
    assert_eq!(
        cell("linux,initrd-end"),
        Some(0x4900_0000u64.to_be_bytes().to_vec())
    );
    assert_eq!(
        cell("kaslr-seed"),
        Some(patch.kaslr_seed.to_be_bytes().to_vec())
    );
    assert_eq!(cell("rng-seed"), Some(vec![7; 32]));
    assert_eq!(cell("linux,elfcorehdr"), None);
    assert_eq!(back.boot_cpuid, fdt.boot_cpuid);
    assert_eq!(back.reserved, fdt.reserved);
});
