//! `plasmd fetch`: get a channel/arch from the swarm (with the HTTP seed as
//! bootstrap and last-resort chunk source), verify every chunk, write the
//! artifacts, and optionally keep seeding them.
//!
//! The fetch itself is [`Fetcher`], shared with PID 1's first stage; this
//! file is the command: its flags, progress on stderr, the files and the
//! summary.

mod fetcher;
mod http;
mod progress;
mod seen;

pub(crate) use fetcher::{Fetcher, Floor, Kind, Note, OFFER_WINDOW, Options, addrs};
pub(crate) use http::ManifestError;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use phase_content::{ChunkStore, FsStore, MemStore, PublicKey, verify_file, write_artifact};
use phase_swarm::{FetchProgress, Multiaddr, Protocol, load_or_create_key};

use crate::files::write_atomic;
use crate::metrics::Exporter;

/// Arguments of `plasmd fetch`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The HTTP seed (manifest, the seed's libp2p addresses, fallback chunks).
    #[arg(long)]
    provider: Option<String>,
    /// The publisher's public key (64 hex digits): only manifests it signed are accepted.
    #[arg(long)]
    pubkey: PublicKey,
    /// Channel to fetch.
    #[arg(long, default_value = "stable")]
    channel: String,
    /// Architecture to fetch (default: this host's).
    #[arg(long, default_value = std::env::consts::ARCH)]
    arch: String,
    /// Where to write kernel, initramfs, [dtb, cmdline] and manifest.json.
    #[arg(long)]
    out: PathBuf,
    /// A peer's multiaddr (repeatable), e.g. /ip4/10.0.0.2/tcp/4001/p2p/12D3...
    #[arg(long = "peer")]
    peers: Vec<Multiaddr>,
    /// Keep seeding after the fetch until killed.
    #[arg(long)]
    serve_after: bool,
    /// Print one JSON summary object on stdout at the end.
    #[arg(long)]
    json: bool,
    /// libp2p listen address.
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    listen: Multiaddr,
    /// Do not use mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// `internet`: also find peers through the Kademlia DHT; `lan`: only the seed, `--peer` and
    /// mDNS (lan|internet, like `phase.mode=`).
    #[arg(long, default_value = "internet", value_parser = |s: &str| s.parse::<phase_boot::cmdline::Mode>().map_err(|()| "expected lan or internet".to_owned()))]
    mode: phase_boot::cmdline::Mode,
    /// Keep chunks, the libp2p identity and the highest sequence seen per (key, channel, arch)
    /// here (default: only the highest sequence, in `$XDG_STATE_HOME/plasmd` or
    /// `~/.local/state/plasmd` like `serve`; chunks in memory, a fresh identity).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Refuse a manifest with a lower sequence than N (as `phase.min_sequence=N` at boot).
    #[arg(long, value_name = "N")]
    min_sequence: Option<u64>,
    /// How long to wait for peers to offer a manifest when the HTTP seed has none.
    #[arg(long, default_value_t = 30)]
    manifest_wait: u64,
    /// Give up if the fetch has not finished after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Answer Prometheus scrapes at http://ADDR/metrics (e.g. 127.0.0.1:9100; port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Milliseconds between plain progress lines (not on a terminal).
    #[arg(long, default_value_t = 2000, hide = true)]
    progress_ms: u64,
    /// Milliseconds connected peers may take to offer a newer manifest than the seed's.
    #[arg(long, default_value_t = OFFER_WINDOW.as_millis() as u64, hide = true)]
    offer_window_ms: u64,
    /// K: the most peers held connected (tests set it low; default the library's).
    #[arg(long, hide = true, value_parser = clap::value_parser!(u16).range(1..))]
    max_neighbours: Option<u16>,
    /// The swarm's chunk protocol: v1 (a request per chunk) or v2 (one
    /// session per peer, pushed haves, pipelined requests).
    #[arg(long, value_name = "v1|v2", default_value_t = Protocol::V1)]
    swarm_protocol: Protocol,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Some(dir) = &a.state {
        crate::files::private_dir(dir)?;
    }
    let state_dir = a.state.clone().unwrap_or_else(crate::default_state_dir);
    let seen = seen::Seen::open(&state_dir, &a.pubkey, &a.channel, &a.arch)
        .with_context(|| format!("opening the freshness record in {}", state_dir.display()))?;
    let mut floor = a.min_sequence.map(|n| Floor {
        sequence: n,
        from: format!("--min-sequence {n}"),
    });
    if let Some(n) = seen.get()?
        && floor.as_ref().is_none_or(|f| n > f.sequence)
    {
        floor = Some(Floor {
            sequence: n,
            from: format!("seen before, recorded in {}", seen.path().display()),
        });
    }
    let store: Arc<dyn ChunkStore> = match &a.state {
        Some(dir) => Arc::new(
            FsStore::open(dir.join("store"))
                .with_context(|| format!("opening the chunk store in {}", dir.display()))?,
        ),
        None => Arc::new(MemStore::new()),
    };
    let keypair = match &a.state {
        Some(dir) => {
            let path = dir.join("p2p.key");
            if path.exists() {
                crate::files::check_private(&path)?;
            }
            Some(load_or_create_key(&path)?)
        }
        None => None,
    };
    let exporter = match a.metrics {
        Some(at) => {
            let e = Exporter::new();
            let on = crate::metrics::listen(e.clone(), at).await?;
            eprintln!("plasmd fetch: metrics on http://{on}/metrics");
            Some(e)
        }
        None => None,
    };
    let opts = Options {
        provider: a.provider.clone(),
        channel: a.channel.clone(),
        arch: a.arch.clone(),
        pubkey: a.pubkey,
        listen: a.listen.clone(),
        peers: a.peers.clone(),
        mdns: !a.no_mdns,
        mode: a.mode,
        keypair,
        manifest_wait: Duration::from_secs(a.manifest_wait),
        min_sequence: floor,
        offer_window: Duration::from_millis(a.offer_window_ms),
        metrics: exporter,
        max_neighbours: a.max_neighbours.map(usize::from),
        protocol: a.swarm_protocol,
    };
    let mut fetcher = Fetcher::start(opts, store, say).await?;
    let (manifest, _via) = fetcher.manifest().await?;
    let m = manifest.manifest();
    let root = manifest.root();
    let total: u64 = m.artifacts.iter().map(|x| x.size).sum();
    eprintln!(
        "plasmd fetch: {}/{} sequence {} root {root}: {} artifacts, {total} bytes",
        m.channel,
        m.arch,
        m.sequence,
        m.artifacts.len()
    );

    let (ptx, prx) = tokio::sync::watch::channel(FetchProgress::default());
    let printer = tokio::spawn(progress::show(
        prx,
        std::io::stderr().is_terminal(),
        Duration::from_millis(a.progress_ms),
    ));
    let timeout = (a.timeout > 0).then(|| Duration::from_secs(a.timeout));
    let report = fetcher.fetch(&manifest, Some(ptx), timeout).await;
    if report.is_err() {
        // A timed-out fetch still holds the progress sender inside the node
        // (until the node stops), so the printer would wait for ever.
        printer.abort();
    }
    let _ = printer.await;
    let report = report?;

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (st, out, man) = (fetcher.store().clone(), a.out.clone(), manifest.clone());
    // Written, then read back and checked against the manifest: `ok` says
    // what is on disk, not what we meant to write.
    let verified: Vec<(String, u64, bool)> =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, u64, bool)>> {
            let mut verified = Vec::new();
            for art in &man.manifest().artifacts {
                let path = out.join(&art.name);
                write_artifact(&*st, art, &path)
                    .with_context(|| format!("writing {}", path.display()))?;
                let ok = match verify_file(art, &path) {
                    Ok(()) => true,
                    Err(e) => {
                        eprintln!("plasmd fetch: {} does not verify: {e}", path.display());
                        false
                    }
                };
                verified.push((art.name.clone(), art.size, ok));
            }
            if let Some(c) = &man.manifest().cmdline {
                write_atomic(&out.join("cmdline"), format!("{c}\n").as_bytes(), 0o644)?;
            }
            write_atomic(&out.join("manifest.json"), man.envelope(), 0o644)?;
            Ok(verified)
        })
        .await??;
    let ok = verified.iter().all(|(_, _, ok)| *ok);
    if ok {
        seen.record(m.sequence)?;
    }

    let wall = started.elapsed().as_secs_f64();
    if a.json {
        let peers: serde_json::Map<String, serde_json::Value> = report
            .sources
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    serde_json::json!({"bytes": v.bytes, "chunks": v.chunks}),
                )
            })
            .collect();
        let banned: Vec<String> = report.banned.iter().map(ToString::to_string).collect();
        let artifacts: Vec<serde_json::Value> = verified
            .iter()
            .map(
                |(name, size, ok)| serde_json::json!({"name": name, "bytes": size, "verified": ok}),
            )
            .collect();
        let obj = serde_json::json!({
            "wall_s": wall,
            "fetch_s": report.wall.as_secs_f64(),
            "bytes": report.bytes,
            "root": root.to_hex(),
            "sequence": m.sequence,
            "peer_id": fetcher.node().peer_id().to_string(),
            "peers": peers,
            "banned": banned,
            "neighbours_peak": report.neighbours_peak,
            "connections_peak": report.connections_peak,
            "peak_rss_kib": peak_rss_kib(),
            "artifacts": artifacts,
            "ok": ok,
        });
        println!("{obj}");
    } else {
        eprintln!(
            "plasmd fetch: wrote {} in {wall:.2} s ({:.1} MB/s) from {} sources{}",
            a.out.display(),
            report.bytes as f64 / 1e6 / report.wall.as_secs_f64().max(1e-6),
            report.sources.len(),
            if report.banned.is_empty() {
                String::new()
            } else {
                let b: Vec<String> = report.banned.iter().map(ToString::to_string).collect();
                format!("; banned {}", b.join(", "))
            }
        );
    }
    anyhow::ensure!(
        ok,
        "an artifact written to {} does not match the manifest",
        a.out.display()
    );

    if a.serve_after {
        let addrs: Vec<String> = fetcher
            .addrs(true)
            .await
            .iter()
            .map(ToString::to_string)
            .collect();
        eprintln!("plasmd: seeding {root} on {}", addrs.join(" "));
        tokio::signal::ctrl_c().await.ok();
    }
    Ok(())
}

/// How `plasmd fetch` tells its user what the fetcher met on the way.
fn say(n: Note<'_>) {
    match n {
        Note::SeedSwarmUnknown(e) => {
            tracing::info!(error = %format!("{e:#}"), "the seed runs no swarm node")
        }
        Note::SeedManifest(e) => {
            eprintln!("plasmd fetch: no manifest from the seed: {e}; asking peers")
        }
        Note::Older(e) => eprintln!("plasmd fetch: {e:#}; asking peers for a newer one"),
        Note::NewerFromPeer { seed, peer } => eprintln!(
            "plasmd fetch: a peer offers sequence {peer}, newer than the seed's {seed}: using it"
        ),
    }
}

/// The most resident memory this process has held (`VmHWM`), in KiB; `None`
/// off Linux or if `/proc` cannot be read.
fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
