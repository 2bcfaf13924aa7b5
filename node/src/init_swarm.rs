//! The first stage's fetch through the swarm: the same libp2p node as
//! `plasmd fetch`, with the HTTP seed (`phase.provider`) only as bootstrap
//! (manifest, the seed's own swarm addresses) and last-resort chunk source.
//! Peers come from mDNS on the LAN, `phase.peers=` and the seed.
//!
//! Console lines (tests and the `vms` harness parse them; keep them stable):
//! - `plasmd: phase swarm node peer=ID` (this first stage's libp2p identity)
//! - `plasmd: phase manifest ok sequence=S root=R artifacts=N via=http|swarm`
//! - `plasmd: phase refused manifest from URL: ...` (wrong key: never booted)
//! - `plasmd: phase source peer=ID kind=seed|peer|http bytes=B chunks=C`
//! - `plasmd: phase banned peer=ID`
//! - `plasmd: phase fetched chunks=N bytes=B seconds=S seed_bytes=X peer_bytes=Y`
//! - `plasmd: phase linger seconds=S addrs=...`

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use phase_boot::cmdline::PhaseConfig;
use phase_content::{MAX_MANIFEST_BYTES, MemStore, PublicKey, SignedManifest};
use phase_swarm::{FetchProgress, Handle, Multiaddr, Node, NodeConfig};

use crate::fetch_http::HttpSeed;

/// The libp2p port the boot node listens on, so its addresses are predictable.
pub(crate) const P2P_PORT: u16 = 4001;
/// How long peers may take to offer a manifest when the seed gives none.
const MANIFEST_WAIT: Duration = Duration::from_secs(20);
/// One HTTP request's budget for the manifest.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole fetch's budget once the manifest is known.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// A finished fetch; the node keeps serving while this lives (and the runtime runs).
pub(crate) struct SwarmFetch {
    pub(crate) manifest: SignedManifest,
    pub(crate) store: Arc<MemStore>,
    pub(crate) node: Handle,
}

fn p2p_of(addr: &Multiaddr) -> Option<String> {
    let s = addr.to_string();
    let id = s.split("/p2p/").nth(1)?.split('/').next()?;
    (!id.is_empty()).then(|| id.to_owned())
}

/// What the seed said about the manifest.
enum SeedManifest {
    Ok(Box<SignedManifest>),
    /// Bytes arrived but do not verify against the pinned key.
    Refused(String),
    Unreachable(String),
}

fn seed_manifest(provider: &str, channel: &str, arch: &str, pinned: &PublicKey) -> SeedManifest {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into();
    let url = format!(
        "{}/{channel}/{arch}/manifest.json",
        provider.trim_end_matches('/')
    );
    let bytes = match agent.get(&url).call().and_then(|mut r| {
        r.body_mut()
            .with_config()
            .limit(MAX_MANIFEST_BYTES as u64)
            .read_to_vec()
    }) {
        Ok(b) => b,
        Err(e) => return SeedManifest::Unreachable(format!("GET {url}: {e}")),
    };
    match SignedManifest::verify(&bytes, pinned) {
        Ok(m) => SeedManifest::Ok(Box::new(m)),
        Err(e) => SeedManifest::Refused(format!(
            "{url}: {e}; the manifest is not signed by the pinned phase.pubkey={pinned}: \
             refusing its artifacts (check phase.pubkey against the key `plasmd serve` prints)"
        )),
    }
}

