//! The one fetch path of `plasmd fetch` and of PID 1's first stage.
//!
//! A [`Fetcher`] owns the libp2p node, the chunk store and the HTTP seed
//! client for as long as it lives, so a retry resumes from the chunks already
//! verified and keeps the peers it found. One attempt: get the signed
//! manifest (from the seed over HTTP, else from peers), check it is the
//! channel/arch asked for and not older than one accepted before, then fetch
//! every chunk through the swarm with the seed's `/chunks/HASH` as the rescue
//! source. Callers print in their own style: [`Note`]s tell them what
//! happened on the way, the [`FetchReport`] what came from where.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use phase_boot::cmdline::Mode;
use phase_content::{ChunkStore, PublicKey, SignedManifest};
use phase_swarm::{
    FetchProgress, FetchReport, Handle, Keypair, Multiaddr, Node, NodeConfig, PeerId, Source, addr,
};
use tokio::sync::watch;

use super::http::{HttpSeed, ManifestError};
use crate::metrics::Exporter;

/// What to fetch and how to reach it.
pub(crate) struct Options {
    /// The HTTP seed (`http://host:port`): manifest, its swarm addresses, rescue chunks.
    pub(crate) provider: Option<String>,
    pub(crate) channel: String,
    pub(crate) arch: String,
    /// Only manifests this key signed are accepted.
    pub(crate) pubkey: PublicKey,
    pub(crate) listen: Multiaddr,
    /// Peers dialed at start.
    pub(crate) peers: Vec<Multiaddr>,
    pub(crate) mdns: bool,
    /// `Lan`: no Kademlia DHT; peers only from the seed, `peers` and mDNS.
    pub(crate) mode: Mode,
    /// The libp2p identity; a fresh one if `None`.
    pub(crate) keypair: Option<Keypair>,
    /// How long peers may take to offer a manifest when the seed gives none
    /// (or only an older one than `min_sequence`).
    pub(crate) manifest_wait: Duration,
    /// Refuse manifests older than this (`--min-sequence`, the state file,
    /// `phase.min_sequence=`).
    pub(crate) min_sequence: Option<Floor>,
    /// When the seed's manifest arrived and peers are connected, how long
    /// they may take to offer a newer one (0: take the seed's). Nothing is
    /// waited for when no peer is connected.
    pub(crate) offer_window: Duration,
    /// Where the node counts for Prometheus; nowhere if `None`.
    pub(crate) metrics: Option<Exporter>,
    /// K, the most peers held connected; the library's default if `None`.
    pub(crate) max_neighbours: Option<usize>,
    /// The swarm's chunk protocol.
    pub(crate) protocol: phase_swarm::Protocol,
}

/// The lowest sequence still accepted, and what set it (for the refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Floor {
    pub(crate) sequence: u64,
    pub(crate) from: String,
}

/// How long connected peers may take to offer a newer manifest than the seed's.
pub(crate) const OFFER_WINDOW: Duration = Duration::from_secs(1);

/// Something the caller may want to tell its user.
pub(crate) enum Note<'a> {
    /// The seed's `/swarm` could not be read: no seed peer to dial.
    SeedSwarmUnknown(&'a anyhow::Error),
    /// The seed gave no manifest; peers are asked next.
    SeedManifest(&'a ManifestError),
    /// The seed's manifest is older than the floor (one line naming both
    /// sequences); peers are asked for a newer one next.
    Older(&'a anyhow::Error),
    /// A peer offered a newer manifest than the seed's: that one is used.
    NewerFromPeer { seed: u64, peer: u64 },
}

/// Where a manifest came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    Http,
    Swarm,
}

impl Via {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Via::Http => "http",
            Via::Swarm => "swarm",
        }
    }
}

/// What kind of source sent verified bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The seed's HTTP `/chunks/HASH` (the rescue).
    Http,
    /// The seed's own swarm node.
    Seed,
    /// Any other peer.
    Peer,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Seed => "seed",
            Kind::Peer => "peer",
        }
    }
}

