//! Helpers for the end-to-end tests in `tests/tests/`: build and locate the
//! `plasmd` binary, run it as a [`Proc`] (killed by PID on drop, every line
//! kept, waited for instead of slept on), and fail under CI when a test
//! cannot run ([`unavailable`]).

pub mod selfhost;
pub mod swarm;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub use simulations::proc::{Line, Proc};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

/// `target/<profile>` of the running test binary (`…/target/release/deps/x` -> `…/target/release`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_owned()
}

/// Path of the host `plasmd` binary, built once per test process with the same profile.
pub fn plasmd() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let profile = dir.file_name().and_then(|s| s.to_str()).unwrap_or("debug");
        let cargo_profile = if profile == "debug" { "dev" } else { profile };
        let target_dir = dir.parent().expect("target dir").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--locked",
                "-p",
                "plasmd",
                "--profile",
                cargo_profile,
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p plasmd failed");
        dir.join("plasmd")
    })
    .clone()
}

/// Whether this runs under CI: `CI` set to anything but empty, `false` or `0`.
/// There a test that cannot run fails instead of skipping.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Reports that the running test cannot run because `what` is missing
/// (e.g. "qemu-system-aarch64 not on PATH"): under CI ([`under_ci`]) it
/// panics, so the run fails naming what to install; otherwise it prints
/// `SKIPPED <test>: <what>` and the caller returns.
pub fn unavailable(what: &str) {
    let test = test_name();
    if under_ci() {
        panic!("{test} cannot run under CI: {what}");
    }
    eprintln!("SKIPPED {test}: {what}");
}

/// `ok`, or [`unavailable`]`(what)` and `false`: `if !require(have("ip"), "ip not on PATH") { return; }`.
pub fn require(ok: bool, what: &str) -> bool {
    if !ok {
        unavailable(what);
    }
    ok
}

/// The running test's name: libtest names each test's thread after it; on
/// the main thread (one test thread) the binary's name has to do.
fn test_name() -> String {
    match std::thread::current().name() {
        Some(n) if n != "main" => n.to_owned(),
        _ => std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "this test".into()),
    }
}

/// Whether this process runs as root (namespaces and taps need it).
pub fn is_root() -> bool {
    simulations::vmnet::is_root()
}

/// A running `plasmd serve` on loopback.
pub struct Seed {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The publisher public key from the banner.
    pub pubkey: String,
}

impl Seed {
    /// Starts `plasmd serve -a artifacts -p 0` on 127.0.0.1 with its state in `state`.
    pub fn start(artifacts: &Path, state: &Path, extra: &[&str]) -> Seed {
        let mut cmd = Command::new(plasmd());
        // mDNS off: a test seed on loopback must not multicast on the host's real interfaces.
        cmd.env("PLASMD_MDNS", "0")
            .arg("serve")
            .arg("-a")
            .arg(artifacts)
            .args(["-p", "0", "--bind", "127.0.0.1", "--state"])
            .arg(state)
            .args(extra);
        let proc = Proc::spawn("plasmd serve", cmd).expect("start plasmd serve");
        let pk = proc.wait_for(Duration::from_secs(60), |l| l.contains("public key "));
        let pubkey = word_after(&pk, "public key ").expect("key in banner");
        let line = proc.wait_for(Duration::from_secs(60), |l| l.contains("serving http://"));
        let url = word_after(&line, "serving ").expect("url in banner");
        Seed { proc, url, pubkey }
    }
}

/// The word that follows `marker` in `line` (`plasmd serve` banners:
/// `public key KEY`, `serving URL`).
pub fn word_after(line: &str, marker: &str) -> Option<String> {
    let rest = line.split(marker).nth(1)?;
    rest.split_whitespace().next().map(str::to_owned)
}

/// Deterministic pseudo-random bytes (xorshift), so a test's artifacts differ
/// in every chunk without a random dependency.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `DIR/CHANNEL/ARCH/{kernel,initramfs}` of the given sizes; returns DIR.
pub fn make_artifacts(
    root: &Path,
    channel: &str,
    arch: &str,
    kernel: usize,
    initramfs: usize,
) -> PathBuf {
    let dir = root.join("artifacts");
    let a = dir.join(channel).join(arch);
    std::fs::create_dir_all(&a).expect("mkdir");
    std::fs::write(a.join("kernel"), pseudo_random(kernel, 1)).expect("write");
    std::fs::write(a.join("initramfs"), pseudo_random(initramfs, 2)).expect("write");
    dir
}

/// An HTTP client that reports every status instead of failing on 4xx/5xx,
/// with `timeout` for the whole exchange.
pub fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// GET `url`: its status and its body (at most 64 MiB), within `timeout`.
pub fn http_get(url: &str, timeout: Duration) -> (u16, Vec<u8>) {
    let mut resp = http_agent(timeout)
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("HTTP GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap_or_else(|e| panic!("HTTP GET {url}: body: {e}"));
    (status, body)
}
