//! The swarm beside `plasmd serve`: owned by the swarm work (issue 3).

use phase_content::{FsStore, SignedManifest};

/// What the HTTP seed tells clients about the swarm node (`GET /swarm`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct SwarmInfo {
    /// The node's libp2p peer id, once a swarm runs.
    pub(crate) peer_id: Option<String>,
    /// Multiaddrs (with `/p2p/PEER`) the node listens on.
    pub(crate) addrs: Vec<String>,
}

/// Options for the seeding swarm node.
#[derive(Debug, Clone, Default)]
pub(crate) struct SwarmOptions {
    /// libp2p listen port (0: any).
    pub(crate) port: u16,
    /// Directory for persistent state (the libp2p identity key).
    pub(crate) state_dir: Option<std::path::PathBuf>,
}

/// Starts the swarm node that seeds `manifests` from `store`.
pub(crate) async fn start(
    _store: FsStore,
    _manifests: Vec<SignedManifest>,
    _opts: SwarmOptions,
) -> anyhow::Result<SwarmInfo> {
    Ok(SwarmInfo::default())
}
