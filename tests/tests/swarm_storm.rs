//! One seed and six fetchers started together on loopback: every fetcher ends
//! byte-identical, and the fetchers feed each other.

use phase_tests::swarm::{SeedSetup, fetcher, sources, summary};

#[test]
fn six_fetchers_start_together() {
    let s = SeedSetup::start(24 << 20, 8 << 20, 32 << 10);
    let (seed_id, _) = s.swarm();
    let outs: Vec<_> = (0..6).map(|i| s.path(&format!("out{i}"))).collect();
    let procs: Vec<_> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| fetcher(&format!("fetcher{i}"), &s.seed.url, &s.seed.pubkey, o, &[]))
        .collect();
    let sums: Vec<_> = procs.iter().map(summary).collect();
    let (mut total, mut from_seed) = (0u64, 0u64);
    let mut best = 0;
    for (o, sum) in outs.iter().zip(&sums) {
        s.assert_same(o);
        let peers = sum["peers"].as_object().expect("peers");
        for (k, v) in peers {
            let b = v["bytes"].as_u64().unwrap_or(0);
            total += b;
            if *k == seed_id || k == "http-seed" {
                from_seed += b;
            }
        }
        let others = sources(sum)
            .into_iter()
            .filter(|k| *k != seed_id && k != "http-seed")
            .count();
        best = best.max(others);
        eprintln!("summary: {sum}");
    }
    eprintln!(
        "seed share: {from_seed} of {total} bytes ({:.1} %)",
        100.0 * from_seed as f64 / total as f64
    );
    assert!(
        best >= 2,
        "no fetcher got chunks from two or more non-seed peers: {sums:?}"
    );
}
