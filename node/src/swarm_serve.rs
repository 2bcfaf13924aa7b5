//! The swarm node beside `plasmd serve`: seeds every published manifest over
//! libp2p, with a stable identity kept in the state directory.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use phase_content::{FsStore, SignedManifest};
use phase_swarm::{Node, NodeConfig, addr, load_or_create_key};

/// What the HTTP seed tells clients about the swarm node (`GET /swarm`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct SwarmInfo {
    /// The node's libp2p peer id, once a swarm runs.
    pub(crate) peer_id: Option<String>,
    /// Multiaddrs (with `/p2p/PEER`) the node listens on.
    pub(crate) addrs: Vec<String>,
    /// Manifest roots (hex) the node seeds.
    #[serde(default)]
    pub(crate) roots: Vec<String>,
}

/// Options for the seeding swarm node.
#[derive(Debug, Clone)]
pub(crate) struct SwarmOptions {
    /// libp2p listen port (0: any).
    pub(crate) port: u16,
    /// Directory for persistent state (the libp2p identity key, STATE/p2p.key).
    pub(crate) state_dir: Option<std::path::PathBuf>,
    /// Address to listen on.
    pub(crate) bind: IpAddr,
    /// Discover LAN peers with mDNS (also off when `PLASMD_MDNS=0`).
    pub(crate) mdns: bool,
}

impl Default for SwarmOptions {
    fn default() -> Self {
        SwarmOptions {
            port: 0,
            state_dir: None,
            bind: IpAddr::from([0, 0, 0, 0]),
            mdns: std::env::var("PLASMD_MDNS").map_or(true, |v| v != "0"),
        }
    }
}

/// Starts the swarm node that seeds `manifests` from `store`; returns once it
/// listens, leaving the node running in the background.
pub(crate) async fn start(
    store: FsStore,
    manifests: Vec<SignedManifest>,
    opts: SwarmOptions,
) -> anyhow::Result<SwarmInfo> {
    let mut cfg = NodeConfig::default()
        .with_mdns(opts.mdns)
        .with_listen(vec![addr::tcp(opts.bind, opts.port)]);
    if let Some(dir) = &opts.state_dir {
        cfg = cfg.with_keypair(load_or_create_key(&dir.join("p2p.key"))?);
    }
    let handle = Node::spawn(cfg, Arc::new(store)).context("starting the libp2p node")?;
    let mut roots = Vec::new();
    for m in manifests {
        roots.push(m.root().to_hex());
        handle
            .seed(m)
            .await
            .context("seeding a published manifest")?;
    }
    let addrs = tokio::time::timeout(Duration::from_secs(10), handle.listen_addrs())
        .await
        .context("the libp2p node did not start listening within 10 s")??;
    let peer_id = handle.peer_id();
    let info = SwarmInfo {
        peer_id: Some(peer_id.to_string()),
        addrs: addr::routable_first(addrs)
            .into_iter()
            .map(|a| addr::with_peer(a, peer_id).to_string())
            .collect(),
        roots,
    };
    // The node runs as long as the process: keep one handle alive for it.
    tokio::spawn(async move {
        let _keep = handle;
        std::future::pending::<()>().await
    });
    Ok(info)
}