/// The fetch state that outlives one attempt.
pub(crate) struct Fetcher {
    node: Handle,
    store: Arc<dyn ChunkStore>,
    seed: Option<HttpSeed>,
    /// The seed's swarm node(s), as listed by its `/swarm`.
    seed_peers: HashSet<PeerId>,
    opts: Options,
    /// The highest sequence accepted so far (or the caller's minimum): a
    /// retry never goes back.
    floor: Option<Floor>,
    say: fn(Note<'_>),
}

impl Fetcher {
    /// Starts the node on `store` and dials the seed's swarm node.
    pub(crate) async fn start(
        opts: Options,
        store: Arc<dyn ChunkStore>,
        say: fn(Note<'_>),
    ) -> anyhow::Result<Fetcher> {
        let mut cfg = NodeConfig::default()
            .with_listen(vec![opts.listen.clone()])
            .with_peers(opts.peers.clone())
            .with_mdns(opts.mdns)
            .with_dht(opts.mode == Mode::Internet)
            .with_protocol(opts.protocol)
            // PLASMD_PROMISE=0: no promised chunks (for side-by-side runs).
            .with_promise(std::env::var("PLASMD_PROMISE").map_or(true, |v| v != "0"))
            // PLASMD_MAPS_WITH_CHUNKS=0: have-maps only pulled (side by side).
            .with_maps_with_chunks(
                std::env::var("PLASMD_MAPS_WITH_CHUNKS").map_or(true, |v| v != "0"),
            );
        if let Some(k) = &opts.keypair {
            cfg = cfg.with_keypair(k.clone());
        }
        if let Some(k) = opts.max_neighbours {
            cfg = cfg.with_max_neighbours(k);
        }
        if let Some(e) = &opts.metrics {
            cfg = e.node_config(cfg);
        }
        let node = Node::spawn(cfg, store.clone()).context("starting the libp2p node")?;
        let mut f = Fetcher {
            node,
            store,
            seed: opts.provider.as_deref().map(HttpSeed::new),
            seed_peers: HashSet::new(),
            floor: opts.min_sequence.clone(),
            opts,
            say,
        };
        f.dial_seed().await?;
        Ok(f)
    }

    pub(crate) fn node(&self) -> &Handle {
        &self.node
    }

    pub(crate) fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// Reads the seed's `/swarm` and dials what it lists (until it answers once).
    async fn dial_seed(&mut self) -> anyhow::Result<()> {
        let Some(seed) = self.seed.clone() else {
            return Ok(());
        };
        if !self.seed_peers.is_empty() {
            return Ok(());
        }
        match tokio::task::spawn_blocking(move || seed.swarm()).await? {
            Ok(addrs) => {
                for a in addrs {
                    if let Some(p) = addr::peer_id(&a) {
                        self.seed_peers.insert(p);
                        if let Some(e) = &self.opts.metrics {
                            // Its bytes count as source="seed", as in the summary's kinds.
                            e.metrics().mark_seed(p);
                        }
                    }
                    if let Err(e) = self.node.dial(a).await {
                        tracing::debug!(error = %e, "dialing the seed's swarm node");
                    }
                }
            }
            Err(e) => (self.say)(Note::SeedSwarmUnknown(&e)),
        }
        Ok(())
    }

    /// The manifest to fetch: the newest valid one offered at once. The
    /// seed's over HTTP, unless a connected peer offers a newer one within
    /// [`Options::offer_window`]; else (no seed manifest, or one older than
    /// the floor) the newest a peer offers within `manifest_wait`. Refused
    /// if it is for another channel/arch or older than the floor.
    pub(crate) async fn manifest(&mut self) -> anyhow::Result<(SignedManifest, Via)> {
        self.dial_seed().await?;
        let (channel, arch, pubkey) = (
            self.opts.channel.clone(),
            self.opts.arch.clone(),
            self.opts.pubkey,
        );
        let mut from_seed = None;
        let mut older = None;
        if let Some(seed) = self.seed.clone() {
            let (ch, ar) = (channel.clone(), arch.clone());
            let url = seed.manifest_url(&ch, &ar);
            match tokio::task::spawn_blocking(move || seed.manifest(&ch, &ar, &pubkey)).await? {
                Ok(m) => match accept(&m, &channel, &arch, self.floor.as_ref(), &url) {
                    Ok(_) => from_seed = Some(m),
                    Err(e) => {
                        (self.say)(Note::Older(&e));
                        older = Some(e);
                    }
                },
                Err(e) => (self.say)(Note::SeedManifest(&e)),
            }
        }
        let (m, via) = match from_seed {
            Some(m) => self.newer_from_peers(m).await,
            None => {
                let wait = self.opts.manifest_wait;
                let m = match self.node.find_manifest(&channel, &arch, pubkey, wait).await {
                    Ok(m) => m,
                    Err(e) => {
                        let e = anyhow::Error::new(e);
                        return Err(match older {
                            Some(o) => o.context(format!(
                                "and no peer offered a newer one within {} s",
                                wait.as_secs()
                            )),
                            None => e.context(format!(
                                "no {channel}/{arch} manifest from the seed, and no peer \
                                 offered one signed by the pinned key within {} s",
                                wait.as_secs()
                            )),
                        });
                    }
                };
                (m, Via::Swarm)
            }
        };
        let from = match via {
            Via::Http => self.opts.provider.clone().unwrap_or_default(),
            Via::Swarm => "swarm peers".to_owned(),
        };
        self.floor = Some(accept(&m, &channel, &arch, self.floor.as_ref(), &from)?);
        Ok((m, via))
    }

    /// `seed`'s manifest, or a newer one a connected peer offers within the
    /// offer window. Peers are asked only for a manifest newer than the
    /// seed's (`LatestAbove`): the seed's own swarm node, asked too (the
    /// HTTP answer may come from a stale proxy), does not send the same
    /// manifest again over the uplink a storm waits for. No peer connected:
    /// the seed's at once.
    async fn newer_from_peers(&self, seed: SignedManifest) -> (SignedManifest, Via) {
        let o = &self.opts;
        if o.offer_window.is_zero() {
            return (seed, Via::Http);
        }
        let connected = self.node.connected_peers().await.unwrap_or_default();
        if connected.is_empty() {
            return (seed, Via::Http);
        }
        match self
            .node
            .newer_manifest(seed.clone(), o.pubkey, o.offer_window)
            .await
        {
            Ok(p) if p.manifest().sequence > seed.manifest().sequence => {
                (self.say)(Note::NewerFromPeer {
                    seed: seed.manifest().sequence,
                    peer: p.manifest().sequence,
                });
                (p, Via::Swarm)
            }
            _ => (seed, Via::Http),
        }
    }

    /// Fetches every chunk of `manifest` into the store (resuming from what
    /// it holds), within `timeout` if one is given.
    pub(crate) async fn fetch(
        &self,
        manifest: &SignedManifest,
        progress: Option<watch::Sender<FetchProgress>>,
        timeout: Option<Duration>,
    ) -> anyhow::Result<FetchReport> {
        let fallback = self
            .seed
            .clone()
            .map(|s| Arc::new(s) as Arc<dyn phase_swarm::Fallback>);
        let fetch = self.node.fetch(manifest.clone(), fallback, progress);
        let report = match timeout {
            Some(t) => tokio::time::timeout(t, fetch)
                .await
                .with_context(|| format!("the fetch did not finish within {} s", t.as_secs()))??,
            None => fetch.await?,
        };
        Ok(report)
    }

    /// What kind of source sent bytes.
    pub(crate) fn kind(&self, source: &Source) -> Kind {
        match source {
            Source::HttpSeed => Kind::Http,
            Source::Peer(p) if self.seed_peers.contains(p) => Kind::Seed,
            Source::Peer(_) => Kind::Peer,
        }
    }

    /// The node's addresses with `/p2p/ID`, routable first; loopback only if
    /// `loopback`.
    pub(crate) async fn addrs(&self, loopback: bool) -> Vec<Multiaddr> {
        addrs(&self.node, loopback).await
    }
}

/// `node`'s listen addresses with `/p2p/ID`, routable first; loopback ones
/// only if `loopback`.
pub(crate) async fn addrs(node: &Handle, loopback: bool) -> Vec<Multiaddr> {
    let peer = node.peer_id();
    let list = tokio::time::timeout(Duration::from_secs(10), node.listen_addrs())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    addr::routable_first(list)
        .into_iter()
        .filter(|a| loopback || !addr::is_loopback(a))
        .map(|a| addr::with_peer(a, peer))
        .collect()
}

/// Checks `m` (offered by `from`) is for `channel`/`arch` and not older
/// than `floor`; returns the new floor. The refusal is one line naming both
/// sequences, where the older one came from and what set the floor.
fn accept(
    m: &SignedManifest,
    channel: &str,
    arch: &str,
    floor: Option<&Floor>,
    from: &str,
) -> anyhow::Result<Floor> {
    let mm = m.manifest();
    anyhow::ensure!(
        mm.channel == channel && mm.arch == arch,
        "the manifest is signed for {}/{}, not the {channel}/{arch} asked for",
        mm.channel,
        mm.arch
    );
    match floor {
        Some(f) if mm.sequence < f.sequence => anyhow::bail!(
            "refusing the {channel}/{arch} manifest sequence {} from {from}: older than \
             sequence {} ({})",
            mm.sequence,
            f.sequence,
            f.from
        ),
        Some(f) if mm.sequence == f.sequence => Ok(f.clone()),
        _ => Ok(Floor {
            sequence: mm.sequence,
            from: format!("accepted before from {from}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use phase_content::publish::{chunk_bytes, sign_artifacts};
    use phase_content::{MemStore, SecretKey};

    fn manifest(channel: &str, arch: &str, sequence: u64) -> SignedManifest {
        let key = SecretKey::from_seed([3; 32]);
        let kernel = chunk_bytes("kernel", &[7u8; 100], &MemStore::new(), 4096).unwrap();
        sign_artifacts(&key, channel, arch, sequence, vec![kernel]).unwrap()
    }

    #[test]
    fn a_retry_never_accepts_an_older_or_foreign_manifest() {
        let (ch, ar) = ("stable", "x86_64");
        let floor = accept(&manifest(ch, ar, 5), ch, ar, None, "http://seed").unwrap();
        assert_eq!(floor.sequence, 5);
        let e = accept(&manifest(ch, ar, 4), ch, ar, Some(&floor), "http://proxy").unwrap_err();
        let e = format!("{e:#}");
        assert_eq!(
            e,
            "refusing the stable/x86_64 manifest sequence 4 from http://proxy: older than \
             sequence 5 (accepted before from http://seed)"
        );
        assert_eq!(
            accept(&manifest(ch, ar, 5), ch, ar, Some(&floor), "x")
                .unwrap()
                .sequence,
            5
        );
        let min = Floor {
            sequence: 3,
            from: "--min-sequence 3".into(),
        };
        assert_eq!(
            accept(&manifest(ch, ar, 7), ch, ar, Some(&min), "x")
                .unwrap()
                .sequence,
            7
        );
        let e = accept(&manifest("beta", ar, 9), ch, ar, None, "x").unwrap_err();
        assert!(format!("{e}").contains("beta/x86_64"), "{e}");
    }
}
