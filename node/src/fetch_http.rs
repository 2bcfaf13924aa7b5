//! The HTTP seed as seen by `plasmd fetch`: the signed manifest, the seed's
//! libp2p addresses, and chunks as a last resort.

use std::time::Duration;

use anyhow::{Context, bail};
use phase_content::{Hash, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES, PublicKey, SignedManifest};
use phase_swarm::{Fallback, Multiaddr};

/// A seed at `base` (`http://host:port`).
#[derive(Clone)]
pub(crate) struct HttpSeed {
    pub(crate) base: String,
    agent: ureq::Agent,
}

/// The seed's swarm node.
pub(crate) struct SeedSwarm {
    pub(crate) addrs: Vec<Multiaddr>,
}

impl HttpSeed {
    pub(crate) fn new(base: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(15)))
            .timeout_connect(Some(Duration::from_secs(3)))
            .build()
            .into();
        HttpSeed {
            base: base.trim_end_matches('/').to_owned(),
            agent,
        }
    }

    fn get(&self, path: &str, limit: u64) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        resp.body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .with_context(|| format!("reading GET {url}"))
    }

    /// The signed manifest of `channel`/`arch`, verified against `pinned`.
    pub(crate) fn manifest(
        &self,
        channel: &str,
        arch: &str,
        pinned: &PublicKey,
    ) -> anyhow::Result<SignedManifest> {
        let bytes = self.get(
            &format!("/{channel}/{arch}/manifest.json"),
            MAX_MANIFEST_BYTES as u64,
        )?;
        SignedManifest::verify(&bytes, pinned).with_context(|| {
            format!(
                "the manifest from {} does not verify against the pinned key {pinned}",
                self.base
            )
        })
    }

    /// The seed's libp2p addresses: those on the seed's own host first (the
    /// URL proved that host reachable), else all it lists.
    pub(crate) fn swarm(&self) -> anyhow::Result<SeedSwarm> {
        let bytes = self.get("/swarm", 1 << 20)?;
        #[derive(serde::Deserialize)]
        struct Info {
            addrs: Vec<String>,
        }
        let info: Info = serde_json::from_slice(&bytes).context("parsing /swarm")?;
        let all: Vec<Multiaddr> = info.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if all.is_empty() {
            bail!("the seed lists no swarm addresses");
        }
        let host = self
            .base
            .split("://")
            .nth(1)
            .and_then(|r| r.split(['/', ':']).next())
            .unwrap_or("")
            .to_owned();
        let same: Vec<Multiaddr> = all
            .iter()
            .filter(|a| a.to_string().starts_with(&format!("/ip4/{host}/")))
            .cloned()
            .collect();
        Ok(SeedSwarm {
            addrs: if same.is_empty() { all } else { same },
        })
    }
}

impl Fallback for HttpSeed {
    fn name(&self) -> String {
        "http-seed".into()
    }

    fn get(&self, hash: &Hash) -> Result<Vec<u8>, String> {
        HttpSeed::get(self, &format!("/chunks/{hash}"), u64::from(MAX_CHUNK_SIZE))
            .map_err(|e| format!("{e:#}"))
    }
}
