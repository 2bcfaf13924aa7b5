//! One boot storm per mode on the same topology, artifacts and shaping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cpu::{CpuUse, Sampler};
use crate::hops::{HopInterval, HopSummary, Lines};
use crate::links::{Interval, LinkSampler, SAMPLE_EVERY, intervals};
use crate::netns::{Shape, Topology, sh};
use crate::proc::{Bell, Options, Proc};

/// The interval of a storm's trace.
pub const TRACE_EVERY: Duration = Duration::from_millis(500);

/// How nodes get the artifacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `plasmd fetch` on every node, `plasmd serve` as the seed.
    Swarm,
    /// The same with `--swarm-protocol v2` on the seed and every node.
    Swarm2,
    /// curl from the seed's HTTP server (`plasmd serve`), nothing else.
    Http,
    /// aria2c with a torrent from mktorrent and opentracker as the tracker.
    Bittorrent,
}

impl Mode {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Swarm => "swarm",
            Mode::Swarm2 => "swarm2",
            Mode::Http => "http",
            Mode::Bittorrent => "bittorrent",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "swarm" => Ok(Mode::Swarm),
            "swarm2" => Ok(Mode::Swarm2),
            "http" => Ok(Mode::Http),
            "bittorrent" | "bt" => Ok(Mode::Bittorrent),
            _ => Err(format!(
                "unknown mode {s:?} (swarm, swarm2, http, bittorrent)"
            )),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// Nodes besides the seed.
    pub nodes: usize,
    /// Kernel size in bytes.
    pub kernel_bytes: usize,
    /// Initramfs size in bytes.
    pub initramfs_bytes: usize,
    /// Every node's link, bit/s each way.
    pub rate_bps: u64,
    /// The seed's link, bit/s each way.
    pub seed_rate_bps: u64,
    /// Delay between node starts (0: a cold storm, all at once).
    pub stagger: Duration,
    /// Give up on a mode after this long.
    pub timeout: Duration,
    /// The plasmd binary.
    pub plasmd: PathBuf,
    /// Scratch directory (artifacts, node outputs).
    pub work: PathBuf,
    /// Chunk size for the swarm's manifest.
    pub chunk_size: u32,
    /// Swarm modes: the seed and the nodes log their chunk events
    /// ([`crate::hops`]), read into [`ModeResult::hops`].
    pub chunk_events: bool,
    /// Swarm modes: the nodes' `plasmd fetch --mode` (`internet`, the
    /// default, also asks the DHT; `lan` finds peers only through the seed
    /// and mDNS).
    pub fetch_mode: phase_boot::cmdline::Mode,
}

/// `RUST_LOG` for the swarm's processes when chunk events are on: plasmd's
/// own default plus the events.
const EVENTS_LOG: &str = "warn,plasmd=info,phase_swarm=info,phase_content=info,phase_boot=info,phase_swarm::chunk_events=debug";

impl StormConfig {
    /// Total artifact bytes, F.
    pub fn artifact_bytes(&self) -> u64 {
        (self.kernel_bytes + self.initramfs_bytes) as u64
    }
}

/// The outcome of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// Per node: seconds from the storm's start to verified artifacts (None: did not finish).
    pub completion_s: Vec<Option<f64>>,
    /// Median completion.
    pub p50_s: f64,
    /// 99th percentile (nearest rank).
    pub p99_s: f64,
    /// Last node.
    pub max_s: f64,
    /// Bytes the seed's interface sent / bytes all interfaces sent.
    pub seed_share: f64,
    /// Bytes the seed's interface sent / artifact size.
    pub seed_copies: f64,
    /// Every node finished with byte-identical artifacts.
    pub ok: bool,
    /// CPU use while the mode ran.
    pub cpu: CpuUse,
    /// Where the time went, every [`TRACE_EVERY`] (see [`crate::links`]).
    pub trace: Vec<Interval>,
    /// Where the chunks waited, every [`TRACE_EVERY`] (swarm modes with
    /// [`StormConfig::chunk_events`]; see [`crate::hops`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<HopInterval>,
    /// The same over the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hop_summary: Option<HopSummary>,
    /// The largest peak resident memory of any node, MiB (swarm modes:
    /// `peak_rss_kib` of `plasmd fetch --json`; None for the others).
    pub node_peak_rss_mib: Option<f64>,
    /// Why the mode failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Nearest-rank percentile of finished times (`q` in 0..=1).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Deterministic pseudo-random bytes (xorshift64).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes the artifact set under `work/artifacts/stable/ARCH`; returns the
