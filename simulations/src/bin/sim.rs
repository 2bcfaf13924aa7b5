//! `sim`: the discrete-event boot-storm simulator over the real scheduler.

use std::time::{Duration, Instant};

use clap::Parser;
use simulations::bound::t_min;
use simulations::sim::{SimConfig, simulate};

#[derive(Debug, Parser)]
#[command(about = "Simulated boot storms driving the real plasmd fetch scheduler")]
struct Args {
    /// Storm sizes to simulate (comma-separated).
    #[arg(long, default_value = "10,100,1000,10000", value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Artifact set size in MB.
    #[arg(long, default_value_t = 13.2)]
    size_mb: f64,
    /// Every link's rate in Mbit/s, each way.
    #[arg(long, default_value_t = 20.0)]
    rate_mbit: f64,
    /// The seed's upload in Mbit/s (default: --rate-mbit).
    #[arg(long)]
    seed_rate_mbit: Option<f64>,
    /// One-way latency in milliseconds.
    #[arg(long, default_value_t = 0.2)]
    latency_ms: f64,
    /// Chunk size in bytes.
    #[arg(long, default_value_t = u64::from(phase_content::DEFAULT_CHUNK_SIZE))]
    chunk_size: u64,
    /// Milliseconds between node starts.
    #[arg(long, default_value_t = 0)]
    stagger_ms: u64,
    /// Scheduler: requests in flight per peer.
    #[arg(long)]
    in_flight: Option<usize>,
    /// Scheduler: have-map refresh interval in ms.
    #[arg(long)]
    have_refresh_ms: Option<u64>,
    /// Scheduler: back-off after busy, ms.
    #[arg(long)]
    busy_backoff_ms: Option<u64>,
    /// Server: uploads at once before answering busy.
    #[arg(long)]
    max_serving: Option<usize>,
    /// Server: uploads to one client at once.
    #[arg(long)]
    per_peer_serving: Option<usize>,
    /// Turn the node's super-seeding off (complete hosts offer every chunk).
    #[arg(long)]
    no_super_seed: bool,
    /// v1: have-maps only pulled, none sent with chunks and requests (as
    /// `PLASMD_MAPS_WITH_CHUNKS=0`).
    #[arg(long)]
    no_maps_with_chunks: bool,
    /// Share links max-min fairly (progressive filling over all flows, each
    /// held by its sender's upload and its receiver's download, as TCP flows
    /// converge to) instead of an equal split at each end of every flow.
    #[arg(long)]
    fair: bool,
    /// --fair: re-share every flow at most this often, ms (changes in
    /// between re-share only the links where they happen); 0: at every change.
    #[arg(long, default_value_t = 1.0)]
    fair_interval_ms: f64,
    /// Model the planned stream protocol v2 (bounded neighbourhood, pushed
    /// HAVEs, queued requests, choke/unchoke) instead of today's node.
    #[arg(long)]
    v2: bool,
    /// v2: connections per node.
    #[arg(long)]
    neighbours: Option<usize>,
    /// v2: uploads a server runs at once.
    #[arg(long)]
    upload_slots: Option<usize>,
    /// v2: clients a server takes requests from at once.
    #[arg(long)]
    unchoked: Option<usize>,
    /// v2: requests a client keeps queued at one server.
    #[arg(long)]
    depth: Option<usize>,
    /// v2: requests a client keeps in flight over all its neighbours.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// v2: how long a choked client waits before asking again, ms.
    #[arg(long)]
    choke_wait_ms: Option<u64>,
    /// Runs per size (different RNG seeds); the table shows medians.
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// The first run's RNG seed; run k uses seed + k.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print where the time goes in the first run of each size: completion
    /// percentiles and the storm's state once per simulated second.
    #[arg(long)]
    trace: bool,
}

