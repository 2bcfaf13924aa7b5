//! `vms`: N QEMU guests boot through the swarm on one bridge, and a table
//! says how long each took and where its bytes came from.
//!
//! ```text
//! cargo run --release -p simulations --bin vms -- --vms 4 [--arch aarch64] [--stop-seed] [--json FILE]
//! ```
//!
//! The first guest boots from the host's seed (`plasmd serve` with default
//! flags in the namespace) and kexecs into the target, whose init is `plasmd`
//! serving the carried store; then the others boot, with the seed still there
//! or (`--stop-seed`) gone. Needs root, QEMU for the guest architecture,
//! dnsmasq and a guest kernel: the Debian cloud kernel (x86_64) or the arm64
//! one that `scripts/vm-arm64-kernel.sh` unpacks (aarch64).
//! Everything it creates is removed at the end, on error and on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use simulations::cleanup;
use simulations::proc::Proc;
use simulations::vmnet::{self, Arch, GuestSpec, Net};

/// Boot N VMs through the swarm on one bridge and tabulate the result.
#[derive(Debug, Parser)]
#[command(name = "vms")]
struct Args {
    /// Number of guests.
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// Guest architecture: x86_64 or aarch64 (`-M virt`, kexec_load + DTB).
    #[arg(long, default_value = "x86_64", value_parser = parse_arch)]
    arch: Arch,
    /// Stop the seed once the first guest's target is up.
    #[arg(long)]
    stop_seed: bool,
    /// `phase.linger=SECONDS` for every guest's first stage.
    #[arg(long)]
    linger: Option<u64>,
    /// Guests booting at once after the first (TCG on a small machine).
    #[arg(long, default_value_t = 3)]
    parallel: usize,
    /// QEMU accelerator. KVM only where a guest was shown to run under it
    /// (a nested KVM without vmx hangs guests).
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// Per-guest limit, seconds, for the target's marker.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Write the table as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The host plasmd (default: next to this binary, built if missing).
    #[arg(long)]
    plasmd: Option<PathBuf>,
    /// Power off guests 2..N once their target is up (VM1 keeps serving), so
    /// at most `1 + parallel` guests run at once on a small machine.
    #[arg(long)]
    retire: bool,
    /// Echo every guest's console on stderr.
    #[arg(long)]
    echo: bool,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    Arch::from_name(s).ok_or_else(|| format!("unknown architecture {s:?}: use x86_64 or aarch64"))
}

fn exe_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("exe has a directory")?.to_owned())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

fn host_plasmd(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let dir = exe_dir()?;
    let p = dir.join("plasmd");
    eprintln!("vms: building the host plasmd (cargo build --release -p plasmd)");
    let target = dir.parent().context("target dir")?;
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace())
        .args(["build", "--release", "--locked", "-p", "plasmd"])
        .env("CARGO_TARGET_DIR", target)
        .status()?;
    if !status.success() || !p.is_file() {
        bail!("could not build plasmd; pass --plasmd PATH");
    }
    Ok(p)
}

fn stop(mut c: Proc) {
    c.kill();
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.vms == 0 {
        bail!("--vms must be at least 1");
    }
    if !vmnet::is_root() {
        bail!("vms needs root (network namespaces, taps); run it with sudo");
    }
    for p in [a.arch.qemu(), "dnsmasq", "ip"] {
        if !vmnet::have(p) {
            bail!(
                "{p} is not installed (apt install qemu-system-x86 qemu-system-arm dnsmasq-base \
                 iproute2)"
            );
        }
    }
    let target = exe_dir()?.parent().context("target dir")?.to_owned();
    let (kernel, modules) =
        vmnet::kernel(a.arch, &target).with_context(|| a.arch.kernel_hint().to_owned())?;
    let busybox = vmnet::busybox(a.arch, &target).with_context(|| {
        format!(
            "no static busybox for {} (x86_64: apt install busybox-static; aarch64: \
             scripts/vm-arm64-kernel.sh)",
            a.arch.name()
        )
    })?;
    cleanup::install_signal_handler();
    let r = run(&a, &kernel, &modules, &busybox, &target);
    cleanup::run_all();
    r
}

