//! The first stage's fetch through the swarm: the same libp2p node as
//! `plasmd fetch`, with the HTTP seed (`phase.provider`) only as bootstrap
//! (manifest, the seed's own swarm addresses) and last-resort chunk source.
//! Peers come from mDNS on the LAN, `phase.peers=` and the seed.
//!
//! Console lines (tests and the `vms` harness parse them; keep them stable):
//! - `plasmd: phase swarm node peer=ID mode=lan|internet` (this first stage's libp2p identity)
//! - `plasmd: phase manifest ok sequence=S root=R artifacts=N via=http|swarm`
//! - `plasmd: phase refused manifest from URL: ...` (wrong key: never booted)
//! - `plasmd: phase refused older manifest: refusing the CH/ARCH manifest sequence S from URL:
//!   older than sequence F (WHY)` (below `phase.min_sequence=` or a sequence accepted before;
//!   peers are asked for a newer one, and without one the attempt fails and is retried)
//! - `plasmd: phase newer manifest from a peer sequence=P seed_sequence=S` (a peer beat the seed)
//! - `plasmd: phase source peer=ID kind=seed|peer|http bytes=B chunks=C`
//! - `plasmd: phase banned peer=ID`
//! - `plasmd: phase fetched chunks=N bytes=B seconds=S seed_bytes=X peer_bytes=Y`
//! - `plasmd: phase retry held_chunks=N` (a failed attempt; the next resumes from N chunks)
//! - `plasmd: phase linger seconds=S addrs=...`
//! - `plasmd: phase metrics listening addr=IP:PORT` (serve mode with `phase.metrics=PORT`;
//!   `plasmd: phase metrics failed: ...` if the port cannot be had, and serving goes on)
//! - `plasmd: phase timeline step=NAME t=SECONDS uptime=SECONDS` (t since PID 1
//!   started, uptime from `/proc/uptime`), one per milestone in this order:
//!   `start`, `modules`, `network`, `node` (swarm node up), `manifest`,
//!   `first-chunk`, `last-chunk` (every chunk verified), `carry` (carried
//!   archive built), `kexec-loaded` (the target is loaded; exec follows)
//! - `plasmd: phase entropy ready t=SECONDS uptime=SECONDS` (the kernel's CRNG
//!   is ready; a thread waits for it from `start` on, beside the timeline)

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use phase_boot::cmdline::PhaseConfig;
use phase_content::{MemStore, PublicKey, SignedManifest};
use phase_swarm::{FetchProgress, Handle, Multiaddr, addr};

use crate::fetch::{Fetcher, Floor, Kind, ManifestError, Note, OFFER_WINDOW, Options};

/// The libp2p port the boot node listens on, so its addresses are predictable.
pub(crate) const P2P_PORT: u16 = 4001;
/// How long peers may take to offer a manifest when the seed gives none.
const MANIFEST_WAIT: Duration = Duration::from_secs(20);
/// One attempt's budget once the manifest is known.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A finished fetch; the node keeps serving while this lives (and the runtime runs).
pub(crate) struct SwarmFetch {
    pub(crate) manifest: SignedManifest,
    pub(crate) store: Arc<MemStore>,
    pub(crate) node: Handle,
}

/// The console's account of what the fetcher met.
fn say(n: Note<'_>) {
    match n {
        Note::SeedSwarmUnknown(e) => println!("plasmd: phase seed swarm unknown: {e:#}"),
        Note::SeedManifest(ManifestError::Refused(e)) => {
            println!("plasmd: phase refused manifest from {e:#}")
        }
        Note::SeedManifest(e) => {
            println!("plasmd: phase seed unreachable ({e}); asking swarm peers")
        }
        Note::Older(e) => println!("plasmd: phase refused older manifest: {e:#}"),
        Note::NewerFromPeer { seed, peer } => println!(
            "plasmd: phase newer manifest from a peer sequence={peer} seed_sequence={seed}"
        ),
    }
}

