//! `plasmd` as PID 1 in the boot initramfs: mount, load the network modules,
//! DHCP, read `phase.*` from `/proc/cmdline`, fetch and verify the target
//! through the swarm (`first_stage`, on the same [`crate::fetch::Fetcher`] as
//! `plasmd fetch`), linger if asked, append the carried store to the target's
//! initramfs (`carry`) and kexec into it. A system booted that way finds the
//! carried store at start and serves it instead (`serve`). Mounts, modules
//! and DHCP are in `net`.
//!
//! Every step prints one `plasmd: phase ...` line on the console; tests
//! assert them, so keep the prefixes stable. A failed fetch is retried with
//! capped back-off; a kexec refusal is printed once with its remedy. Init
//! never exits (that would panic the kernel): `main` parks after an error.
//!
//! Run by hand (`plasmd init`, not PID 1) it touches nothing on the host: no
//! mounts, modules or network, and the kexec is a dry run.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use phase_boot::cmdline::{self, PhaseConfig};
use phase_boot::kexec::{self, Arch, Kexec, LoadContext, Preflight};
use phase_content::{MemStore, SignedManifest};

mod carry;
mod first_stage;
mod knobs;
pub(crate) mod net;
mod serve;

/// The longest wait between fetch attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// When PID 1 started: the origin of the console timeline.
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Prints one `plasmd: phase timeline` line: `step`, seconds since PID 1
/// started, and the kernel's uptime (so times can be compared with the
/// kernel's and the host's clocks).
pub(crate) fn timeline(step: &str) {
    let t = STARTED.get_or_init(Instant::now).elapsed();
    let uptime = std::fs::read_to_string("/proc/uptime").ok();
    println!("{}", timeline_line(step, t, uptime.as_deref()));
}

/// The timeline line for `step` at `t`, with the first field of `/proc/uptime`.
fn timeline_line(step: &str, t: Duration, uptime: Option<&str>) -> String {
    let up = uptime
        .and_then(|u| u.split_whitespace().next())
        .unwrap_or("unknown");
    format!(
        "plasmd: phase timeline step={step} t={:.2} uptime={up}",
        t.as_secs_f64()
    )
}

fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Runs the init sequence; never returns on success (kexec).
pub(crate) fn run() -> anyhow::Result<()> {
    let r = run_inner();
    if let Err(e) = &r {
        println!(
            "plasmd: phase stopped: {e:#}; init stays up (PID 1 must not exit): fix the cause and reboot"
        );
    }
    r
}

