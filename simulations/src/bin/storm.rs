//! `storm`: a boot storm on shaped links in network namespaces, the swarm
//! against HTTP and BitTorrent, measured against the fluid lower bound.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use simulations::bound::{t_http, t_min};
use simulations::sim::{SimConfig, simulate};
use simulations::storm::{Mode, ModeResult, StormConfig, make_artifacts, preflight, run_mode};
use simulations::{cleanup, plot};

#[derive(Debug, Parser)]
#[command(
    about = "Boot storm: swarm vs HTTP vs BitTorrent on tbf-shaped links in network namespaces"
)]
struct Args {
    /// Nodes besides the seed.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Comma-separated modes: swarm, http, bittorrent.
    #[arg(long, default_value = "swarm,http,bittorrent", value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Artifact set size in MB (split 86 % kernel, 14 % initramfs, as in our prototype's 11.4 + 1.8 MB).
    #[arg(long, default_value_t = 13.2)]
    size_mb: f64,
    /// Every link's rate in Mbit/s, each way (tbf on both ends of every veth).
    #[arg(long, default_value_t = 20.0)]
    rate_mbit: f64,
    /// The seed's rate in Mbit/s (default: same as --rate-mbit).
    #[arg(long)]
    seed_rate_mbit: Option<f64>,
    /// Milliseconds between node starts (0: cold storm).
    #[arg(long, default_value_t = 0)]
    stagger_ms: u64,
    /// Runs per mode (modes interleave, so they see the same machine conditions).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Swarm chunk size in bytes.
    #[arg(long, default_value_t = phase_content::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// The swarm nodes' `plasmd fetch --mode`: internet (also the DHT, plasmd's default) or lan
    /// (only the seed and mDNS; how much the DHT costs a LAN storm)
    #[arg(long, default_value = "internet", value_parser = |s: &str| s.parse::<phase_boot::cmdline::Mode>().map_err(|()| "expected lan or internet".to_owned()))]
    fetch_mode: phase_boot::cmdline::Mode,
    /// Give up on a mode after this many seconds (default: 3 x the HTTP time + 60).
    #[arg(long)]
    timeout_s: Option<u64>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the completion plot (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The plasmd binary (default: next to this one, built if missing).
    #[arg(long)]
    plasmd: Option<PathBuf>,
    /// Print where each mode's time went (its median run): every 0.5 s, the
    /// nodes done, the seed's copies so far, upload and download use from
    /// the veth counters, starved nodes (as `sim --trace`); for the swarm
    /// modes also where the chunks waited, from the chunk events the seed
    /// and nodes then log (`phase_swarm::chunk_events`).
    #[arg(long)]
    trace: bool,
    /// Scratch directory (default: a fresh one under /tmp, removed afterwards).
    #[arg(long)]
    work: Option<PathBuf>,
}

/// Where one run's time went, from its link counters.
fn print_trace(mode: &str, tmin: f64, r: &ModeResult) {
    println!(
        "\n{mode} (median run): max {:.2} s = {:.2} x T_min",
        r.max_s,
        r.max_s / tmin
    );
    println!(
        "  {:>6} {:>6} {:>11} {:>10} {:>12} {:>8} {:>13}",
        "t s", "done", "seed copies", "upload use", "download use", "starved", "idle uploaders"
    );
    for s in &r.trace {
        println!(
            "  {:>6.1} {:>6.3} {:>11.2} {:>10.2} {:>12.2} {:>8.3} {:>13.3}",
            s.t, s.done, s.seed_copies, s.upload_use, s.download_use, s.starved, s.idle_uploaders
        );
    }
    let Some(sum) = &r.hop_summary else {
        return;
    };
    let ms = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{:.0}", x * 1000.0));
    let s = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2}"));
    println!(
        "\n  where the chunks waited (chunk events; medians of the events starting in each interval):"
    );
    println!(
        "  {:>6} {:>9} {:>10} {:>11} {:>16} {:>13}",
        "t s", "anywhere", "held mean", "lag chunks", "to first ask ms", "ask to got ms"
    );
    for h in &r.hops {
        println!(
            "  {:>6.1} {:>9} {:>10.1} {:>11.1} {:>16} {:>13}",
            h.t,
            h.anywhere,
            h.held_mean,
            h.anywhere as f64 - h.held_mean,
            ms(h.to_first_ask_s),
            ms(h.ask_to_got_s)
        );
    }
    println!(
        "  run: to first ask {} ms, ask to got {} ms (to the upload's start {} ms, then to got {} ms); the seed's last new chunk at {} s, last node done at {} s; answers busy {}, do-not-have {}, failed {}; have-maps pulled {}, with a chunk {}",
        ms(sum.to_first_ask_s),
        ms(sum.ask_to_got_s),
        ms(sum.ask_to_serve_s),
        ms(sum.serve_to_got_s),
        s(sum.seed_last_new_s),
        s(sum.last_done_s),
        sum.busy,
        sum.do_not_have,
        sum.failed,
        sum.map_pulls,
        sum.maps_with_chunks
    );
}