/// Completion percentiles and the per-second state of one run.
fn print_trace(n: usize, seed: u64, tmin: f64, r: &simulations::sim::SimResult) {
    let mut c = r.completion_s.clone();
    c.sort_by(f64::total_cmp);
    let q = |p: f64| simulations::storm::percentile(&c, p) / tmin;
    println!(
        "  N = {n}, seed {seed}: completion / T_min p1 {:.2}, p10 {:.2}, p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}",
        q(0.01),
        q(0.1),
        q(0.5),
        q(0.9),
        q(0.99),
        r.max_s() / tmin
    );
    println!(
        "  {:>6} {:>6} {:>11} {:>10} {:>16} {:>8} {:>12}",
        "t s", "done", "seed copies", "upload use", "downloads/node", "starved", "idle holders"
    );
    for s in &r.trace {
        println!(
            "  {:>6.1} {:>6.3} {:>11.2} {:>10.2} {:>16.1} {:>8.3} {:>12.3}",
            s.t, s.done, s.seed_copies, s.upload_use, s.downloads, s.starved, s.idle_holders
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = Args::parse();
    println!(
        "{:>7} {:>8} {:>8} {:>8} {:>9} {:>11} {:>10} {:>10} {:>8}",
        "nodes",
        "T_min s",
        "p50 s",
        "max s",
        "max/Tmin",
        "seed copies",
        "upload use",
        "events",
        "wall s"
    );
    for &n in &a.nodes {
        let cfg = SimConfig {
            nodes: n,
            file_bytes: (a.size_mb * 1e6) as u64,
            chunk_size: a.chunk_size,
            up_bps: a.rate_mbit * 1e6,
            down_bps: a.rate_mbit * 1e6,
            seed_up_bps: a.seed_rate_mbit.unwrap_or(a.rate_mbit) * 1e6,
            latency: Duration::from_secs_f64(a.latency_ms / 1e3),
            stagger: Duration::from_millis(a.stagger_ms),
            ..SimConfig::default()
        };
        let mut cfg = cfg;
        cfg.super_seed = !a.no_super_seed;
        cfg.maps_with_chunks = !a.no_maps_with_chunks;
        if let Some(v) = a.in_flight {
            cfg.sched.per_peer_in_flight = v;
        }
        if let Some(v) = a.have_refresh_ms {
            cfg.sched.have_refresh = Duration::from_millis(v);
        }
        if let Some(v) = a.busy_backoff_ms {
            cfg.sched.busy_backoff = Duration::from_millis(v);
        }
        if let Some(v) = a.max_serving {
            cfg.max_serving = v;
        }
        if let Some(v) = a.per_peer_serving {
            cfg.per_peer_serving = v;
        }
        cfg.fair_share = a.fair;
        cfg.fair_interval = Duration::from_secs_f64(a.fair_interval_ms.max(0.0) / 1e3);
        if a.v2 {
            let mut v = simulations::sim::V2::default();
            if let Some(x) = a.neighbours {
                v.neighbours = x;
            }
            if let Some(x) = a.upload_slots {
                v.upload_slots = x.max(1);
            }
            if let Some(x) = a.unchoked {
                v.unchoked = x.max(1);
            }
            if let Some(x) = a.depth {
                v.depth = x.max(1);
            }
            if let Some(x) = a.max_in_flight {
                v.in_flight = x.max(1);
            }
            if let Some(x) = a.choke_wait_ms {
                v.choke_wait = Duration::from_millis(x);
            }
            cfg.v2 = Some(v);
        }
        let e = cfg.efficiency;
        let tmin = t_min(
            cfg.file_bytes as f64 * 8.0,
            cfg.seed_up_bps * e,
            &vec![cfg.up_bps * e; n],
            cfg.down_bps * e,
        );
        let (mut p50, mut max, mut copies, mut used, mut events, mut wall) =
            (vec![], vec![], vec![], vec![], 0, 0.0);
        for run in 0..a.runs {
            let t = Instant::now();
            let r = simulate(&SimConfig {
                seed: a.seed + run,
                ..cfg.clone()
            });
            let stuck = r.completion_s.iter().filter(|t| t.is_nan()).count();
            if stuck > 0 {
                println!(
                    "  N = {n}, seed {}: {stuck} node(s) never finished",
                    a.seed + run
                );
            }
            wall += t.elapsed().as_secs_f64();
            if a.trace && run == 0 {
                print_trace(n, a.seed, tmin, &r);
            }
            events += r.events;
            p50.push(r.p50_s());
            max.push(r.max_s());
            copies.push(r.seed_bytes / cfg.file_bytes as f64);
            // Bytes all hosts sent over what their uploads could have sent until the last node finished.
            let cap = (n + 1) as f64 * cfg.up_bps * cfg.efficiency / 8.0 * r.max_s();
            used.push(r.total_bytes / cap);
        }
        let m = median(max);
        println!(
            "{:>7} {:>8.2} {:>8.2} {:>8.2} {:>9.3} {:>11.2} {:>10.2} {:>10} {:>8.1}",
            n,
            tmin,
            median(p50),
            m,
            m / tmin,
            median(copies),
            median(used),
            events / a.runs,
            wall / a.runs as f64
        );
    }
    println!(
        "(T_min at goodput: rates x 0.953 for Ethernet framing under tbf, as the simulator models them;\n \
         upload use: bytes every host sent over what all uploads could send until the last node finished)"
    );
}
