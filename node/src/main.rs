//! `plasmd`: the Phase swarm boot daemon and command line.
//!
//! A thin layer over the libraries: `phase-content` (chunks, manifests,
//! signatures), `phase-swarm` (libp2p) and `phase-boot` (cmdline, kexec,
//! initramfs). Run as PID 1 it is the init of the boot initramfs.

#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// PID 1 and the initramfs builder are Linux by nature (mounts, modules,
// kexec, a Linux cpio); elsewhere the stand-ins below keep the CLI the same
// and say so in one line, and the parts of `fetch` only PID 1 uses lie idle.
#[cfg_attr(not(target_os = "linux"), allow(dead_code, unused_imports))]
mod fetch;
mod files;
mod http_limits;
#[cfg(target_os = "linux")]
mod init;
mod keys;
mod metrics;
#[cfg(target_os = "linux")]
mod mkinitramfs;
mod serve;
mod swarm_serve;
mod verify;

#[cfg(not(target_os = "linux"))]
fn linux_only(what: &str, instead: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} and runs only on Linux (this is {}): {instead}",
        std::env::consts::OS
    )
}

#[cfg(not(target_os = "linux"))]
mod mkinitramfs {
    /// Arguments of `plasmd mkinitramfs`: none are read off Linux.
    #[derive(Debug, clap::Args)]
    #[command(disable_help_flag = true)]
    pub(crate) struct Args {
        // Whatever Linux would accept, so the answer is the one line below.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        _rest: Vec<std::ffi::OsString>,
    }

    pub(crate) fn run(_: Args) -> anyhow::Result<()> {
        Err(crate::linux_only(
            "mkinitramfs builds a Linux initramfs",
            "run it on a Linux machine or in a Linux container",
        ))
    }
}

#[cfg(not(target_os = "linux"))]
mod init {
    pub(crate) fn run() -> anyhow::Result<()> {
        Err(crate::linux_only(
            "init is PID 1 of the Linux boot initramfs (it mounts, loads modules and kexecs)",
            "boot a machine with the initramfs `plasmd mkinitramfs` builds on Linux",
        ))
    }
}

/// Network boot as a peer-to-peer swarm.
#[derive(Debug, Parser)]
#[command(name = "plasmd", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a publisher key; prints the public key.
    Keygen(keys::KeygenArgs),
    /// Chunk and sign DIR/CHANNEL/ARCH/{kernel,initramfs[,cmdline][,dtb]} into a store.
    Publish(keys::PublishArgs),
    /// Publish a directory and seed it: HTTP plus the swarm.
    Serve(serve::Args),
    /// Check a signed manifest, and optionally artifact files against it.
    Verify(verify::Args),
    /// Fetch a channel/arch from the swarm, verify it and write the artifacts.
    Fetch(Box<fetch::Args>),
    /// Build the boot initramfs with plasmd as /init.
    Mkinitramfs(mkinitramfs::Args),
    /// Run the boot sequence as if PID 1 (for tests; PID 1 does this by itself).
    #[command(hide = true)]
    Init,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // Our own events at info; libp2p and the rest only when something is wrong.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,plasmd=info,phase_swarm=info,phase_content=info,phase_boot=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The default state directory: `$PLASMD_STATE`, else `$XDG_STATE_HOME/plasmd`,
/// else `~/.local/state/plasmd`.
pub(crate) fn default_state_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PLASMD_STATE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(p).join("plasmd");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/plasmd"),
        None => PathBuf::from("/var/lib/plasmd"),
    }
}

/// The HTTP seed's runtime (`plasmd serve`): a worker per core, for many
/// clients at once.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A swarm node's runtime (`plasmd fetch`, init's fetch and its serving):
/// one worker thread. The node is one event loop plus a task per
/// connection; with a worker per core they woke each other across threads
/// for every chunk (`perf stat` over a 16-node storm: 245,000 context
/// switches against aria2c's 86,000). Side by side (`storm --plasmd`, 3
/// interleaved runs each, the seed unchanged): at N = 16 4.3 CPU-s against
/// 4.8 (medians), at N = 32 76-77 % CPU against 81-85 %, the times within
/// the runs' spread. Not tokio's current-thread runtime, which measured the
/// same but runs tasks only while the main thread is in `block_on`: init
/// keeps its node serving while the main thread prepares the kexec.
pub(crate) fn node_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        // As init there is nobody to return to: init::run never exits.
        init_tracing();
        if let Err(e) = init::run() {
            eprintln!("plasmd init: {e:#}");
        }
        loop {
            std::thread::park();
        }
    }
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Keygen(a) => keys::keygen(a),
        Command::Publish(a) => keys::publish(a),
        Command::Verify(a) => verify::run(a),
        Command::Mkinitramfs(a) => mkinitramfs::run(a),
        Command::Init => init::run(),
        Command::Serve(a) => runtime().and_then(|rt| rt.block_on(serve::run(a))),
        Command::Fetch(a) => node_runtime().and_then(|rt| rt.block_on(fetch::run(*a))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plasmd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