/// directory and the expected blake3 of each file.
pub fn make_artifacts(cfg: &StormConfig) -> anyhow::Result<(PathBuf, Vec<(String, blake3::Hash)>)> {
    let root = cfg.work.join("artifacts");
    let dir = root.join("stable").join(std::env::consts::ARCH);
    std::fs::create_dir_all(&dir)?;
    let mut want = Vec::new();
    for (name, len, seed) in [
        ("kernel", cfg.kernel_bytes, 11),
        ("initramfs", cfg.initramfs_bytes, 12),
    ] {
        let data = pseudo_random(len, seed);
        std::fs::write(dir.join(name), &data)?;
        want.push((name.to_owned(), blake3::hash(&data)));
    }
    Ok((root, want))
}

fn file_ok(path: &Path, want: &blake3::Hash) -> bool {
    std::fs::read(path)
        .map(|d| blake3::hash(&d) == *want)
        .unwrap_or(false)
}

/// Starts `argv` inside namespace `ns` as a [`Proc`] named `name`.
fn spawn_in(ns: &str, argv: &[String], name: &str, opts: &Options) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv);
    Proc::spawn_with(name, cmd, opts)
        .with_context(|| format!("spawning {} in {ns}", argv.join(" ")))
}

/// Builds a node's command line from its index and output directory.
type NodeCmd = Box<dyn Fn(usize, &Path) -> Vec<String>>;

