//! `plasmd fetch`: get a channel/arch from the swarm (with the HTTP seed as
//! bootstrap and last-resort chunk source), verify every chunk, write the
//! artifacts, and optionally keep seeding them.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use phase_content::{ChunkStore, FsStore, MemStore, PublicKey, SignedManifest, write_artifact};
use phase_swarm::{FetchProgress, Multiaddr, Node, NodeConfig, load_or_create_key};

use crate::fetch_http::{HttpSeed, SeedSwarm};

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
    /// Keep chunks and the libp2p identity here (default: in memory, a fresh identity).
    #[arg(long)]
    state: Option<PathBuf>,
    /// How long to wait for peers to offer a manifest when the HTTP seed has none.
    #[arg(long, default_value_t = 30)]
    manifest_wait: u64,
    /// Give up if the fetch has not finished after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Milliseconds between plain progress lines (not on a terminal).
    #[arg(long, default_value_t = 2000, hide = true)]
    progress_ms: u64,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let store: Arc<dyn ChunkStore> = match &a.state {
        Some(dir) => Arc::new(
            FsStore::open(dir.join("store"))
                .with_context(|| format!("opening the chunk store in {}", dir.display()))?,
        ),
        None => Arc::new(MemStore::new()),
    };
    let mut cfg = NodeConfig::default()
        .with_listen(vec![a.listen.clone()])
        .with_peers(a.peers.clone())
        .with_mdns(!a.no_mdns);
    if let Some(dir) = &a.state {
        cfg = cfg.with_keypair(load_or_create_key(&dir.join("p2p.key"))?);
    }
    let node = Node::spawn(cfg, store.clone()).context("starting the libp2p node")?;

    let seed = a.provider.as_deref().map(HttpSeed::new);
    // The seed's own swarm node is the first peer; its manifest the first choice.
    let mut manifest: Option<SignedManifest> = None;
    if let Some(seed) = &seed {
        let s = seed.clone();
        match tokio::task::spawn_blocking(move || s.swarm()).await? {
            Ok(SeedSwarm { addrs }) => {
                for addr in addrs {
                    if let Err(e) = node.dial(addr).await {
                        tracing::debug!(error = %e, "dialing the seed's swarm node");
                    }
                }
            }
            Err(e) => tracing::info!(error = %e, "the seed runs no swarm node"),
        }
        let (s, ch, ar, pk) = (seed.clone(), a.channel.clone(), a.arch.clone(), a.pubkey);
        match tokio::task::spawn_blocking(move || s.manifest(&ch, &ar, &pk)).await? {
            Ok(m) => manifest = Some(m),
            Err(e) => eprintln!(
                "plasmd fetch: no manifest from {}: {e:#}; asking peers",
                seed.base
            ),
        }
    }
    let manifest = match manifest {
        Some(m) => m,
        None => node
            .find_manifest(
                &a.channel,
                &a.arch,
                a.pubkey,
                Duration::from_secs(a.manifest_wait),
            )
            .await
            .context("no HTTP seed manifest, and no peer offered one")?,
    };
    let m = manifest.manifest();
    if m.channel != a.channel || m.arch != a.arch {
        bail!(
            "the seed sent the manifest of {}/{} for {}/{}",
            m.channel,
            m.arch,
            a.channel,
            a.arch
        );
    }
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
    let printer = tokio::spawn(crate::fetch_progress::show(
        prx,
        std::io::stderr().is_terminal(),
        Duration::from_millis(a.progress_ms),
    ));
    let fallback = seed
        .clone()
        .map(|s| Arc::new(s) as Arc<dyn phase_swarm::Fallback>);
    let fetch = node.fetch(manifest.clone(), fallback, Some(ptx));
    let report = if a.timeout > 0 {
        tokio::time::timeout(Duration::from_secs(a.timeout), fetch)
            .await
            .with_context(|| format!("the fetch did not finish within {} s", a.timeout))??
    } else {
        fetch.await?
    };
    let _ = printer.await;

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (st, out, man) = (store.clone(), a.out.clone(), manifest.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for art in &man.manifest().artifacts {
            let path = out.join(&art.name);
            write_artifact(&*st, art, &path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(c) = &man.manifest().cmdline {
            write_atomic(&out.join("cmdline"), format!("{c}\n").as_bytes())?;
        }
        write_atomic(&out.join("manifest.json"), man.envelope())
    })
    .await??;

    let wall = started.elapsed().as_secs_f64();
    if a.json {
        let peers: serde_json::Map<String, serde_json::Value> = report
            .peers
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::json!({"bytes": v.bytes, "chunks": v.chunks}),
                )
            })
            .collect();
        let obj = serde_json::json!({
            "wall_s": wall,
            "fetch_s": report.wall.as_secs_f64(),
            "bytes": report.bytes,
            "root": root.to_hex(),
            "peer_id": node.peer_id().to_string(),
            "peers": peers,
            "banned": report.banned,
            "ok": true,
        });
        println!("{obj}");
    } else {
        eprintln!(
            "plasmd fetch: wrote {} in {wall:.2} s ({:.1} MB/s) from {} sources{}",
            a.out.display(),
            report.bytes as f64 / 1e6 / report.wall.as_secs_f64().max(1e-6),
            report.peers.len(),
            if report.banned.is_empty() {
                String::new()
            } else {
                format!("; banned {}", report.banned.join(", "))
            }
        );
    }

    if a.serve_after {
        let addrs: Vec<String> = crate::swarm_serve::sort_addrs(node.listen_addrs().await?)
            .into_iter()
            .map(|x| x.with_p2p(node.peer_id()).unwrap_or_else(|x| x).to_string())
            .collect();
        eprintln!("plasmd: seeding {root} on {}", addrs.join(" "));
        tokio::signal::ctrl_c().await.ok();
    }
    Ok(())
}

fn write_atomic(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
