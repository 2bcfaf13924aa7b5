//! `plasmd fetch`: owned by the swarm work (issue 3). Placeholder until it lands.

/// Arguments of `plasmd fetch`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("plasmd fetch is not built yet")
}
