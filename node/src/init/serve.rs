//! Serve mode: `plasmd` as PID 1 of a system that was booted by `plasmd`.
//!
//! Selected by the presence of the carried store (see [`carry`]) in
//! the rootfs at start: a target initramfs that holds one was booted by our
//! first stage, which appended it. The node checks the carried manifest
//! against the carried pinned key and every chunk against the manifest, then
//! serves them on the swarm at once (mDNS on, listening on
//! [`first_stage::P2P_PORT`]), with no download. It prints
//! `SAW KEXEC=Y token=T` (T from its own cmdline's `token=`) once serving, so
//! tests know the target is up, and then runs forever. With `phase.metrics=PORT`
//! (on its own cmdline, else carried from the first stage's) it answers
//! Prometheus scrapes at `http://ADDR:PORT/metrics` (its console line is
//! listed in [`first_stage`]).
//!
//! Test knob: `phase.test_liar=1` in the carried parameters (that is, on the
//! first stage's cmdline) makes this node corrupt every chunk it serves, in a
//! build with test knobs ([`knobs`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use phase_boot::cmdline;
use phase_content::{ChunkStore, CorruptingStore};
use phase_swarm::{Node, NodeConfig};

use super::{carry, first_stage, knobs, net};
use crate::metrics::Exporter;

/// Whether this boot should serve a carried store (checked by `init::run`).
pub(crate) fn selected() -> bool {
    carry::present(Path::new("/"))
}

/// Runs serve mode as PID 1; returns only on error.
pub(crate) fn run() -> anyhow::Result<()> {
    println!(
        "plasmd: phase serve start version={}",
        env!("CARGO_PKG_VERSION")
    );
    let real = std::process::id() == 1;
    if real {
        net::mount_basics();
    }
    // The target's own command line carries the test's `token=`.
    let (own, own_min, own_metrics) = match cmdline::read(Path::new("/proc/cmdline")) {
        Ok((raw, cfg, _)) => (raw, cfg.min_sequence, cfg.metrics),
        Err(e) => {
            println!("plasmd: warning: {e}");
            (String::new(), None, None)
        }
    };
    let token = cmdline::split(&own)
        .into_iter()
        .find(|p| p.key == "token")
        .and_then(|p| p.value)
        .unwrap_or("")
        .to_owned();
    let mut c = carry::load(Path::new("/")).context("checking the carried store")?;
    carry::check_floor(
        &c.manifest,
        own_min,
        "phase.min_sequence on this system's cmdline",
    )?;
    let m = c.manifest.manifest();
    println!(
        "plasmd: phase carried ok root={} channel={} arch={} chunks={} bytes={}",
        c.manifest.root(),
        m.channel,
        m.arch,
        c.chunks,
        c.bytes
    );
    if real {
        let n = net::load_modules(Path::new("/lib/modules"))?;
        println!("plasmd: phase modules loaded count={n}");
        let lease = loop {
            match net::dhcp() {
                Ok(l) => break l,
                Err(e) => {
                    println!("plasmd: network failed: {e:#}; retrying");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        };
        println!(
            "plasmd: phase network up iface={} ip={} router={}",
            lease.iface, lease.ip, lease.router
        );
    }
    let (liar, ignored) = knobs::liar(&c.raw_params);
    if let Some(line) = ignored {
        println!("{line}");
    }
    let chunks = std::mem::take(&mut c.store);
    let store: Arc<dyn ChunkStore> = if liar {
        println!("plasmd: test knob: phase.test_liar=1: serving corrupted chunks");
        Arc::new(CorruptingStore::new(chunks))
    } else {
        Arc::new(chunks)
    };
    let peers = c
        .params
        .peers
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    let listen = phase_swarm::addr::tcp([0, 0, 0, 0].into(), first_stage::P2P_PORT);
    let metrics = own_metrics.or(c.params.metrics);
    crate::node_runtime()?.block_on(serve(c, store, liar, listen, peers, token, metrics))
}

async fn serve(
    c: carry::Carried,
    store: Arc<dyn ChunkStore>,
    liar: bool,
    listen: phase_swarm::Multiaddr,
    peers: Vec<phase_swarm::Multiaddr>,
    token: String,
    metrics: Option<u16>,
) -> anyhow::Result<()> {
    let mut cfg = NodeConfig::default()
        .with_listen(vec![listen])
        .with_peers(peers)
        .with_mdns(true)
        .with_dht(c.params.mode == cmdline::Mode::Internet);
    if let Some(port) = metrics {
        let e = Exporter::new();
        cfg = e.node_config(cfg);
        // A port that cannot be had costs the scrapes, not the serving.
        match crate::metrics::listen(e, SocketAddr::from(([0, 0, 0, 0], port))).await {
            Ok(at) => println!("plasmd: phase metrics listening addr={at}"),
            Err(e) => println!("plasmd: phase metrics failed: {e:#}"),
        }
    }
    let node = Node::spawn(cfg, store).context("starting the libp2p node")?;
    let root = c.manifest.root();
    node.seed(c.manifest)
        .await
        .context("seeding the carried manifest")?;
    let addrs = first_stage::addrs(&node).await;
    println!(
        "plasmd: phase serving root={root} peer={} addrs={} liar={}",
        node.peer_id(),
        addrs.join(","),
        u8::from(liar)
    );
    println!("SAW KEXEC=Y token={token}");
    let mut last = usize::MAX;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        let n = node.connected_peers().await.map(|p| p.len()).unwrap_or(0);
        if n != last {
            println!("plasmd: phase serving peers={n}");
            last = n;
        }
    }
}