/// The boot node: listens on [`P2P_PORT`], mDNS on, `phase.peers` dialed, the
/// DHT only with `phase.mode=internet`.
async fn start(
    cfg: &PhaseConfig,
    provider: Option<&str>,
    pubkey: PublicKey,
    store: Arc<MemStore>,
) -> anyhow::Result<Fetcher> {
    let peers: Vec<Multiaddr> = cfg
        .peers
        .iter()
        .filter_map(|p| match p.parse() {
            Ok(a) => Some(a),
            Err(e) => {
                println!("plasmd: warning: phase.peers entry {p:?} is no multiaddr ({e}); skipped");
                None
            }
        })
        .collect();
    let opts = Options {
        provider: provider.map(str::to_owned),
        channel: cfg.channel.clone(),
        arch: cfg.arch.clone(),
        pubkey,
        listen: addr::tcp([0, 0, 0, 0].into(), P2P_PORT),
        peers,
        mdns: true,
        mode: cfg.mode,
        keypair: None,
        manifest_wait: MANIFEST_WAIT,
        min_sequence: cfg.min_sequence.map(|n| Floor {
            sequence: n,
            from: format!("phase.min_sequence={n}"),
        }),
        offer_window: OFFER_WINDOW,
        metrics: None,
        max_neighbours: None,
        protocol: phase_swarm::Protocol::V1,
    };
    let f = Fetcher::start(opts, store, say).await?;
    println!(
        "plasmd: phase swarm node peer={} mode={}",
        f.node().peer_id(),
        cfg.mode
    );
    super::timeline("node");
    Ok(f)
}

/// One attempt: the manifest, then every chunk not yet held.
async fn attempt(f: &mut Fetcher, started: Instant) -> anyhow::Result<SignedManifest> {
    let (manifest, via) = f.manifest().await?;
    let m = manifest.manifest();
    println!(
        "plasmd: phase manifest ok sequence={} root={} artifacts={} via={}",
        m.sequence,
        manifest.root(),
        m.artifacts.len(),
        via.as_str()
    );
    super::timeline("manifest");

    let (ptx, mut prx) = tokio::sync::watch::channel(FetchProgress::default());
    // Whether `first-chunk` is on the timeline; the fetch may end before the
    // printer sees a change, and then it is printed after.
    let first_said = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let said = first_said.clone();
    let printer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                changed = prx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if prx.borrow_and_update().held > 0
                        && !said.swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        super::timeline("first-chunk");
                    }
                }
                _ = tick.tick() => {
                    let p = prx.borrow().clone();
                    if p.total > 0 {
                        println!(
                            "plasmd: phase progress chunks={}/{} peers={}",
                            p.held, p.total, p.peers
                        );
                    }
                }
            }
        }
    });
    let fetch_started = Instant::now();
    let report = f.fetch(&manifest, Some(ptx), Some(FETCH_TIMEOUT)).await;
    printer.abort();
    let report = report?;
    if !first_said.swap(true, std::sync::atomic::Ordering::SeqCst) {
        super::timeline("first-chunk");
    }
    super::timeline("last-chunk");

    let (mut seed_bytes, mut peer_bytes) = (0u64, 0u64);
    for (id, st) in &report.sources {
        let kind = f.kind(id);
        if kind == Kind::Peer {
            peer_bytes += st.bytes;
        } else {
            seed_bytes += st.bytes;
        }
        println!(
            "plasmd: phase source peer={id} kind={} bytes={} chunks={}",
            kind.as_str(),
            st.bytes,
            st.chunks
        );
    }
    for id in &report.banned {
        println!("plasmd: phase banned peer={id} reason=bad-chunk");
    }
    let chunks: usize = m.artifacts.iter().map(|a| a.chunks.len()).sum();
    println!(
        "plasmd: phase fetched chunks={chunks} bytes={} seconds={:.1} seed_bytes={seed_bytes} \
         peer_bytes={peer_bytes} banned={} total_seconds={:.1}",
        report.bytes,
        fetch_started.elapsed().as_secs_f64(),
        report.banned.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}

