//! Chunk-and-hash throughput against raw blake3 over the same bytes.
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use phase_content::{DEFAULT_CHUNK_SIZE, Hash, MemStore, chunk_reader};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut g = c.benchmark_group("64MiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("raw_blake3", |b| {
        b.iter(|| black_box(Hash::of(black_box(&data))))
    });
    g.bench_function("chunk_and_hash", |b| {
        b.iter(|| {
            chunk_reader::<_, ()>(black_box(&data[..]), DEFAULT_CHUNK_SIZE, |h, c| {
                black_box((h, c));
                Ok(())
            })
            .map(|r| r.0)
        })
    });
    g.bench_function("chunk_hash_store_mem", |b| {
        b.iter(|| {
            let store = MemStore::new();
            chunk_reader(black_box(&data[..]), DEFAULT_CHUNK_SIZE, |h, c| {
                phase_content::ChunkStore::put(&store, &h, c).map(|_| ())
            })
            .map(|r| r.0)
            .ok()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
