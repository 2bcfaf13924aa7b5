//! The swarm node beside `plasmd serve`: seeds every published manifest over
//! libp2p, with a stable identity kept in the state directory.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use phase_content::{FsStore, SignedManifest};
use phase_swarm::{Handle, Node, NodeConfig, addr, load_or_create_key};

use crate::metrics::Exporter;

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
    /// The most peers the seed holds connected.
    pub(crate) max_neighbours: usize,
    /// The swarm's chunk protocol.
    pub(crate) protocol: phase_swarm::Protocol,
}

/// A seed's K, above a fetcher's 40: every booting machine's first contact
/// is the seed (its `/swarm` addresses are given peers), and super-seeding
/// hands each newcomer chunks nobody else holds yet. 128 is the cap on
/// established incoming connections `Limits` already sizes for a 48-machine
/// storm with re-dials; beyond it a newcomer still gets the manifest over
/// HTTP and its chunks from the neighbours it finds by mDNS or the DHT.
pub(crate) const SEED_NEIGHBOURS: u16 = 128;

impl Default for SwarmOptions {
    fn default() -> Self {
        SwarmOptions {
            port: 0,
            state_dir: None,
            bind: IpAddr::from([0, 0, 0, 0]),
            mdns: std::env::var("PLASMD_MDNS").map_or(true, |v| v != "0"),
            max_neighbours: SEED_NEIGHBOURS.into(),
            protocol: phase_swarm::Protocol::V1,
        }
    }
}

/// The seed's running swarm node.
pub(crate) struct SeedSwarm {
    handle: Handle,
    roots: Vec<String>,
}

impl SeedSwarm {
    /// What `GET /swarm` tells a client at `client` that reached us at
    /// `reached`: every address the node listens on now (a node bound to
    /// 0.0.0.0 listens on each interface), the one the client reached first,
    /// loopback ones only to a client on loopback.
    pub(crate) async fn info(&self, client: IpAddr, reached: Option<IpAddr>) -> SwarmInfo {
        let peer_id = self.handle.peer_id();
        let now = tokio::time::timeout(Duration::from_secs(2), self.handle.listen_addrs())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut addrs: Vec<_> = addr::routable_first(now)
            .into_iter()
            .filter(|a| client.is_loopback() || !addr::is_loopback(a))
            .collect();
        if let Some(ip) = reached {
            // Stable: the reached address first, the rest as they were.
            addrs.sort_by_key(|a| addr::ip(a) != Some(ip));
        }
        SwarmInfo {
            peer_id: Some(peer_id.to_string()),
            addrs: addrs
                .into_iter()
                .map(|a| addr::with_peer(a, peer_id).to_string())
                .collect(),
            roots: self.roots.clone(),
        }
    }
}

/// Starts the swarm node that seeds `manifests` from `store`; returns once it
/// listens, leaving the node running in the background.
pub(crate) async fn start(
    metrics: &Exporter,
    store: FsStore,
    manifests: Vec<SignedManifest>,
    opts: SwarmOptions,
) -> anyhow::Result<SeedSwarm> {
    let mut cfg = metrics.node_config(
        NodeConfig::default()
            .with_mdns(opts.mdns)
            .with_max_neighbours(opts.max_neighbours)
            .with_listen(vec![addr::tcp(opts.bind, opts.port)])
            .with_protocol(opts.protocol),
    );
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
    tokio::time::timeout(Duration::from_secs(10), handle.listen_addrs())
        .await
        .context("the libp2p node did not start listening within 10 s")??;
    Ok(SeedSwarm { handle, roots })
}