fn locate_plasmd(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("exe dir")?;
    let p = dir.join("plasmd");
    if !p.is_file() {
        eprintln!("storm: building plasmd (cargo build --release -p plasmd)");
        let ok =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--release", "--locked", "-p", "plasmd"])
                .status()?
                .success();
        anyhow::ensure!(
            ok && p.is_file(),
            "could not build plasmd; pass --plasmd PATH"
        );
    }
    Ok(p)
}

fn run(a: Args) -> anyhow::Result<bool> {
    preflight(&a.modes)?;
    cleanup::install_signal_handler();
    let plasmd = locate_plasmd(a.plasmd.clone())?;
    let tmp;
    let work = match &a.work {
        Some(w) => w.clone(),
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let total = (a.size_mb * 1e6) as usize;
    let kernel = total * 86 / 100;
    let rate = (a.rate_mbit * 1e6) as u64;
    let seed_rate = (a.seed_rate_mbit.unwrap_or(a.rate_mbit) * 1e6) as u64;
    let bits = total as f64 * 8.0;
    let tmin = t_min(
        bits,
        seed_rate as f64,
        &vec![rate as f64; a.nodes],
        rate as f64,
    );
    let thttp = t_http(bits, seed_rate as f64, a.nodes);
    let timeout = Duration::from_secs(a.timeout_s.unwrap_or((thttp * 3.0) as u64 + 60));
    let cfg = StormConfig {
        nodes: a.nodes,
        kernel_bytes: kernel,
        initramfs_bytes: total - kernel,
        rate_bps: rate,
        seed_rate_bps: seed_rate,
        stagger: Duration::from_millis(a.stagger_ms),
        timeout,
        plasmd,
        work: work.clone(),
        chunk_size: a.chunk_size,
        chunk_events: a.trace,
        fetch_mode: a.fetch_mode,
    };
    let (artifacts, want) = make_artifacts(&cfg)?;
    println!(
        "storm: {} nodes + seed, {:.1} MB, links {} Mbit/s (seed {}), {}, fetch --mode {}; T_min {:.2} s, HTTP bound {:.1} s",
        a.nodes,
        total as f64 / 1e6,
        a.rate_mbit,
        seed_rate as f64 / 1e6,
        if a.stagger_ms == 0 {
            "cold start".to_owned()
        } else {
            format!("staggered {} ms", a.stagger_ms)
        },
        a.fetch_mode,
        tmin,
        thttp
    );
    let tag = std::process::id().to_string();
    let mut results: Vec<(Mode, Vec<ModeResult>)> =
        a.modes.iter().map(|m| (*m, Vec::new())).collect();
    for run in 0..a.runs {
        for (mode, rs) in results.iter_mut() {
            eprintln!("storm: run {} mode {} ...", run + 1, mode.name());
            let r = run_mode(*mode, &cfg, &artifacts, &want, &tag)
                .with_context(|| format!("mode {}", mode.name()))?;
            eprintln!(
                "storm: {} done: max {:.2} s, ok {}{}",
                mode.name(),
                r.max_s,
                r.ok,
                r.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            rs.push(r);
        }
    }

    // Report the median run of each mode (by max completion).
    println!(
        "\n{:<11} {:>8} {:>8} {:>8} {:>9} {:>10} {:>11} {:>6} {:>9} {:>9} {:>12}",
        "mode",
        "p50 s",
        "p99 s",
        "max s",
        "max/Tmin",
        "seed share",
        "seed copies",
        "ok",
        "cpu mean",
        "cpu s",
        "node rss MiB"
    );
    let mut valid = true;
    let mut modes_json = serde_json::Map::new();
    let mut series = Vec::new();
    for (mode, rs) in &results {
        let mut idx: Vec<usize> = (0..rs.len()).collect();
        idx.sort_by(|&i, &j| rs[i].max_s.total_cmp(&rs[j].max_s));
        let r = &rs[idx[idx.len() / 2]];
        valid &= rs.iter().all(|r| !r.cpu.saturated());
        println!(
            "{:<11} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>10.3} {:>11.2} {:>6} {:>8.0}% {:>9.1} {:>12}",
            mode.name(),
            r.p50_s,
            r.p99_s,
            r.max_s,
            r.max_s / tmin,
            r.seed_share,
            r.seed_copies,
            rs.iter().all(|r| r.ok),
            r.cpu.mean * 100.0,
            r.cpu.core_s,
            rs.iter()
                .filter_map(|r| r.node_peak_rss_mib)
                .reduce(f64::max)
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.0}"))
        );
        let mut v = serde_json::to_value(r)?;
        let sim_max = (*mode == Mode::Swarm).then(|| {
            // The simulator on the same storm, driving the same scheduler: median of 3 seeds.
            let mut m: Vec<f64> = (1..=3)
                .map(|seed| {
                    simulate(&SimConfig {
                        nodes: a.nodes,
                        file_bytes: total as u64,
                        chunk_size: u64::from(a.chunk_size),
                        up_bps: rate as f64,
                        down_bps: rate as f64,
                        seed_up_bps: seed_rate as f64,
                        stagger: Duration::from_millis(a.stagger_ms),
                        seed,
                        ..SimConfig::default()
                    })
                    .max_s()
                })
                .collect();
            m.sort_by(f64::total_cmp);
            m[1]
        });
        if let Some(sm) = sim_max {
            println!(
                "{:<11} {:>8} {:>8} {:>8.2} {:>9.2}   (simulator, same storm; real/sim {:.2})",
                "  sim",
                "",
                "",
                sm,
                sm / tmin,
                r.max_s / sm
            );
        }
        if let Some(o) = v.as_object_mut() {
            if let Some(sm) = sim_max {
                o.insert("sim_max_s".into(), sm.into());
            }
            o.insert("ok".into(), rs.iter().all(|r| r.ok).into());
            o.insert("max_over_t_min".into(), (r.max_s / tmin).into());
            o.insert(
                "runs_max_s".into(),
                rs.iter().map(|r| r.max_s).collect::<Vec<_>>().into(),
            );
        }
        modes_json.insert(mode.name().into(), v);
        series.push((
            mode.name().to_owned(),
            r.completion_s.iter().flatten().copied().collect(),
        ));
    }
    if a.trace {
        for (mode, rs) in &results {
            let mut idx: Vec<usize> = (0..rs.len()).collect();
            idx.sort_by(|&i, &j| rs[i].max_s.total_cmp(&rs[j].max_s));
            print_trace(mode.name(), tmin, &rs[idx[idx.len() / 2]]);
        }
    }
    println!(
        "\nT_min {tmin:.2} s (fluid bound, nominal rates; tbf counts Ethernet bytes so goodput is about 5 % lower). {}",
        if valid {
            "CPU was not saturated: the links were the bottleneck."
        } else {
            "NOT VALID: CPU saturated; lower --rate-mbit or --nodes."
        }
    );
    let all_ok = results.iter().all(|(_, rs)| rs.iter().all(|r| r.ok));
    if let Some(path) = &a.json {
        let j = serde_json::json!({
            "t_min_s": tmin,
            "nodes": a.nodes,
            "valid": valid,
            "size_bytes": total,
            "rate_mbit": a.rate_mbit,
            "runs": a.runs,
            "modes": modes_json,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j)?)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        plot::completion_svg(
            path,
            &format!(
                "Boot storm: {} nodes, {:.1} MB, {} Mbit/s links",
                a.nodes,
                total as f64 / 1e6,
                a.rate_mbit
            ),
            tmin,
            a.nodes,
            &series,
        )?;
        println!("wrote {}", path.display());
    }
    Ok(all_ok)
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("plasmd-storm-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    let r = run(a);
    cleanup::run_all();
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("storm: some nodes did not finish byte-identical");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("storm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
