//! The swarm across network namespaces this file creates (one host each on a
//! bridge), where loopback tests cannot show it:
//! - mDNS-only discovery (multicast does not cross loopback reliably): a seed
//!   in one namespace, a fetcher with no seed URL and no peer address in a
//!   second, and, once the seed is gone, a third fetcher that finds the second
//!   by mDNS alone;
//! - a seed started with default flags (listening on 0.0.0.0) hands a fetcher
//!   on another host its routable libp2p address, so the bytes come over the
//!   swarm and not through the HTTP rescue.
//!
//! Needs root and iproute2; skips (loudly) otherwise, or fails under CI (`CI=true`).

use std::process::Command;
use std::time::Duration;

use phase_tests::swarm::{STEP, seeding_addr, sources, summary};
use phase_tests::{Proc, is_root, make_artifacts, plasmd, require, word_after};

/// Namespaces, a bridge and veth pairs, deleted on drop.
struct Net {
    hub: String,
    nodes: Vec<String>,
    /// The X of the 10.213.X.0/24 the hosts sit on.
    subnet: u32,
}

/// Tests in one process each get their own names and subnet.
static NETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// A hub namespace with a bridge and `n` node namespaces on it, at
    /// 10.213.X.(i+1)/24, each with lo up and a 224.0.0.0/4 route.
    fn new(n: usize) -> Net {
        let k = NETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = format!("{}{k}", std::process::id());
        let subnet = (std::process::id() + 97 * k) % 250;
        let net = Net {
            hub: format!("phs{pid}h"),
            nodes: (0..n).map(|i| format!("phs{pid}n{i}")).collect(),
            subnet,
        };
        ip(&["netns", "add", &net.hub]);
        ip(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.hub, "link", "set", "br0", "up"]);
        for (i, ns) in net.nodes.iter().enumerate() {
            let (inner, outer) = (format!("v{pid}n{i}"), format!("v{pid}h{i}"));
            ip(&["netns", "add", ns]);
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ]);
            ip(&["link", "set", &inner, "netns", ns]);
            ip(&["link", "set", &outer, "netns", &net.hub]);
            ip(&["-n", &net.hub, "link", "set", &outer, "master", "br0"]);
            ip(&["-n", &net.hub, "link", "set", &outer, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            let addr = format!("10.213.{subnet}.{}/24", i + 1);
            ip(&["-n", ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", &inner]);
        }
        net
    }

    fn cmd(&self, i: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.nodes[i]]).arg(plasmd());
        c.env("RUST_LOG", "info,phase_swarm=debug,libp2p=warn");
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The fetched kernel and initramfs in `out` are the published ones.
fn assert_same(artifacts: &std::path::Path, out: &std::path::Path) {
    for name in ["kernel", "initramfs"] {
        let a = std::fs::read(artifacts.join("stable/x86_64").join(name)).expect("read");
        let b = std::fs::read(out.join(name)).expect("read out");
        assert!(a == b, "{name} differs in {}", out.display());
    }
}

/// Root and `ip`, or [`phase_tests::unavailable`] (a failure under CI).
fn can_run() -> bool {
    require(is_root(), "needs root to create network namespaces")
        && require(
            Command::new("ip").arg("-V").output().is_ok(),
            "ip (iproute2) not on PATH",
        )
}

#[test]
fn mdns_only_discovery_in_namespaces() {
    if !can_run() {
        return;
    }
    let bin = plasmd(); // build before timing anything
    assert!(bin.is_file());
    let dir = tempfile::tempdir().expect("tempdir");
    let artifacts = make_artifacts(dir.path(), "stable", "x86_64", 3 << 20, 1 << 20);
    let net = Net::new(3);

    let mut seed = net.cmd(0);
    seed.arg("serve")
        .arg("-a")
        .arg(&artifacts)
        .args([
            "-p",
            "0",
            "--bind",
            "127.0.0.1",
            "--chunk-size",
            "65536",
            "--state",
        ])
        .arg(dir.path().join("seed-state"));
    let mut seed = Proc::spawn("seed", seed).expect("start the seed");
    let banner = seed.wait_for(STEP, |l| l.contains("public key "));
    let pubkey = word_after(&banner, "public key ").expect("key");
    seed.wait_for(STEP, |l| l.contains("serving http://"));

    // No --provider, no --peer: the manifest and the chunks come via mDNS.
    let fetch = |i: usize, out: &std::path::Path, extra: &[&str]| {
        let mut c = net.cmd(i);
        c.args(["fetch", "--pubkey", &pubkey, "--arch", "x86_64", "--json"])
            .args(["--manifest-wait", "60", "--out"])
            .arg(out)
            .args(extra);
        Proc::spawn(&format!("fetcher{i}"), c).expect("start a fetcher")
    };
    let o1 = dir.path().join("out1");
    let f1 = fetch(1, &o1, &["--serve-after"]);
    let s1 = summary(&f1);
    // fetcher1 serves before the seed goes, so fetcher2 has exactly one source.
    seeding_addr(&f1);
    seed.kill();

    let o2 = dir.path().join("out2");
    let mut f2 = fetch(2, &o2, &[]);
    let s2 = summary(&f2);
    assert!(f2.wait_exit(Duration::from_secs(30)).success());

    assert_same(&artifacts, &o1);
    assert_same(&artifacts, &o2);
    let me1 = s1["peer_id"].as_str().expect("peer_id").to_owned();
    assert_eq!(
        sources(&s2),
        vec![me1],
        "the third node fetched from the second alone: {s2}"
    );
    eprintln!("fetcher1: {s1}\nfetcher2: {s2}");
}

/// `plasmd serve -a DIR` with nothing else (port 8080, every interface, as a
/// newcomer types it) in one namespace; `plasmd fetch --no-mdns` in another
/// knows only the seed's URL. The seed's `/swarm` must name an address the
/// fetcher can reach (not loopback), so at least 90 % of the bytes come over
/// libp2p and the HTTP rescue sends nothing.
#[test]
fn a_seed_with_default_flags_serves_another_host_over_the_swarm() {
    if !can_run() {
        return;
    }
    let bin = plasmd();
    assert!(bin.is_file());
    let dir = tempfile::tempdir().expect("tempdir");
    let artifacts = make_artifacts(dir.path(), "stable", "x86_64", 6 << 20, 1 << 20);
    let net = Net::new(2);

    let mut seed = net.cmd(0);
    seed.arg("serve")
        .arg("-a")
        .arg(&artifacts)
        .arg("--state")
        .arg(dir.path().join("seed-state"));
    let seed = Proc::spawn("seed", seed).expect("start the seed");
    let banner = seed.wait_for(STEP, |l| l.contains("public key "));
    let pubkey = word_after(&banner, "public key ").expect("key");
    seed.wait_for(STEP, |l| l.contains("serving http://0.0.0.0:8080"));
    let seed_ip = format!("10.213.{}.1", net.subnet);

    let out = dir.path().join("out");
    let mut c = net.cmd(1);
    c.args([
        "fetch",
        "--pubkey",
        &pubkey,
        "--arch",
        "x86_64",
        "--json",
        "--no-mdns",
    ])
    .args(["--provider", &format!("http://{seed_ip}:8080"), "--out"])
    .arg(&out);
    let mut f = Proc::spawn("fetcher", c).expect("start the fetcher");
    let sum = summary(&f);
    assert!(f.wait_exit(Duration::from_secs(30)).success(), "{sum}");
    assert_same(&artifacts, &out);
    let total = sum["bytes"].as_u64().expect("bytes");
    let peers = sum["peers"].as_object().expect("peers");
    let http = peers
        .get("http-seed")
        .and_then(|v| v["bytes"].as_u64())
        .unwrap_or(0);
    let swarm: u64 = peers
        .iter()
        .filter(|(k, _)| *k != "http-seed")
        .filter_map(|(_, v)| v["bytes"].as_u64())
        .sum();
    assert!(
        total > 0 && swarm * 10 >= total * 9,
        "at least 90 % over libp2p: {sum}"
    );
    assert_eq!(http, 0, "the HTTP rescue was not needed: {sum}");
    eprintln!("fetcher: {sum}");
}