/// Fetches `cfg.channel`/`cfg.arch` through the swarm and verifies every chunk.
pub(crate) async fn fetch(
    cfg: &PhaseConfig,
    provider: Option<&str>,
    pubkey: PublicKey,
) -> anyhow::Result<SwarmFetch> {
    let started = Instant::now();
    let store = Arc::new(MemStore::new());
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
    let listen: Multiaddr = format!("/ip4/0.0.0.0/tcp/{P2P_PORT}")
        .parse()
        .context("listen multiaddr")?;
    let ncfg = NodeConfig::default()
        .with_listen(vec![listen])
        .with_peers(peers)
        .with_mdns(true);
    let node = Node::spawn(ncfg, store.clone()).context("starting the libp2p node")?;
    println!("plasmd: phase swarm node peer={}", node.peer_id());

    let seed = provider.map(HttpSeed::new);
    let mut seed_ids: HashSet<String> = HashSet::new();
    if let Some(s) = &seed {
        let s2 = s.clone();
        match tokio::task::spawn_blocking(move || s2.swarm()).await? {
            Ok(info) => {
                for addr in info.addrs {
                    if let Some(id) = p2p_of(&addr) {
                        seed_ids.insert(id);
                    }
                    if let Err(e) = node.dial(addr).await {
                        tracing::debug!(error = %e, "dialing the seed's swarm node");
                    }
                }
            }
            Err(e) => println!("plasmd: phase seed swarm unknown: {e:#}"),
        }
    }

    let mut via = "swarm";
    let mut manifest = None;
    if let Some(p) = provider {
        let (p2, ch, ar) = (p.to_owned(), cfg.channel.clone(), cfg.arch.clone());
        match tokio::task::spawn_blocking(move || seed_manifest(&p2, &ch, &ar, &pubkey)).await? {
            SeedManifest::Ok(m) => {
                manifest = Some(*m);
                via = "http";
            }
            SeedManifest::Refused(why) => println!("plasmd: phase refused manifest from {why}"),
            SeedManifest::Unreachable(why) => {
                println!("plasmd: phase seed unreachable ({why}); asking swarm peers");
            }
        }
    }
    let manifest = match manifest {
        Some(m) => m,
        None => node
            .find_manifest(&cfg.channel, &cfg.arch, pubkey, MANIFEST_WAIT)
            .await
            .with_context(|| {
                format!(
                    "no peer offered a {}/{} manifest signed by the pinned key within {MANIFEST_WAIT:?}",
                    cfg.channel, cfg.arch
                )
            })?,
    };
    manifest.check_not_older(None)?;
    let m = manifest.manifest();
    if m.channel != cfg.channel || m.arch != cfg.arch {
        anyhow::bail!(
            "the manifest is signed for {}/{}, not {}/{}",
            m.channel,
            m.arch,
            cfg.channel,
            cfg.arch
        );
    }
    println!(
        "plasmd: phase manifest ok sequence={} root={} artifacts={} via={via}",
        m.sequence,
        manifest.root(),
        m.artifacts.len()
    );

    let (ptx, mut prx) = tokio::sync::watch::channel(FetchProgress::default());
    let printer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let p = prx.borrow_and_update().clone();
            if p.total > 0 {
                println!(
                    "plasmd: phase progress chunks={}/{} peers={}",
                    p.held, p.total, p.peers
                );
            }
        }
    });
    let fallback = seed.map(|s| Arc::new(s) as Arc<dyn phase_swarm::Fallback>);
    let fetch_started = Instant::now();
    let report = tokio::time::timeout(
        FETCH_TIMEOUT,
        node.fetch(manifest.clone(), fallback, Some(ptx)),
    )
    .await;
    printer.abort();
    let report = report
        .with_context(|| format!("the swarm fetch did not finish within {FETCH_TIMEOUT:?}"))??;

    let (mut seed_bytes, mut peer_bytes) = (0u64, 0u64);
    for (id, st) in &report.peers {
        let kind = if id == "http-seed" {
            "http"
        } else if seed_ids.contains(id) {
            "seed"
        } else {
            "peer"
        };
        if kind == "peer" {
            peer_bytes += st.bytes;
        } else {
            seed_bytes += st.bytes;
        }
        println!(
            "plasmd: phase source peer={id} kind={kind} bytes={} chunks={}",
            st.bytes, st.chunks
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
    Ok(SwarmFetch {
        manifest,
        store,
        node,
    })
}

/// The node's addresses with `/p2p/ID`, loopback last.
pub(crate) async fn addrs(node: &Handle) -> Vec<String> {
    let peer = node.peer_id();
    let list = tokio::time::timeout(Duration::from_secs(10), node.listen_addrs())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    crate::swarm_serve::sort_addrs(list)
        .into_iter()
        .filter(|a| !a.to_string().starts_with("/ip4/127."))
        .map(|a| a.with_p2p(peer).unwrap_or_else(|a| a).to_string())
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
    /// The carried archive to append to the target's initramfs.
    pub(crate) carried: Vec<u8>,
}

/// Fetches through the swarm (retrying with capped back-off, like the HTTP
/// fetch it replaces), lingers for `phase.linger`, and builds the carried
/// archive from the verified chunks and the `phase.*` parameters of `raw`.
pub(crate) fn first_stage(
    raw: &str,
    cfg: &PhaseConfig,
    provider: Option<&str>,
    pubkey: PublicKey,
) -> anyhow::Result<Ready> {
    let rt = crate::runtime()?;
    let mut backoff = Duration::from_secs(1);
    let fetch = loop {
        match rt.block_on(fetch(cfg, provider, pubkey)) {
            Ok(f) => break f,
            Err(e) => {
                println!("plasmd: fetch failed: {e:#}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    if let Some(secs) = cfg.linger {
        rt.block_on(linger(&fetch, secs));
    }
    let carried = crate::carry::archive(
        &fetch.manifest,
        &*fetch.store,
        &crate::carry::phase_params(raw),
    )
    .context("building the carried store")?;
    println!(
        "plasmd: phase carry bytes={} chunks={}",
        carried.len(),
        fetch.store.len()
    );
    Ok(Ready {
        _rt: rt,
        fetch,
        carried,
    })
}