/// Fetches `cfg.channel`/`cfg.arch` through the swarm, retrying with capped
/// back-off. One node and one store serve every attempt: a retry resumes from
/// the chunks already verified and never accepts an older manifest.
pub(crate) async fn fetch(
    cfg: &PhaseConfig,
    provider: Option<&str>,
    pubkey: PublicKey,
) -> SwarmFetch {
    let started = Instant::now();
    let store = Arc::new(MemStore::new());
    let mut backoff = Duration::from_secs(1);
    let retry = |what: &str, e: anyhow::Error, backoff: &mut Duration| {
        println!("plasmd: {what} failed: {e:#}; retrying in {backoff:?}");
        let wait = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        wait
    };
    let mut f = loop {
        match start(cfg, provider, pubkey, store.clone()).await {
            Ok(f) => break f,
            Err(e) => tokio::time::sleep(retry("starting the swarm node", e, &mut backoff)).await,
        }
    };
    loop {
        match attempt(&mut f, started).await {
            Ok(manifest) => {
                return SwarmFetch {
                    manifest,
                    store,
                    node: f.node().clone(),
                };
            }
            Err(e) => {
                println!("plasmd: phase retry held_chunks={}", store.len());
                tokio::time::sleep(retry("fetch", e, &mut backoff)).await
            }
        }
    }
}

/// The node's routable addresses with `/p2p/ID`.
pub(crate) async fn addrs(node: &Handle) -> Vec<String> {
    crate::fetch::addrs(node, false)
        .await
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// `phase.linger=SECONDS`: keep serving that long before kexec.
pub(crate) async fn linger(f: &SwarmFetch, secs: u64) {
    if secs == 0 {
        return;
    }
    println!(
        "plasmd: phase linger seconds={secs} peer={} addrs={}",
        f.node.peer_id(),
        addrs(&f.node).await.join(",")
    );
    // Serving is the point here: the node answers peers while we wait.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let peers = f.node.connected_peers().await.map(|p| p.len()).unwrap_or(0);
    println!("plasmd: phase linger done peers={peers}");
}

/// The first stage from fetch to the bytes to boot, ready for kexec.
pub(crate) struct Ready {
    /// Keeps the node (and so serving) alive until kexec.
    _rt: tokio::runtime::Runtime,
    pub(crate) fetch: SwarmFetch,
    /// The target's initramfs with the carried archive appended, in a memfd.
    pub(crate) initrd: std::fs::File,
}

/// Fetches through the swarm (retrying with capped back-off, like the HTTP
/// fetch it replaces), lingers for `phase.linger`, and builds the target's
/// initrd: its initramfs and the carried archive of the verified chunks and
/// the `phase.*` parameters of `raw`.
pub(crate) fn first_stage(
    raw: &str,
    cfg: &PhaseConfig,
    provider: Option<&str>,
    pubkey: PublicKey,
) -> anyhow::Result<Ready> {
    let rt = crate::node_runtime()?;
    let fetch = rt.block_on(fetch(cfg, provider, pubkey));
    if let Some(secs) = cfg.linger {
        rt.block_on(linger(&fetch, secs));
    }
    // The target carries the high-water mark: it never serves older.
    let high = fetch
        .manifest
        .manifest()
        .sequence
        .max(cfg.min_sequence.unwrap_or(0));
    let (initrd, carried) = super::carry::target_initrd(
        &fetch.manifest,
        &*fetch.store,
        &super::carry::phase_params(raw, high),
    )
    .context("building the carried store")?;
    println!(
        "plasmd: phase carry bytes={carried} chunks={}",
        fetch.store.len()
    );
    super::timeline("carry");
    Ok(Ready {
        _rt: rt,
        fetch,
        initrd,
    })
}
