//! `plasmd mkinitramfs`: owned by the boot work (issue 4).

/// Arguments of `plasmd mkinitramfs`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("plasmd mkinitramfs is not built yet")
}
