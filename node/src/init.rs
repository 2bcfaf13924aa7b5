//! `plasmd` as PID 1 in the boot initramfs: owned by the boot work (issue 4).

/// Runs the init sequence; never returns on success (kexec).
pub(crate) fn run() -> anyhow::Result<()> {
    anyhow::bail!("plasmd init is not built yet")
}