/// Runs one mode on a fresh topology.
pub fn run_mode(
    mode: Mode,
    cfg: &StormConfig,
    artifacts: &Path,
    want: &[(String, blake3::Hash)],
    tag: &str,
) -> anyhow::Result<ModeResult> {
    let topo = Topology::create(
        tag,
        cfg.nodes,
        Shape {
            up_bps: cfg.seed_rate_bps,
            down_bps: cfg.seed_rate_bps,
        },
        Shape {
            up_bps: cfg.rate_bps,
            down_bps: cfg.rate_bps,
        },
    )?;
    let mode_dir = cfg.work.join(mode.name());
    let _ = std::fs::remove_dir_all(&mode_dir);
    std::fs::create_dir_all(&mode_dir)?;
    let setup = Duration::from_secs(60);
    // The seed side's processes; they live until the nodes are done.
    let mut seed_procs: Vec<Proc> = Vec::new();
    let s = |p: &Path| p.display().to_string();
    let plasmd = s(&cfg.plasmd);
    let seed_ip = topo.seed.ip.clone();
    let arch = std::env::consts::ARCH;

    // The seed side, and the command each node runs.
    let node_cmd: NodeCmd = match mode {
        Mode::Swarm | Mode::Swarm2 | Mode::Http => {
            let state = mode_dir.join("seed-state");
            let log: Vec<String> = if cfg.chunk_events && mode != Mode::Http {
                vec!["env".into(), format!("RUST_LOG={EVENTS_LOG}")]
            } else {
                Vec::new()
            };
            let mut argv = log.clone();
            argv.extend([
                plasmd.clone(),
                "serve".into(),
                "-a".into(),
                s(artifacts),
                "-p".into(),
                "8080".into(),
                "--bind".into(),
                seed_ip.clone(),
                "--state".into(),
                s(&state),
                "--chunk-size".into(),
                cfg.chunk_size.to_string(),
            ]);
            let v2: Vec<String> = if mode == Mode::Swarm2 {
                vec!["--swarm-protocol".into(), "v2".into()]
            } else {
                Vec::new()
            };
            argv.extend(v2.iter().cloned());
            let seed = spawn_in(&topo.seed.ns, &argv, "seed", &Options::default())?;
            let key_line = seed.expect(setup, "public key", |l| l.contains("public key "))?;
            let pubkey = key_line
                .split("public key ")
                .nth(1)
                .and_then(|x| x.split_whitespace().next())
                .context("public key in banner")?
                .to_owned();
            seed.expect(setup, "serving http://", |l| l.contains("serving http://"))?;
            seed_procs.push(seed);
            let url = format!("http://{seed_ip}:8080");
            if mode != Mode::Http {
                let plasmd = plasmd.clone();
                let fetch_mode = cfg.fetch_mode;
                Box::new(move |_, out: &Path| {
                    let mut argv = log.clone();
                    argv.extend([
                        plasmd.clone(),
                        "fetch".into(),
                        "--provider".into(),
                        url.clone(),
                        "--pubkey".into(),
                        pubkey.clone(),
                        "--out".into(),
                        out.display().to_string(),
                        "--serve-after".into(),
                        "--json".into(),
                    ]);
                    argv.extend(v2.iter().cloned());
                    argv.push(format!("--mode={}", fetch_mode));
                    argv
                })
            } else {
                Box::new(move |_, out: &Path| {
                    let o = out.display();
                    vec![
                        "sh".into(),
                        "-c".into(),
                        format!(
                            "curl -sSf -o {o}/kernel {url}/stable/{arch}/kernel && \
                             curl -sSf -o {o}/initramfs {url}/stable/{arch}/initramfs && \
                             echo STORM-DONE"
                        ),
                    ]
                })
            }
        }
        Mode::Bittorrent => {
            let bt = mode_dir.join("bt");
            let data = bt.join("seed").join("boot");
            std::fs::create_dir_all(&data)?;
            for (name, _) in want {
                std::fs::copy(
                    artifacts.join("stable").join(arch).join(name),
                    data.join(name),
                )?;
            }
            let torrent = bt.join("boot.torrent");
            sh(&[
                "mktorrent",
                "-a",
                &format!("http://{seed_ip}:6969/announce"),
                "-l",
                "18",
                "-o",
                &s(&torrent),
                &s(&data),
            ])?;
            let info = sh(&["aria2c", "-S", &s(&torrent)])?;
            let hash = info
                .lines()
                .find_map(|l| l.trim().strip_prefix("Info Hash: "))
                .context("info hash from aria2c -S")?
                .trim()
                .to_owned();
            let ot = bt.join("ot");
            std::fs::create_dir_all(&ot)?;
            std::fs::write(ot.join("whitelist.txt"), format!("{hash}\n"))?;
            std::fs::write(
                ot.join("opentracker.conf"),
                format!(
                    "listen.tcp_udp {seed_ip}:6969\ntracker.rootdir {}\naccess.whitelist whitelist.txt\n",
                    ot.display()
                ),
            )?;
            let hook = bt.join("done.sh");
            std::fs::write(&hook, "#!/bin/sh\necho STORM-DONE \"$3\"\n")?;
            sh(&["chmod", "755", &s(&hook)])?;
            seed_procs.push(spawn_in(
                &topo.seed.ns,
                &[
                    "opentracker".into(),
                    "-f".into(),
                    s(&ot.join("opentracker.conf")),
                ],
                "opentracker",
                &Options::default(),
            )?);
            let common = |dir: &Path| -> Vec<String> {
                vec![
                    "aria2c".into(),
                    format!("--dir={}", dir.display()),
                    "--seed-ratio=0.0".into(),
                    "--enable-dht=false".into(),
                    "--enable-dht6=false".into(),
                    "--bt-enable-lpd=false".into(),
                    "--file-allocation=none".into(),
                    "--summary-interval=0".into(),
                    "--console-log-level=warn".into(),
                    "--bt-max-peers=55".into(),
                ]
            };
            let mut seeder = common(&bt.join("seed"));
            seeder.extend([
                "-V".into(),
                "--bt-seed-unverified=false".into(),
                s(&torrent),
            ]);
            seed_procs.push(spawn_in(
                &topo.seed.ns,
                &seeder,
                "aria2c seeder",
                &Options::default(),
            )?);
            let torrent = s(&torrent);
            let hook = s(&hook);
            Box::new(move |_, out: &Path| {
                let mut v = common(out);
                v.push(format!("--on-bt-download-complete={hook}"));
                v.push(torrent.clone());
                v
            })
        }
    };

    let tx0: Vec<u64> = std::iter::once(&topo.seed)
        .chain(&topo.nodes)
        .map(Topology::tx_bytes)
        .collect::<anyhow::Result<_>>()?;
    let sampler = Sampler::start();
    let t0 = Instant::now();
    let links = LinkSampler::start(
        topo.hub.clone(),
        std::iter::once(&topo.seed)
            .chain(&topo.nodes)
            .map(|h| h.hub_if.clone())
            .collect(),
        t0,
        (cfg.timeout.as_secs_f64() / SAMPLE_EVERY.as_secs_f64()) as usize + 16,
    );
    let deadline = t0 + cfg.timeout;
    let bell = Bell::default();
    let node_opts = Options::default().with_bell(bell.clone());
    let mut outs = Vec::new();
    let mut nodes: Vec<Proc> = Vec::new();
    for (i, host) in topo.nodes.iter().enumerate() {
        if !cfg.stagger.is_zero() && i > 0 {
            std::thread::sleep(cfg.stagger); // the stagger is the experiment, not synchronisation
        }
        let out = mode_dir.join(format!("node{i}"));
        std::fs::create_dir_all(&out)?;
        nodes.push(spawn_in(
            &host.ns,
            &node_cmd(i, &out),
            &format!("node{i}"),
            &node_opts,
        )?);
        outs.push(out);
    }
    let mut done: HashMap<usize, f64> = HashMap::new();
    let mut rss_kib: Option<u64> = None;
    let mut error = None;
    let mut cursors = vec![0u64; cfg.nodes];
    while done.len() < cfg.nodes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            error = Some(format!(
                "timed out after {:?} with {}/{} nodes done",
                cfg.timeout,
                done.len(),
                cfg.nodes
            ));
            break;
        }
        // Read the ring count before scanning, so a line printed during the
        // scan wakes the wait below instead of being missed.
        let rung = bell.rung();
        let mut any = false;
        for (i, p) in nodes.iter().enumerate() {
            for l in p.lines_after(&mut cursors[i]) {
                any = true;
                let finished = match mode {
                    Mode::Swarm | Mode::Swarm2 => l.starts_with('{') && l.contains("\"ok\""),
                    Mode::Http | Mode::Bittorrent => l.starts_with("STORM-DONE"),
                };
                if finished {
                    let rss = serde_json::from_str::<serde_json::Value>(&l.text)
                        .ok()
                        .and_then(|v| v.get("peak_rss_kib")?.as_u64());
                    if let Some(r) = rss {
                        rss_kib = Some(rss_kib.unwrap_or(0).max(r));
                    }
                    done.entry(i).or_insert_with(|| {
                        (p.started() + l.at)
                            .saturating_duration_since(t0)
                            .as_secs_f64()
                    });
                }
            }
        }
        if any {
            continue;
        }
        // Nothing new: a node that exited without finishing ends the run.
        let mut dead = None;
        for (i, p) in nodes.iter_mut().enumerate() {
            let exited = p
                .try_wait()
                .is_some_and(|st| !st.success() || mode != Mode::Http);
            if exited && !done.contains_key(&i) {
                dead = Some(i);
                break;
            }
        }
        if let Some(i) = dead {
            let lines = nodes[i].lines();
            let tail: Vec<&str> = lines
                .iter()
                .rev()
                .take(5)
                .map(|l| l.text.as_str())
                .collect();
            error = Some(format!(
                "node {i} exited without finishing: {}",
                tail.join(" | ")
            ));
            break;
        }
        // An exit closes the node's pipes, which rings too; the cap only
        // bounds how long a silent, still-running node goes unchecked.
        bell.wait(rung, left.min(Duration::from_millis(500)));
    }
    let cpu = sampler.finish();
    let readings = links.finish();
    let (hops, hop_summary) = if cfg.chunk_events && matches!(mode, Mode::Swarm | Mode::Swarm2) {
        let lines = |p: &Proc| -> Lines {
            p.lines()
                .into_iter()
                .map(|l| {
                    let t = (p.started() + l.at).saturating_duration_since(t0);
                    (t.as_secs_f64(), l.text)
                })
                .collect()
        };
        let seed = seed_procs.first().map(lines).unwrap_or_default();
        let node_lines: Vec<Lines> = nodes.iter().map(lines).collect();
        let (iv, s) = crate::hops::analyse(&seed, &node_lines, TRACE_EVERY.as_secs_f64());
        (iv, Some(s))
    } else {
        (Vec::new(), None)
    };
    let tx1: Vec<u64> = std::iter::once(&topo.seed)
        .chain(&topo.nodes)
        .map(Topology::tx_bytes)
        .collect::<anyhow::Result<_>>()?;
    drop(nodes);
    drop(seed_procs);
    drop(topo);

    let sent: Vec<u64> = tx1
        .iter()
        .zip(&tx0)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = sent.iter().sum();
    let f = cfg.artifact_bytes() as f64;
    let mut all_ok = error.is_none();
    let mut completion = Vec::new();
    for (i, out) in outs.iter().enumerate() {
        let dir = if mode == Mode::Bittorrent {
            out.join("boot")
        } else {
            out.clone()
        };
        let ok = want.iter().all(|(name, h)| file_ok(&dir.join(name), h));
        all_ok &= ok && done.contains_key(&i);
        completion.push(done.get(&i).copied());
    }
    let mut sorted: Vec<f64> = completion.iter().flatten().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let up: Vec<f64> = std::iter::once(cfg.seed_rate_bps as f64)
        .chain(std::iter::repeat_n(cfg.rate_bps as f64, cfg.nodes))
        .collect();
    let trace = intervals(
        &readings,
        TRACE_EVERY,
        &up,
        cfg.rate_bps as f64,
        &completion,
        cfg.artifact_bytes(),
    );
    Ok(ModeResult {
        trace,
        hops,
        hop_summary,
        node_peak_rss_mib: rss_kib.map(|k| k as f64 / 1024.0),
        p50_s: percentile(&sorted, 0.5),
        p99_s: percentile(&sorted, 0.99),
        max_s: sorted.last().copied().unwrap_or(f64::NAN),
        seed_share: if total > 0 {
            sent[0] as f64 / total as f64
        } else {
            0.0
        },
        seed_copies: sent[0] as f64 / f,
        ok: all_ok,
        cpu,
        error,
        completion_s: completion,
    })
}

/// Checks the tools a mode needs are installed and that we are root.
pub fn preflight(modes: &[Mode]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("storms create network namespaces: run as root");
    }
    let mut need = vec!["ip", "tc"];
    if modes.contains(&Mode::Http) {
        need.push("curl");
    }
    if modes.contains(&Mode::Bittorrent) {
        need.extend(["aria2c", "mktorrent", "opentracker"]);
    }
    for tool in need {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!(
                "{tool} is not installed (Debian: apt-get install iproute2 curl aria2 mktorrent opentracker)"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.99), 10.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
