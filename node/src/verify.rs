//! `plasmd verify`.

use std::path::PathBuf;

use anyhow::Context;
use phase_content::{PublicKey, SignedManifest, verify_file};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The publisher's public key (64 hex digits, as `plasmd keygen` prints it).
    #[arg(long)]
    pubkey: PublicKey,
    /// The signed manifest file.
    manifest: PathBuf,
    /// Also check the artifact files in DIR (either DIR/NAME or DIR/CHANNEL/ARCH/NAME).
    #[arg(long)]
    artifacts: Option<PathBuf>,
    /// Refuse manifests with a lower sequence than this (rollback protection).
    #[arg(long)]
    min_sequence: Option<u64>,
}

pub(crate) fn run(a: Args) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.manifest)
        .with_context(|| format!("reading manifest {}", a.manifest.display()))?;
    let signed = SignedManifest::verify(&bytes, &a.pubkey)
        .with_context(|| format!("{}", a.manifest.display()))?;
    signed
        .check_not_older(a.min_sequence)
        .with_context(|| format!("{}", a.manifest.display()))?;
    let m = signed.manifest();
    println!(
        "{}: signature ok, {}/{} sequence {} root {}",
        a.manifest.display(),
        m.channel,
        m.arch,
        m.sequence,
        signed.root()
    );
    if let Some(dir) = a.artifacts {
        let nested = dir.join(&m.channel).join(&m.arch);
        let base = if nested.is_dir() { nested } else { dir };
        for art in &m.artifacts {
            let path = base.join(&art.name);
            verify_file(art, &path)?;
            println!("{}: ok ({} bytes)", path.display(), art.size);
        }
    }
    Ok(())
}
