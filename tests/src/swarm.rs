//! Helpers for the swarm tests: seeds and fetchers on loopback with mDNS off,
//! and checks on what `plasmd fetch` wrote and printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, Seed, make_artifacts, plasmd};

/// How long any one step may take before a test fails.
pub const STEP: Duration = Duration::from_secs(120);

/// A seed's directories and the seed itself.
pub struct SeedSetup {
    /// Temporary root (artifacts, state, outputs).
    pub dir: tempfile::TempDir,
    /// DIR/artifacts.
    pub artifacts: PathBuf,
    /// The running seed.
    pub seed: Seed,
}

impl SeedSetup {
    /// Publishes `kernel`/`initramfs` pseudo-random bytes in `chunk`-byte chunks
    /// and starts `plasmd serve` on 127.0.0.1 with mDNS off.
    pub fn start(kernel: usize, initramfs: usize, chunk: u32) -> SeedSetup {
        let dir = tempfile::tempdir().expect("tempdir");
        let artifacts = make_artifacts(dir.path(), "stable", "x86_64", kernel, initramfs);
        let seed = start_seed(&artifacts, &dir.path().join("seed-state"), chunk);
        SeedSetup {
            dir,
            artifacts,
            seed,
        }
    }

    /// `DIR/NAME`, for outputs.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The seed's `/swarm` answer: (peer id, addrs).
    pub fn swarm(&self) -> (String, Vec<String>) {
        let body = ureq::get(&format!("{}/swarm", self.seed.url))
            .call()
            .expect("GET /swarm")
            .body_mut()
            .read_to_string()
            .expect("body");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let id = v["peer_id"].as_str().expect("peer_id").to_owned();
        let addrs = v["addrs"]
            .as_array()
            .expect("addrs")
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        (id, addrs)
    }

    /// Asserts `out` holds artifacts byte-identical to the published ones.
    pub fn assert_same(&self, out: &Path) {
        let src = self.artifacts.join("stable/x86_64");
        for name in ["kernel", "initramfs"] {
            let a = std::fs::read(src.join(name)).expect("read source");
            let b = std::fs::read(out.join(name))
                .unwrap_or_else(|e| panic!("read {}: {e}", out.join(name).display()));
            assert!(
                a == b,
                "{name} in {} differs from the published one",
                out.display()
            );
        }
        assert!(out.join("manifest.json").is_file());
    }
}

/// Starts `plasmd serve` on 127.0.0.1, mDNS off, with `--chunk-size`.
pub fn start_seed(artifacts: &Path, state: &Path, chunk: u32) -> Seed {
    Seed::start(artifacts, state, &["--chunk-size", &chunk.to_string()])
}

/// `plasmd fetch` on 127.0.0.1 with mDNS off and `--json`; `extra` appended.
pub fn fetcher(name: &str, provider: &str, pubkey: &str, out: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(plasmd());
    cmd.args(["fetch", "--provider", provider, "--pubkey", pubkey])
        .args(["--arch", "x86_64", "--out"])
        .arg(out)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--json"])
        .args(["--progress-ms", "20"])
        .args(extra)
        .env("RUST_LOG", "info,phase_swarm=debug,libp2p=warn")
        // Its freshness record beside `out`, not in the user's home.
        .env("PLASMD_STATE", out.with_extension("state"));
    Proc::spawn(name, cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits for the one-line JSON summary of a fetcher (on stdout: it may reach
/// us before or after stderr lines printed around it, hence `wait_for_first`).
pub fn summary(p: &Proc) -> serde_json::Value {
    summary_beside(p, &[])
}

/// [`summary`]; on a timeout the panic also shows the output of `peers`, the
/// processes `p` should have reached: a fetcher that never reached its peers
/// is explained by their side as much as by its own.
pub fn summary_beside(p: &Proc, peers: &[&Proc]) -> serde_json::Value {
    let Some(line) = p.try_wait_for_first(STEP, |l| l.starts_with('{') && l.contains("\"ok\""))
    else {
        let theirs: String = peers
            .iter()
            .map(|q| format!("\n--- {} ---\n{}", q.name(), q.output()))
            .collect();
        panic!(
            "{}: no summary within {STEP:?}; output:\n{}{theirs}",
            p.name(),
            p.output()
        );
    };
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {line}"))
}

/// Waits for `plasmd: seeding ROOT on ADDRS` (printed once, on stderr, after
/// the summary on stdout) and returns the loopback address.
pub fn seeding_addr(p: &Proc) -> String {
    let line = p.wait_for_first(STEP, |l| l.starts_with("plasmd: seeding "));
    line.split_whitespace()
        .find(|w| w.starts_with("/ip4/127."))
        .expect("a loopback address in the seeding line")
        .to_owned()
}

/// The peers (keys of `peers`) in a summary that sent at least one chunk.
pub fn sources(summary: &serde_json::Value) -> Vec<String> {
    summary["peers"]
        .as_object()
        .expect("peers object")
        .iter()
        .filter(|(_, v)| v["chunks"].as_u64().unwrap_or(0) > 0)
        .map(|(k, _)| k.clone())
        .collect()
}

/// The peer id at the end of a `/p2p/` multiaddr.
pub fn peer_of(addr: &str) -> String {
    addr.rsplit("/p2p/")
        .next()
        .expect("/p2p/ in addr")
        .to_owned()
}
