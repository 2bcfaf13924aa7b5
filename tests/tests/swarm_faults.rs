//! Faults on loopback with real `plasmd` processes: a lying peer, a provider
//! killed mid-transfer, the seed gone after one fetcher finished.

use std::sync::Arc;
use std::time::Duration;

use phase_content::{CorruptingStore, FsStore, PublicKey, SignedManifest};
use phase_swarm::{Node, NodeConfig};
use phase_tests::swarm::{STEP, SeedSetup, fetcher, peer_of, seeding_addr, sources, summary};

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
    assert_eq!(banned, vec![liar.as_str()], "{sum}");
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

/// Two providers hold everything; one is killed while the fetcher is pulling
/// from it; the fetch completes from the other (and the seed).
#[test]
fn provider_killed_mid_transfer() {
    let s = SeedSetup::start(48 << 20, 16 << 20, 64 << 10);
    let (o1, o2, o3) = (s.path("p1"), s.path("p2"), s.path("out"));
    let p1 = fetcher("p1", &s.seed.url, &s.seed.pubkey, &o1, &["--serve-after"]);
    let a1 = seeding_addr(&p1);
    let p2 = fetcher("p2", &s.seed.url, &s.seed.pubkey, &o2, &["--serve-after"]);
    let a2 = seeding_addr(&p2);
    let mut p1 = p1;
    let f = fetcher(
        "fetcher",
        &s.seed.url,
        &s.seed.pubkey,
        &o3,
        &["--peer", &a1, "--peer", &a2],
    );
    // Kill p1 once the transfer is under way (some chunks held, not all).
    let line = f.wait_for(STEP, |l| {
        l.contains(" chunks, ") && !l.contains(" 0/") && {
            let held = l.split("s: ").nth(1).and_then(|r| r.split('/').next());
            let total = l.split('/').nth(1).and_then(|r| r.split(' ').next());
            held != total
        }
    });
    p1.kill();
    eprintln!("killed p1 at: {line}");
    let sum = summary(&f);
    s.assert_same(&o3);
    assert!(sum["ok"].as_bool().unwrap_or(false));
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
    let sum = summary(&second);
    s.assert_same(&o2);
    assert_eq!(sources(&sum), vec![peer_of(&addr)], "{sum}");
    assert!(second.wait_exit(Duration::from_secs(30)).success());
}