fn run_inner() -> anyhow::Result<()> {
    if serve::selected() {
        // A system booted by plasmd, holding the carried store: serve it.
        return serve::run();
    }
    STARTED.get_or_init(Instant::now);
    println!(
        "plasmd: phase init start version={}",
        env!("CARGO_PKG_VERSION")
    );
    let real = is_pid1();
    if real {
        net::mount_basics();
    } else {
        println!("plasmd: not PID 1: no mounts, modules or network; kexec is a dry run");
    }
    timeline("start");
    if real {
        warm_entropy();
    }
    let (raw, mut cfg, warnings) = cmdline::read(Path::new("/proc/cmdline"))
        .context("reading the phase.* parameters from /proc/cmdline")?;
    for w in &warnings {
        println!("plasmd: warning: {w}");
    }
    for line in knobs::apply(&mut cfg) {
        println!("{line}");
    }
    let provider = cfg.provider.clone().context(
        "no phase.provider=URL on the kernel command line: add one (e.g. phase.provider=http://10.0.2.2:8080)",
    )?;
    let pubkey = cfg.pubkey.context(
        "no phase.pubkey=HEX on the kernel command line: add the publisher key `plasmd serve` prints",
    )?;
    println!(
        "plasmd: phase cmdline ok provider={provider} channel={} arch={} mode={} warnings={}",
        cfg.channel,
        cfg.arch,
        cfg.mode,
        warnings.len()
    );
    tracing::debug!(cmdline = %raw, "kernel command line");

    #[cfg(feature = "test-knobs")]
    if cfg.test_disable_kexec {
        set_kexec_load_disabled(real)?;
    }

    if real {
        let n = net::load_modules(Path::new("/lib/modules"))?;
        println!("plasmd: phase modules loaded count={n}");
        timeline("modules");
        let mut backoff = Duration::from_secs(1);
        loop {
            match net::dhcp() {
                Ok(lease) => {
                    println!(
                        "plasmd: phase network up iface={} ip={} router={}",
                        lease.iface, lease.ip, lease.router
                    );
                    timeline("network");
                    break;
                }
                Err(e) => {
                    println!("plasmd: network failed: {e:#}; retrying in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    let ready = first_stage::first_stage(&raw, &cfg, Some(&provider), pubkey)?;

    match boot(
        &cfg,
        &ready.fetch.manifest,
        &ready.fetch.store,
        Some(ready.initrd),
        real,
    ) {
        Ok(()) => Ok(()),
        Err(e) => {
            println!("plasmd: phase kexec failed: {e:#}");
            Err(e)
        }
    }
}

/// The test knob `phase.test_disable_kexec=1`: flip the kernel's one-way
/// latch so the test sees the real refusal.
#[cfg(feature = "test-knobs")]
fn set_kexec_load_disabled(real: bool) -> anyhow::Result<()> {
    if !real {
        println!("plasmd: test knob phase.test_disable_kexec ignored (not PID 1)");
        return Ok(());
    }
    std::fs::write("/proc/sys/kernel/kexec_load_disabled", "1")
        .context("writing 1 to /proc/sys/kernel/kexec_load_disabled")?;
    println!("plasmd: test knob: set kernel.kexec_load_disabled=1");
    Ok(())
}

/// Starts the kernel's random pool filling while modules load and DHCP runs.
///
/// The swarm node's identity and noise keys need `getrandom`, which blocks
/// until the kernel's CRNG is ready; in a VM without a hardware RNG that
/// happens only once some caller blocks on it (the kernel then gathers
/// timing jitter, about 1.5 s under TCG). Blocking in a thread of its own
/// from the start overlaps that wait with the network setup instead of
/// adding it after; no randomness is weakened.
fn warm_entropy() {
    let spawned = std::thread::Builder::new()
        .name("entropy".into())
        .spawn(|| {
            let mut b = [0u8; 1];
            // SAFETY: b is valid for 1 byte; flags 0 blocks until the CRNG is ready.
            let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, 0) };
            if got == 1 {
                let t = STARTED.get().map(Instant::elapsed).unwrap_or_default();
                let up = std::fs::read_to_string("/proc/uptime").ok();
                let up = up
                    .as_deref()
                    .and_then(|u| u.split_whitespace().next())
                    .unwrap_or("unknown");
                println!(
                    "plasmd: phase entropy ready t={:.2} uptime={up}",
                    t.as_secs_f64()
                );
            }
        });
    if let Err(e) = spawned {
        println!("plasmd: warning: no thread to warm the kernel's random pool: {e}");
    }
}

/// The artifact `name` written from `store` into a memfd, chunk by chunk
/// (`phase_content::write_chunks`): `kexec_file_load` gets the memfd as it is, and
/// no whole-artifact buffer is built on the way.
fn artifact_memfd(
    manifest: &SignedManifest,
    store: &MemStore,
    name: &str,
) -> anyhow::Result<Option<std::fs::File>> {
    let Some(a) = manifest.manifest().artifact(name) else {
        return Ok(None);
    };
    let mut fd = kexec::memfd(name).with_context(|| format!("a memfd for {name}"))?;
    phase_content::write_chunks(store, a, &mut fd).with_context(|| format!("writing {name}"))?;
    Ok(Some(fd))
}

fn entropy(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    // SAFETY: buf is valid for n bytes.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), n, 0) };
    if got != n as isize {
        println!("plasmd: warning: no entropy for kaslr-seed; using zero");
        buf.fill(0);
    }
    buf
}

fn boot(
    cfg: &PhaseConfig,
    manifest: &SignedManifest,
    store: &MemStore,
    carrying: Option<std::fs::File>,
    real: bool,
) -> anyhow::Result<()> {
    let kernel = artifact_memfd(manifest, store, "kernel")?
        .context("the manifest has no kernel artifact")?;
    // With the carried store the target boots holding what it booted from
    // (the top-level DESIGN.md, decision 6); `carry::target_initrd` built it.
    let initrd = match carrying {
        Some(i) => Some(i),
        None => artifact_memfd(manifest, store, "initramfs")?,
    };
    let kernel = kexec::Payload::file(&kernel)?;
    let initrd = initrd.as_ref().map(kexec::Payload::file).transpose()?;
    let cmdline = manifest.manifest().cmdline.clone().unwrap_or_default();
    println!(
        "plasmd: phase verified kernel={} initramfs={} cmdline={cmdline:?}",
        kernel.len(),
        initrd.map_or(0, |i| i.len())
    );
    let arch = match cfg.arch.as_str() {
        "x86_64" => Arch::X86_64,
        "aarch64" | "arm64" => Arch::Aarch64,
        other => anyhow::bail!("cannot kexec a {other} target"),
    };
    if Arch::current() != Some(arch) {
        anyhow::bail!(
            "phase.arch={} but this machine runs {}",
            cfg.arch,
            std::env::consts::ARCH
        );
    }
    let preflight = Preflight::read();
    println!(
        "plasmd: phase kexec preflight kexec_load_disabled={} lockdown={}",
        preflight
            .load_disabled
            .map_or("absent".into(), |d| u8::from(d).to_string()),
        preflight.lockdown.as_deref().unwrap_or("absent")
    );
    let (fdt, iomem) = if arch == Arch::Aarch64 {
        (
            std::fs::read("/sys/firmware/fdt").unwrap_or_default(),
            std::fs::read_to_string("/proc/iomem").unwrap_or_default(),
        )
    } else {
        (Vec::new(), String::new())
    };
    let memory = kexec::parse_iomem(&iomem);
    let memmap = if arch == Arch::X86_64 {
        kexec::read_memmap(Path::new("/sys/firmware/memmap")).unwrap_or_else(|e| {
            println!("plasmd: warning: no firmware memory map for kexec_load: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let seed = if arch == Arch::Aarch64 {
        entropy(8 + 64)
    } else {
        Vec::new()
    };
    let ctx = LoadContext {
        arch,
        preflight: &preflight,
        arm64: (arch == Arch::Aarch64 && !fdt.is_empty()).then_some(kexec::Arm64Inputs {
            dtb: &fdt,
            memory: &memory,
            entropy: &seed,
        }),
        x86_64: (arch == Arch::X86_64 && !memmap.is_empty())
            .then_some(kexec::X86Inputs { memmap: &memmap }),
    };
    let mut k: Box<dyn Kexec> = if real {
        Box::new(kexec::Syscalls::new()?)
    } else {
        Box::new(kexec::DryRun::default())
    };
    #[cfg(feature = "test-knobs")]
    let loaded = if cfg.test_force_kexec_load {
        println!("plasmd: test knob: kexec_file_load answered ENOSYS without calling it");
        let mut forced = kexec::ForceKexecLoad(k.as_mut());
        kexec::load_payloads(&mut forced, &ctx, kernel, initrd, &cmdline)?
    } else if cfg.test_force_kexec_file_load {
        println!("plasmd: test knob: kexec_load answered ENOSYS without calling it");
        let mut forced = kexec::ForceKexecFileLoad(k.as_mut());
        kexec::load_payloads(&mut forced, &ctx, kernel, initrd, &cmdline)?
    } else {
        kexec::load_payloads(k.as_mut(), &ctx, kernel, initrd, &cmdline)?
    };
    // `knobs::apply` switched the knob off in this build.
    #[cfg(not(feature = "test-knobs"))]
    let loaded = kexec::load_payloads(k.as_mut(), &ctx, kernel, initrd, &cmdline)?;
    println!(
        "plasmd: phase kexec path={} reason={}",
        loaded.path, loaded.reason
    );
    timeline("kexec-loaded");
    if !real {
        println!("plasmd: dry run: not executing");
        return Ok(());
    }
    println!("plasmd: phase kexec exec");
    Err(k.exec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_line_names_step_time_and_uptime() {
        assert_eq!(
            timeline_line("network", Duration::from_millis(2614), Some("3.71 2.90\n")),
            "plasmd: phase timeline step=network t=2.61 uptime=3.71"
        );
        assert_eq!(
            timeline_line("start", Duration::ZERO, None),
            "plasmd: phase timeline step=start t=0.00 uptime=unknown"
        );
    }
}
