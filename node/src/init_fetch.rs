//! The boot-time fetch over the HTTP seed (`plasmd serve`): the signed
//! manifest, then every chunk, each verified on the way into a [`MemStore`].
//! The swarm fetch replaces this function later; its signature is the seam.

use std::time::{Duration, Instant};

use anyhow::Context;
use phase_content::{
    ChunkStore, Hash, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES, MemStore, PublicKey, SignedManifest,
};

/// One request's whole budget: a stalled seed costs at most this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build(),
    )
}

fn get(agent: &ureq::Agent, url: &str, limit: u64) -> anyhow::Result<Vec<u8>> {
    let mut resp = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    resp.body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .with_context(|| format!("GET {url}: reading the body"))
}

/// Fetches and verifies `{provider}/{channel}/{arch}/manifest.json` against
/// the pinned key, then every chunk it lists. Prints progress lines.
pub(crate) fn fetch_http(
    provider: &str,
    pubkey: &PublicKey,
    channel: &str,
    arch: &str,
) -> anyhow::Result<(SignedManifest, MemStore)> {
    let agent = agent();
    let url = format!("{provider}/{channel}/{arch}/manifest.json");
    let bytes = get(&agent, &url, MAX_MANIFEST_BYTES as u64)?;
    let signed =
        SignedManifest::verify(&bytes, pubkey).with_context(|| format!("manifest from {url}"))?;
    signed.check_not_older(None)?;
    let m = signed.manifest();
    if m.channel != channel || m.arch != arch {
        anyhow::bail!(
            "{url} is signed for {}/{}, not {channel}/{arch}",
            m.channel,
            m.arch
        );
    }
    println!(
        "plasmd: phase manifest ok sequence={} root={} artifacts={}",
        m.sequence,
        signed.root(),
        m.artifacts.len()
    );

    let store = MemStore::new();
    let start = Instant::now();
    let mut bytes_total = 0u64;
    let mut wanted: Vec<Hash> = m.artifacts.iter().flat_map(|a| a.chunks.clone()).collect();
    let mut seen = std::collections::HashSet::new();
    wanted.retain(|h| seen.insert(*h));
    let n = wanted.len();
    for (i, hash) in wanted.iter().enumerate() {
        let url = format!("{provider}/chunks/{hash}");
        let data = get(&agent, &url, u64::from(MAX_CHUNK_SIZE))?;
        bytes_total += data.len() as u64;
        store
            .put(hash, &data)
            .with_context(|| format!("chunk from {url}"))?;
        if (i + 1) % 16 == 0 || i + 1 == n {
            println!(
                "plasmd: phase progress chunks={}/{n} bytes={bytes_total}",
                i + 1
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "plasmd: phase fetched chunks={n} bytes={bytes_total} seconds={secs:.1} from={provider}"
    );
    Ok((signed, store))
}
