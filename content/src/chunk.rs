//! Fixed-size chunking.

use std::io::Read;

use crate::Hash;

/// Default chunk size: 256 KiB. A 13 MB boot set is then about 52 chunks, far
/// more than log2 of any storm size we run (the M >> log2 N of decision 1 in the
/// workspace's top-level DESIGN.md), while per-chunk request overhead stays
/// under 1 %.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;

/// The blake3 hash of every `chunk_size` piece of `data`.
pub fn chunk_hashes(data: &[u8], chunk_size: u32) -> Vec<Hash> {
    data.chunks(chunk_size as usize).map(Hash::of).collect()
}

/// Reads `reader` to the end in `chunk_size` pieces, calling `each` with every
/// chunk and its hash; returns the whole hash, the size and the chunk hashes.
///
/// One pass: the whole-artifact hash is computed alongside the chunk hashes.
pub fn chunk_reader<R: Read, E>(
    mut reader: R,
    chunk_size: u32,
    mut each: impl FnMut(Hash, &[u8]) -> Result<(), E>,
) -> Result<(Hash, u64, Vec<Hash>), ChunkReadError<E>> {
    let mut whole = blake3::Hasher::new();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut hashes = Vec::new();
    let mut size = 0u64;
    loop {
        let n = read_full(&mut reader, &mut buf).map_err(ChunkReadError::Io)?;
        if n == 0 {
            break;
        }
        let piece = &buf[..n];
        whole.update(piece);
        let h = Hash::of(piece);
        each(h, piece).map_err(ChunkReadError::Sink)?;
        hashes.push(h);
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok((whole.finalize().into(), size, hashes))
}

/// What went wrong in [`chunk_reader`]: reading, or the callback.
#[derive(Debug)]
pub enum ChunkReadError<E> {
    /// Reading the input failed.
    Io(std::io::Error),
    /// The callback failed.
    Sink(E),
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reader_matches_slice(data in proptest::collection::vec(any::<u8>(), 0..40_000), cs in 1u32..9000) {
            let mut seen = Vec::new();
            let (whole, size, hashes) = chunk_reader::<_, ()>(&data[..], cs, |h, c| {
                assert_eq!(h, Hash::of(c));
                seen.extend_from_slice(c);
                Ok(())
            }).unwrap();
            prop_assert_eq!(seen, data.clone());
            prop_assert_eq!(whole, Hash::of(&data));
            prop_assert_eq!(size, data.len() as u64);
            prop_assert_eq!(hashes, chunk_hashes(&data, cs));
        }
    }
}
