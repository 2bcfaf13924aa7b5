//! The HTTP seed as a fetcher sees it (`--provider`, `phase.provider=`): the
//! signed manifest, the seed's libp2p addresses, and chunks as a last
//! resort. The one HTTP client of `plasmd fetch` and of PID 1.

use std::io::Read;
use std::time::Duration;

use anyhow::Context;
use phase_content::{Hash, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES, PublicKey, SignedManifest};
use phase_swarm::{Fallback, Multiaddr, Span, addr, span_by_chunks};

/// Connecting to the seed: it is on the local network or nearby.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One whole request (a chunk is at most [`MAX_CHUNK_SIZE`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// `/swarm` is a short JSON list.
const MAX_SWARM_INFO: u64 = 1 << 20;

/// A seed at `base` (`http://host:port`).
#[derive(Clone)]
pub(crate) struct HttpSeed {
    base: String,
    agent: ureq::Agent,
}

/// Why the seed gave no manifest.
#[derive(Debug)]
pub(crate) enum ManifestError {
    /// Bytes arrived but do not verify against the pinned key.
    Refused(anyhow::Error),
    /// No usable answer (connection, status, size).
    Unreachable(anyhow::Error),
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestError::Refused(e) | ManifestError::Unreachable(e) => write!(f, "{e:#}"),
        }
    }
}

impl HttpSeed {
    pub(crate) fn new(base: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            // The rescue keeps up to 64 GETs in flight (16 at 64 KiB chunks):
            // each returns its connection to the pool for the next, instead of
            // a new TCP connection per chunk (ureq keeps 3 per host by default;
            // bootspeed's guest spent 1.9 s on 16 MB that way).
            .max_idle_connections_per_host(64)
            .max_idle_connections(64)
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
        // Sized from Content-Length (within the limit), so a chunk is read
        // straight into its buffer without regrowing it.
        let mut buf = Vec::with_capacity(
            resp.body()
                .content_length()
                .unwrap_or(0)
                .min(limit)
                .try_into()
                .unwrap_or(0),
        );
        resp.body_mut()
            .with_config()
            .limit(limit)
            .reader()
            .read_to_end(&mut buf)
            .with_context(|| format!("reading GET {url}"))?;
        Ok(buf)
    }

    /// Where [`HttpSeed::manifest`] reads `channel`/`arch` from.
    pub(crate) fn manifest_url(&self, channel: &str, arch: &str) -> String {
        format!("{}/{channel}/{arch}/manifest.json", self.base)
    }

    /// The signed manifest of `channel`/`arch`, verified against `pinned`.
    pub(crate) fn manifest(
        &self,
        channel: &str,
        arch: &str,
        pinned: &PublicKey,
    ) -> Result<SignedManifest, ManifestError> {
        let path = format!("/{channel}/{arch}/manifest.json");
        let bytes = self
            .get(&path, MAX_MANIFEST_BYTES as u64)
            .map_err(ManifestError::Unreachable)?;
        SignedManifest::verify(&bytes, pinned).map_err(|e| {
            ManifestError::Refused(anyhow::Error::new(e).context(format!(
                "{}{path} is not signed by the pinned key {pinned}: refusing its artifacts \
                 (check the pinned key against the one `plasmd serve` prints)",
                self.base
            )))
        })
    }

    /// The seed's libp2p addresses: those on the host of the seed's URL first
    /// (the URL proved that host reachable), else all it lists.
    pub(crate) fn swarm(&self) -> anyhow::Result<Vec<Multiaddr>> {
        #[derive(serde::Deserialize)]
        struct Info {
            addrs: Vec<String>,
        }
        let bytes = self.get("/swarm", MAX_SWARM_INFO)?;
        let info: Info = serde_json::from_slice(&bytes).context("parsing /swarm")?;
        let all: Vec<Multiaddr> = info.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        anyhow::ensure!(!all.is_empty(), "the seed lists no swarm addresses");
        let host = self.host();
        let same: Vec<Multiaddr> = all
            .iter()
            .filter(|a| addr::on_host(a, &host))
            .cloned()
            .collect();
        Ok(if same.is_empty() { all } else { same })
    }

    /// The host part of the base URL (`[::1]` keeps its brackets).
    fn host(&self) -> String {
        self.base
            .parse::<ureq::http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Fallback for HttpSeed {
    fn get(&self, hash: &Hash) -> Result<Vec<u8>, String> {
        HttpSeed::get(self, &format!("/chunks/{hash}"), u64::from(MAX_CHUNK_SIZE))
            .map_err(|e| format!("{e:#}"))
    }

    /// One `Range` GET of the artifact's path (`/CHANNEL/ARCH/NAME`, which
    /// the seed serves from its verified chunks); a server that ignores the
    /// range (a `200`) gets one `/chunks/HASH` GET per chunk instead.
    fn get_span(&self, span: &Span) -> Result<Vec<u8>, String> {
        if span.hashes.len() == 1 {
            return Fallback::get(self, &span.hashes[0]);
        }
        let url = format!(
            "{}/{}/{}/{}",
            self.base, span.channel, span.arch, span.artifact
        );
        let last = span.offset + span.len.saturating_sub(1);
        let mut resp = self
            .agent
            .get(&url)
            .header("Range", format!("bytes={}-{last}", span.offset))
            .call()
            .map_err(|e| format!("GET {url} (bytes {}-{last}): {e}", span.offset))?;
        if resp.status() != 206 {
            drop(resp);
            return span_by_chunks(self, span);
        }
        // One byte over what was asked shows an overlong answer as such.
        let mut buf = Vec::with_capacity(usize::try_from(span.len).unwrap_or(0));
        resp.body_mut()
            .with_config()
            .limit(span.len + 1)
            .reader()
            .read_to_end(&mut buf)
            .map_err(|e| format!("reading GET {url} (bytes {}-{last}): {e}", span.offset))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_the_base_url() {
        for (url, host) in [
            ("http://192.168.2.1:8080", "192.168.2.1"),
            ("http://seed.lan/", "seed.lan"),
            ("http://[::1]:8080", "[::1]"),
            ("http://u:p@10.0.0.1:80/x", "10.0.0.1"),
        ] {
            assert_eq!(HttpSeed::new(url).host(), host, "{url}");
        }
    }
}
