//! A bounded neighbourhood in a namespace storm: a seed and 48 `plasmd fetch`
//! nodes, each in its own network namespace on one bridge (100 Mbit/s each
//! way per host, so the seed alone cannot carry the storm quickly), with
//! K = 8 (`--max-neighbours`). Every node finds the others by mDNS (48
//! candidates each, far above K) and the seed by its `/swarm` addresses.
//! From each node's own `--json` summary: it never held more than K
//! neighbours, and its artifacts are byte-identical to the published ones.
//!
//! Needs root, `ip` and `tc` (iproute2); skips (loudly) otherwise, or fails
//! under CI (`CI=true`).

use std::process::Command;
use std::time::Instant;

use phase_tests::swarm::{STEP, sources, summary};
use phase_tests::{Proc, is_root, make_artifacts, plasmd, require, word_after};
use simulations::netns::{Shape, Topology};

const NODES: usize = 48;
const K: u64 = 8;

fn can_run() -> bool {
    require(is_root(), "needs root to create network namespaces")
        && require(
            Command::new("ip").arg("-V").output().is_ok(),
            "ip (iproute2) not on PATH",
        )
        && require(
            Command::new("tc").arg("-V").output().is_ok(),
            "tc (iproute2) not on PATH",
        )
}

#[test]
fn forty_eight_nodes_hold_at_most_k_neighbours_and_complete_identical() {
    if !can_run() {
        return;
    }
    let bin = plasmd(); // built before anything is timed
    assert!(bin.is_file());
    let dir = tempfile::tempdir().expect("tempdir");
    // 4 MiB in 64 KiB chunks: 64 chunks, enough for peers to trade.
    let artifacts = make_artifacts(dir.path(), "stable", "x86_64", 3 << 20, 1 << 20);
    let link = Shape {
        up_bps: 100_000_000,
        down_bps: 100_000_000,
    };
    let topo = Topology::create(&format!("{}k", std::process::id()), NODES, link, link)
        .expect("create the namespaces");
    let ns_cmd = |ns: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(&bin);
        c
    };

    let mut seed = ns_cmd(&topo.seed.ns);
    seed.arg("serve")
        .arg("-a")
        .arg(&artifacts)
        .args(["--chunk-size", "65536", "--state"])
        .arg(dir.path().join("seed-state"));
    let seed = Proc::spawn("seed", seed).expect("start the seed");
    let banner = seed.wait_for(STEP, |l| l.contains("public key "));
    let pubkey = word_after(&banner, "public key ").expect("key");
    seed.wait_for(STEP, |l| l.contains("serving http://"));
    let provider = format!("http://{}:8080", topo.seed.ip);

    let start = Instant::now();
    let outs: Vec<_> = (0..NODES)
        .map(|i| dir.path().join(format!("out{i}")))
        .collect();
    let mut procs: Vec<Proc> = topo
        .nodes
        .iter()
        .zip(&outs)
        .enumerate()
        .map(|(i, (h, out))| {
            let mut c = ns_cmd(&h.ns);
            c.args(["fetch", "--provider", &provider, "--pubkey", &pubkey])
                .args(["--arch", "x86_64", "--json", "--mode", "lan"])
                .args(["--max-neighbours", &K.to_string(), "--out"])
                .arg(out)
                .env("PLASMD_STATE", out.with_extension("state"));
            Proc::spawn(&format!("node{i}"), c).expect("start a fetcher")
        })
        .collect();
    let sums: Vec<serde_json::Value> = procs.iter().map(summary).collect();
    let storm = start.elapsed();
    for p in &mut procs {
        assert!(p.wait_exit(STEP).success(), "{} failed", p.name());
    }

    let src = artifacts.join("stable/x86_64");
    let published: Vec<Vec<u8>> = ["kernel", "initramfs"]
        .iter()
        .map(|n| std::fs::read(src.join(n)).expect("read published"))
        .collect();
    let (mut peak_max, mut conn_max, mut swarm_sources, mut http) = (0, 0, 0usize, 0u64);
    for ((out, sum), p) in outs.iter().zip(&sums).zip(&procs) {
        for (name, want) in ["kernel", "initramfs"].iter().zip(&published) {
            let got = std::fs::read(out.join(name)).expect("read fetched");
            assert!(got == *want, "{name} from {} differs", p.name());
        }
        assert_eq!(sum["ok"], true, "{}: {sum}", p.name());
        let peak = sum["neighbours_peak"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no neighbours_peak in {sum}", p.name()));
        assert!(
            (1..=K).contains(&peak),
            "{} held {peak} neighbours at once, K is {K}: {sum}",
            p.name()
        );
        peak_max = peak_max.max(peak);
        conn_max = conn_max.max(sum["connections_peak"].as_u64().unwrap_or(0));
        let peers = sources(sum).into_iter().filter(|s| s != "http-seed");
        swarm_sources = swarm_sources.max(peers.count());
        http += sum["peers"]["http-seed"]["bytes"].as_u64().unwrap_or(0);
    }
    eprintln!(
        "{NODES} nodes, K {K}: all byte-identical in {:.2} s; most neighbours held by one \
         node {peak_max}, most libp2p connections at once {conn_max} (refused ones included), \
         most swarm peers one node got chunks from {swarm_sources}, HTTP rescue {http} bytes",
        storm.as_secs_f64()
    );
    // Not a full mesh: peers fed each other, yet none had more than K.
    assert!(
        swarm_sources >= 2,
        "no node got chunks from two or more peers: {sums:?}"
    );
    drop(seed);
    drop(topo);
}
