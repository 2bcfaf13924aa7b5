#![no_main]
//! arm64 `Image` headers: parsing never panics, and for an Image that parses
//! the `kexec_load` plan either fails cleanly or puts every segment, page
//! aligned and without overlap, inside one RAM range.

use libfuzzer_sys::fuzz_target;
use phase_boot::dtb::{Fdt, Node};
use phase_boot::kexec::{Arm64Inputs, PAGE, Range, arm64_header, plan_arm64};

fuzz_target!(|data: &[u8]| {
    // The first 16 bytes are a RAM range, the rest the Image.
    let Some((ram, image)) = data.split_first_chunk::<16>() else {
        return;
    };
    let Ok(hdr) = arm64_header(image) else {
        return;
    };
    assert!(hdr.image_size >= image.len() as u64);
    assert_eq!(hdr.text_offset % PAGE, 0);

    let start = u64::from_le_bytes(ram[..8].try_into().expect("8 bytes"));
    let end = start.saturating_add(u64::from_le_bytes(ram[8..].try_into().expect("8 bytes")));
    let memory = [Range { start, end }];
    let dtb = Fdt {
        boot_cpuid: 0,
        reserved: Vec::new(),
        root: Node::default(),
    }
    .to_bytes();
    let inputs = Arm64Inputs {
        dtb: &dtb,
        memory: &memory,
        entropy: &[1; 40],
    };
    let Ok(plan) = plan_arm64(image, Some(b"initrd"), "console=ttyAMA0", &inputs) else {
        return;
    };
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for s in &plan.segments {
        assert_eq!(s.mem % PAGE, 0, "{}", s.what);
        assert_eq!(s.memsz % PAGE, 0, "{}", s.what);
        assert!(s.memsz >= s.buf.len() as u64, "{}", s.what);
        let e = s.mem.checked_add(s.memsz).expect("segment end fits");
        assert!(s.mem >= start && e <= end, "{} outside RAM", s.what);
        spans.push((s.mem, e));
    }
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "segments overlap: {spans:x?}");
    }
    assert_eq!(Some(plan.entry), plan.segments.last().map(|s| s.mem));
});
