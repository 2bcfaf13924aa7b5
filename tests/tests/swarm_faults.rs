//! Faults on loopback with real `plasmd` processes: a lying peer, a provider
//! killed mid-transfer, the seed gone after one fetcher finished.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use phase_content::{CorruptingStore, FsStore, PublicKey, SignedManifest};
use phase_swarm::{Node, NodeConfig};
use phase_tests::swarm::{
    STEP, SeedSetup, fetcher, peer_of, seeding_addr, sources, summary, summary_beside,
};

/// A peer that serves corrupted chunks is banned on its first bad chunk and
/// the fetch completes byte-identical from the honest ones.
#[test]
fn lying_peer_is_banned_and_fetch_completes() {
    let s = SeedSetup::start(3 << 20, 1 << 20, 16 << 10);
    // The liar: an in-process node holding every chunk (the seed's own
    // store), serving them through a store that corrupts every chunk.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pk: PublicKey = s.seed.pubkey.parse().expect("pubkey");
    let body = ureq::get(&format!("{}/stable/x86_64/manifest.json", s.seed.url))
        .call()
        .expect("manifest")
        .body_mut()
        .read_to_vec()
        .expect("body");
    let manifest = SignedManifest::verify(&body, &pk).expect("verify");
    let store = FsStore::open(s.path("seed-state").join("store")).expect("store");
    let store = CorruptingStore::new(store);
    let liar_addr = rt.block_on(async {
        let cfg = NodeConfig::default()
            .with_mdns(false)
            .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")]);
        let h = Node::spawn(cfg, Arc::new(store)).expect("liar node");
        h.seed(manifest).await.expect("seed");
        let a = h.listen_addrs().await.expect("addrs")[0].clone();
        let id = h.peer_id();
        // Keep the node alive for the runtime's lifetime.
        tokio::spawn(async move {
            let _h = h;
            std::future::pending::<()>().await
        });
        format!("{a}/p2p/{id}")
    });
    let liar = peer_of(&liar_addr);

    let out = s.path("out");
    let f = fetcher(
        "fetcher",
        &s.seed.url,
        &s.seed.pubkey,
        &out,
        &["--peer", &liar_addr],
    );
    let sum = summary(&f);
    s.assert_same(&out);
    let banned: Vec<&str> = sum["banned"]
        .as_array()
        .expect("banned")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(banned, vec![liar.as_str()], "{sum}\n{}", f.output());
    assert!(
        !sources(&sum).contains(&liar),
        "no bytes counted from the liar: {sum}"
    );
    assert!(
        f.output()
            .contains("banned: sent a chunk that failed verification"),
        "the ban is logged"
    );
}

/// `held/total` from a plain progress line of `plasmd fetch`
/// (`plasmd fetch: 1.2 s: 300/1024 chunks, kernel ..., 3 peers`).
fn progress(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("plasmd fetch: ")?.split_once(" s: ")?.1;
    let (counts, _) = rest.split_once(" chunks")?;
    let (held, total) = counts.split_once('/')?;
    Some((held.parse().ok()?, total.parse().ok()?))
}

/// The chunk files in an `FsStore`'s `chunks/` directory (written by rename,
/// so every file there is a whole verified chunk).
fn chunk_files(chunks: &Path) -> u64 {
    std::fs::read_dir(chunks)
        .map(|dirs| {
            dirs.filter_map(Result::ok)
                .filter_map(|d| std::fs::read_dir(d.path()).ok())
                .map(|files| files.count() as u64)
                .sum()
        })
        .unwrap_or(0)
}

/// Two providers hold everything; one is killed while the fetcher is
/// mid-transfer, after it has served part of it; the fetch completes
/// byte-identical from the other (and the seed).
#[test]
fn provider_killed_mid_transfer() {
    // 48 + 16 MiB in 64 KiB chunks: 1024 chunks from four sources (seed node,
    // HTTP seed, p1, p2), long enough that p1 has served chunks by the time an
    // eighth are held, and that most are still missing when it dies.
    const TOTAL: u64 = (64 << 20) / (64 << 10);
    let s = SeedSetup::start(48 << 20, 16 << 20, 64 << 10);
    let (o1, o2, o3) = (s.path("p1"), s.path("p2"), s.path("out"));
    let state = s.path("fetcher-state");
    let mut p1 = fetcher("p1", &s.seed.url, &s.seed.pubkey, &o1, &["--serve-after"]);
    let a1 = seeding_addr(&p1);
    let killed = peer_of(&a1);
    let p2 = fetcher("p2", &s.seed.url, &s.seed.pubkey, &o2, &["--serve-after"]);
    let a2 = seeding_addr(&p2);
    let state_arg = state.to_str().expect("utf-8 temp path");
    let f = fetcher(
        "fetcher",
        &s.seed.url,
        &s.seed.pubkey,
        &o3,
        &["--peer", &a1, "--peer", &a2, "--state", state_arg],
    );
    let line = f.wait_for(STEP, |l| {
        progress(l).is_some_and(|(held, total)| held >= total / 8 && held < total)
    });
    // Frozen, the fetcher cannot get further while p1 dies, so the chunks it
    // holds on disk at that moment say whether the kill landed mid-transfer.
    f.signal(libc::SIGSTOP);
    p1.kill();
    let held_at_kill = chunk_files(&state.join("store/chunks"));
    f.signal(libc::SIGCONT);
    eprintln!("killed p1 with {held_at_kill}/{TOTAL} chunks held, after: {line}");
    assert!(
        held_at_kill < TOTAL,
        "the fetch had all {TOTAL} chunks before p1 was killed: the transfer is too short"
    );

    let sum = summary_beside(&f, &[&p1, &p2]);
    s.assert_same(&o3);
    assert_eq!(sum["ok"], serde_json::Value::Bool(true), "{sum}");
    let served = sum["peers"][&killed]["bytes"].as_u64().unwrap_or(0);
    assert!(
        served > 0,
        "the killed provider {killed} served nothing before the kill: {sum}\n{}",
        f.output()
    );
    let bytes = sum["bytes"].as_u64().expect("bytes in summary");
    assert!(
        served < bytes,
        "the killed provider {killed} is counted for every byte: {sum}"
    );
    eprintln!("summary: {sum}");
}

/// The seed stops after one fetcher has finished; a new fetcher, given only
/// that fetcher's address (and the dead seed's URL), completes from it alone.
#[test]
fn seed_gone_fetch_from_first_fetcher_alone() {
    let s = SeedSetup::start(2 << 20, 1 << 20, 16 << 10);
    let o1 = s.path("first");
    let first = fetcher(
        "first",
        &s.seed.url,
        &s.seed.pubkey,
        &o1,
        &["--serve-after"],
    );
    let addr = seeding_addr(&first);
    s.assert_same(&o1);
    let (url, pk) = (s.seed.url.clone(), s.seed.pubkey.clone());
    let mut s = s;
    s.seed.proc.kill();
    let o2 = s.path("second");
    let mut second = fetcher(
        "second",
        &url,
        &pk,
        &o2,
        &["--peer", &addr, "--manifest-wait", "20"],
    );
    let sum = summary_beside(&second, &[&first]);
    s.assert_same(&o2);
    assert_eq!(sources(&sum), vec![peer_of(&addr)], "{sum}");
    assert!(second.wait_exit(Duration::from_secs(30)).success());
}