fn run(
    a: &Args,
    kernel: &Path,
    modules: &Path,
    busybox: &Path,
    target: &Path,
) -> anyhow::Result<()> {
    let plasmd = host_plasmd(a.plasmd.clone())?;
    let guest_bin = vmnet::static_plasmd(a.arch, &workspace(), target)?;
    let tag = std::process::id().to_string();
    let dir = std::env::temp_dir().join(format!("plasmd-vms-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let _rm = RemoveDir(dir.clone());
    let initrd = dir.join("boot.cpio.gz");
    let size = vmnet::boot_initramfs(&plasmd, &guest_bin, modules, busybox, &initrd)?;
    eprintln!("vms: boot initramfs {size} bytes (also the target initramfs)");
    let token = format!("vms{tag}");
    vmnet::write_artifacts(&dir.join("artifacts"), a.arch, kernel, &initrd, &token)?;

    let net = Net::create(&tag, a.vms)?;
    cleanup::register_ns(&net.ns);
    let dhcp = vmnet::start_dhcp(&net, &dir)?;
    let seed = vmnet::start_seed(&net, &plasmd, &dir.join("artifacts"), &dir.join("state"))?;
    let mut seed_proc = Some(seed.proc);
    eprintln!(
        "vms: seed {} key {} in namespace {}",
        seed.url, seed.pubkey, net.ns
    );

    let extra = a
        .linger
        .map(|s| format!("phase.linger={s}"))
        .unwrap_or_default();
    let spec = |i: usize| GuestSpec {
        name: format!("vm{}", i + 1),
        arch: a.arch,
        kernel: kernel.to_owned(),
        initrd: initrd.clone(),
        append: vmnet::guest_cmdline(a.arch, &seed.url, &seed.pubkey, &extra),
        tap: i,
        accel: a.accel.clone(),
        echo: a.echo,
    };
    let limit = Duration::from_secs(a.timeout);
    let t0 = Instant::now();
    let mut guests: Vec<(Duration, Proc)> = Vec::new();
    let first = vmnet::start_guest(&net, &spec(0))?;
    first.expect(limit, "SAW KEXEC=Y", |l| l.contains("SAW KEXEC=Y"))?;
    eprintln!(
        "vms: vm1 target up after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    guests.push((Duration::ZERO, first));
    let seed_stopped_at = if a.stop_seed {
        if let Some(s) = seed_proc.take() {
            stop(s);
        }
        eprintln!("vms: seed stopped");
        Some(t0.elapsed())
    } else {
        None
    };

    let mut next = 1;
    let mut booting: Vec<usize> = Vec::new();
    while next < a.vms || !booting.is_empty() {
        while next < a.vms && booting.len() < a.parallel.max(1) {
            let g = vmnet::start_guest(&net, &spec(next))?;
            guests.push((t0.elapsed(), g));
            booting.push(guests.len() - 1);
            next += 1;
        }
        // Wait for the oldest booting guest's marker (or its failure).
        let i = booting.remove(0);
        let (_, g) = &mut guests[i];
        g.expect(limit, "SAW KEXEC=Y", |l| l.contains("SAW KEXEC=Y"))?;
        eprintln!("vms: {} target up", g.name());
        if a.retire {
            g.kill();
        }
    }
    let total = t0.elapsed();

    let rows: Vec<(Duration, vmnet::Row)> =
        guests.iter().map(|(s, g)| (*s, vmnet::row(g))).collect();
    println!(
        "\n{:<5} {:>8} {:>12} {:>10} {:>9} {:>8} {:>10} {:>10} {:>16} {:>7}",
        "vm",
        "start_s",
        "verified_s",
        "seed_MB",
        "seed_p2p",
        "http_MB",
        "peers_MB",
        "marker_s",
        "kexec",
        "banned"
    );
    let (mut seed_b, mut peer_b) = (0u64, 0u64);
    for (start, r) in &rows {
        seed_b += r.seed_bytes;
        peer_b += r.peer_bytes;
        println!(
            "{:<5} {:>8.1} {:>12} {:>10.2} {:>9.2} {:>8.2} {:>10.2} {:>10} {:>16} {:>7}",
            r.name,
            start.as_secs_f64(),
            secs(r.fetched),
            r.seed_bytes as f64 / 1e6,
            r.seed_swarm_bytes as f64 / 1e6,
            r.http_bytes as f64 / 1e6,
            r.peer_bytes as f64 / 1e6,
            secs(r.marker),
            r.kexec_path.as_deref().unwrap_or("-"),
            r.banned.len()
        );
    }
    println!(
        "(start_s from vm1's start; verified_s and marker_s from each VM's own QEMU start; \
         MB verified, duplicates included; seed_MB = seed_p2p (its swarm node) + http_MB \
         (its HTTP rescue))"
    );
    // The seed runs with default flags: VM1's bytes should come over libp2p,
    // and a run that fell back to HTTP says so instead of looking healthy.
    let vm1_p2p = rows.first().map(|(_, r)| {
        let all = r.seed_bytes + r.peer_bytes;
        r.seed_swarm_bytes as f64 / all.max(1) as f64
    });
    if let Some(f) = vm1_p2p {
        println!(
            "vm1: {:.1} % of its bytes from the seed's swarm node{}",
            f * 100.0,
            if f < 0.9 {
                " (below 90 %: the seed's libp2p addresses were not reachable, HTTP rescued)"
            } else {
                ""
            }
        );
    }
    let share = seed_b as f64 / ((seed_b + peer_b).max(1)) as f64;
    println!(
        "seed share {:.1} % ({seed_b} of {} bytes); first start to last marker {:.1} s; seed {}",
        share * 100.0,
        seed_b + peer_b,
        total.as_secs_f64(),
        seed_stopped_at.map_or("present throughout".to_owned(), |t| format!(
            "stopped at {:.1} s",
            t.as_secs_f64()
        ))
    );
    if let Some(path) = &a.json {
        let vms: Vec<serde_json::Value> = rows
            .iter()
            .map(|(start, r)| {
                serde_json::json!({
                    "vm": r.name,
                    "start_s": start.as_secs_f64(),
                    "verified_s": r.fetched.map(|d| d.as_secs_f64()),
                    "marker_s": r.marker.map(|d| d.as_secs_f64()),
                    "seed_bytes": r.seed_bytes,
                    "seed_swarm_bytes": r.seed_swarm_bytes,
                    "http_bytes": r.http_bytes,
                    "kexec_path": r.kexec_path,
                    "peer_bytes": r.peer_bytes,
                    "banned": r.banned,
                    "peer_id": r.serving_peer,
                })
            })
            .collect();
        let obj = serde_json::json!({
            "vms": vms,
            "seed_share": share,
            "first_start_to_last_marker_s": total.as_secs_f64(),
            "seed_stopped_at_s": seed_stopped_at.map(|d| d.as_secs_f64()),
            "accel": a.accel,
            "arch": a.arch.name(),
            "vm1_seed_swarm_share": vm1_p2p,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&obj)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for (_, g) in guests {
        stop(g);
    }
    if let Some(s) = seed_proc {
        stop(s);
    }
    stop(dhcp);
    let ns = net.ns.clone();
    drop(net);
    cleanup::forget_ns(&ns);
    Ok(())
}

/// Removes the run's scratch directory on drop.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
