#![no_main]
//! cpio newc archives: any entries the writer accepts read back, in order,
//! as exactly what was written, and the archive ends at its trailer (no
//! accepted name can end it early).

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use phase_boot::cpio::Writer;

#[derive(Arbitrary, Debug)]
enum Entry {
    Dir(String, u32),
    File(String, u32, Vec<u8>),
    Symlink(String, String),
    CharDev(String, u32, u32, u32),
}

/// What a reader sees of one entry: name, mode, rdev, body.
type Seen = (String, u32, (u32, u32), Vec<u8>);

/// A minimal newc reader, independent of the writer: entries up to the trailer.
fn read(mut b: &[u8]) -> Vec<Seen> {
    let total = b.len();
    let mut out = Vec::new();
    loop {
        let at = total - b.len();
        assert_eq!(at % 4, 0, "header at {at} not aligned");
        assert_eq!(&b[..6], b"070701", "magic at {at}");
        let field = |i: usize| {
            let hex = std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).expect("ascii");
            u32::from_str_radix(hex, 16).expect("hex field")
        };
        let (mode, size, rdev, namesize) = (field(1), field(6), (field(9), field(10)), field(11));
        let name_end = 110 + namesize as usize;
        assert_eq!(b[name_end - 1], 0, "name not NUL-terminated");
        let name = std::str::from_utf8(&b[110..name_end - 1]).expect("UTF-8 name");
        assert!(!name.contains('\0'), "NUL inside {name:?}");
        let body_at = (at + name_end).next_multiple_of(4) - at;
        let body = b[body_at..body_at + size as usize].to_vec();
        let next = (at + body_at + size as usize).next_multiple_of(4) - at;
        if name == "TRAILER!!!" {
            let rest = &b[next..];
            assert_eq!(total % 512, 0, "archive not padded to 512");
            assert!(rest.iter().all(|&c| c == 0), "bytes after the trailer");
            return out;
        }
        out.push((name.to_owned(), mode, rdev, body));
        b = &b[next..];
    }
}

fuzz_target!(|entries: Vec<Entry>| {
    let mut w = Writer::new(Vec::new());
    let mut want: Vec<Seen> = Vec::new();
    for e in &entries {
        let before = w.written();
        let (path, seen, result) = match e {
            Entry::Dir(p, perm) => (
                p,
                (0o040000 | (perm & 0o7777), (0, 0), vec![]),
                w.dir(p, *perm),
            ),
            Entry::File(p, perm, data) => (
                p,
                (0o100000 | (perm & 0o7777), (0, 0), data.clone()),
                w.file(p, *perm, data),
            ),
            Entry::Symlink(p, t) => (
                p,
                (0o120777, (0, 0), t.clone().into_bytes()),
                w.symlink(p, t),
            ),
            Entry::CharDev(p, perm, ma, mi) => (
                p,
                (0o020000 | (perm & 0o7777), (*ma, *mi), vec![]),
                w.char_dev(p, *perm, *ma, *mi),
            ),
        };
        match result {
            Ok(()) => want.push((
                path.trim_start_matches('/').to_owned(),
                seen.0,
                seen.1,
                seen.2,
            )),
            Err(_) => assert_eq!(w.written(), before, "a refused entry wrote bytes"),
        }
    }
    let archive = w.finish().expect("finish");
    assert_eq!(read(&archive), want);
});
