//! `plasmd keygen` and `plasmd publish`.

use std::path::PathBuf;

use anyhow::Context;
use phase_content::publish::{PublishOptions, publish_dir};
use phase_content::{FsStore, SecretKey};

#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {
    /// Where to write the secret key (mode 0600; never overwritten).
    #[arg(long)]
    out: PathBuf,
}

pub(crate) fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
    let key = SecretKey::generate();
    key.write_new(&a.out)?;
    println!("{}", key.public());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// The publisher's secret key file (from `plasmd keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Directory holding CHANNEL/ARCH/{kernel,initramfs[,cmdline][,dtb]}.
    #[arg(long, short = 'a')]
    artifacts: PathBuf,
    /// Chunk store directory (created if needed).
    #[arg(long)]
    store: PathBuf,
    /// Chunk size in bytes for newly published manifests (default: 64 KiB;
    /// doubled for a set over 2 GiB until it needs at most 32,768 chunks).
    #[arg(long)]
    chunk_size: Option<u32>,
    /// HTTP seed URL to record in the manifests (repeatable).
    #[arg(long = "seed")]
    seeds: Vec<String>,
}

pub(crate) fn publish(a: PublishArgs) -> anyhow::Result<()> {
    let key = crate::files::read_secret_key(&a.key)?;
    let store = FsStore::open(&a.store)?;
    let opts = PublishOptions::default()
        .with_chunk_size(a.chunk_size)
        .with_seeds(a.seeds);
    let published = publish_dir(&key, &a.artifacts, &store, &opts)
        .with_context(|| format!("publishing {}", a.artifacts.display()))?;
    for p in published {
        let m = p.manifest.manifest();
        let bytes: u64 = m.artifacts.iter().map(|a| a.size).sum();
        println!(
            "{}/{} sequence {} root {} ({} artifacts, {} bytes) -> {}",
            m.channel,
            m.arch,
            m.sequence,
            p.manifest.root(),
            m.artifacts.len(),
            bytes,
            p.path.display()
        );
    }
    Ok(())
}
