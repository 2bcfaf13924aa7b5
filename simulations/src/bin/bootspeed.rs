//! `bootspeed`: QEMU start to the target kernel's marker, plasmd's init
//! against the classic busybox + wget + kexec-tools init, side by side.
//!
//! ```text
//! cargo build --release -p plasmd -p simulations && target/release/bootspeed [--runs 3]
//! ```
//!
//! Both inits boot the same guest kernel with the same QEMU flags (TCG, user
//! networking with `restrict=on` and one `guestfwd` to the host's loopback,
//! as `tests/tests/vm_kexec.rs`), fetch the same kernel, initramfs and
//! cmdline from one `plasmd serve` on 127.0.0.1, and kexec into the same
//! target, whose init prints `SAW KEXEC=Y token=...`. The baseline
//! initramfs is built here from Debian's busybox-static (`udhcpc`, `wget`)
//! and kexec-tools (`/usr/sbin/kexec` with the shared libraries `ldd`
//! names), with the same virtio modules as `plasmd mkinitramfs` packs. The
//! two boot alternately, `--runs` times each; the tool prints every run,
//! the medians, their ratio and plasmd's console timeline. A benchmark: it
//! prints figures and asserts none. Needs QEMU and a guest kernel (the
//! Debian cloud kernel for x86_64), not root.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use simulations::proc::Proc;
use simulations::vmnet::{self, Arch};

/// Boot plasmd's init and a busybox + wget + kexec-tools init alternately
/// and compare QEMU start to the target's marker.
#[derive(Debug, Parser)]
#[command(name = "bootspeed")]
struct Args {
    /// Boots of each init.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Guest architecture: x86_64, or aarch64 (the baseline then runs
    /// Debian's arm64 kexec-tools, which `scripts/vm-arm64-kernel.sh`
    /// unpacks with its libraries under TARGET/vm-arm64-kernel/kexec-sysroot).
    #[arg(long, default_value = "x86_64")]
    arch: String,
    /// The host `plasmd` (default: next to this binary).
    #[arg(long)]
    plasmd: Option<PathBuf>,
    /// kexec-tools' binary for the baseline (default: the host's
    /// /usr/sbin/kexec on x86_64, the unpacked arm64 one on aarch64).
    #[arg(long)]
    kexec: Option<PathBuf>,
    /// Where the baseline kexec's shared libraries are looked up (default:
    /// / on x86_64, the arm64 kexec sysroot on aarch64).
    #[arg(long)]
    kexec_root: Option<PathBuf>,
    /// How the baseline loads: `-s` (kexec_file_load) or empty for
    /// kexec_load (add `-i` to skip the purgatory's checks). Default: `-s`
    /// on x86_64 (issue 13's reference init), kexec_load on aarch64
    /// (Debian's arm64 kernel has no kexec_file_load).
    #[arg(long, allow_hyphen_values = true)]
    kexec_flags: Option<String>,
    /// Zero bytes the baseline appends to its initrd before kexec (rounded
    /// down to 64 KiB), standing in for plasmd's carried store in the kexec
    /// and target-boot path (the kernel's unpacker skips zeros between
    /// archives); 0 for the plain baseline.
    #[arg(long, default_value_t = 0)]
    baseline_pad: u64,
    /// Per boot, QEMU start to marker at most.
    #[arg(long, default_value_t = 240)]
    timeout_s: u64,
    /// Work directory (default: a fresh one under the system's temp dir).
    #[arg(long)]
    work: Option<PathBuf>,
}

/// Modules for virtio networking, as `plasmd mkinitramfs` packs them by default.
const WANTED_MODULES: [&str; 2] = ["virtio_pci", "virtio_net"];

const MARKER: &str = "SAW KEXEC=Y";

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("bootspeed: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let arch =
        Arch::from_name(&args.arch).with_context(|| format!("unknown arch {}", args.arch))?;
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(vmnet::have(arch.qemu()), "{} not on PATH", arch.qemu());
    let exe = std::env::current_exe().context("locating this binary")?;
    let bin_dir = exe.parent().context("binary directory")?.to_owned();
    let target_dir = bin_dir.parent().context("target directory")?.to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned();
    let plasmd = args
        .plasmd
        .clone()
        .unwrap_or_else(|| bin_dir.join("plasmd"));
    anyhow::ensure!(
        plasmd.is_file(),
        "no host plasmd at {} (cargo build --release -p plasmd, or --plasmd)",
        plasmd.display()
    );
    let (kernel, modules) = vmnet::kernel(arch, &target_dir).context(arch.kernel_hint())?;
    let busybox =
        vmnet::busybox(arch, &target_dir).context("no static busybox (busybox-static)")?;
    let sysroot = target_dir.join("vm-arm64-kernel/kexec-sysroot");
    let (kexec, kexec_root, kexec_flags) = match arch {
        Arch::X86_64 => (
            args.kexec
                .clone()
                .unwrap_or_else(|| "/usr/sbin/kexec".into()),
            args.kexec_root.clone().unwrap_or_else(|| "/".into()),
            args.kexec_flags.clone().unwrap_or_else(|| "-s".into()),
        ),
        Arch::Aarch64 => (
            args.kexec
                .clone()
                .unwrap_or_else(|| sysroot.join("sbin/kexec")),
            args.kexec_root.clone().unwrap_or_else(|| sysroot.clone()),
            args.kexec_flags.clone().unwrap_or_default(),
        ),
    };
    anyhow::ensure!(
        kexec.is_file(),
        "no {} ({})",
        kexec.display(),
        match arch {
            Arch::X86_64 => "apt install kexec-tools",
            Arch::Aarch64 => "run scripts/vm-arm64-kernel.sh with the same CARGO_TARGET_DIR",
        }
    );

    let _tmp;
    let work = match &args.work {
        Some(w) => w.clone(),
        None => {
            _tmp = TempDir::new()?;
            _tmp.0.clone()
        }
    };
    std::fs::create_dir_all(&work)?;

    eprintln!("bootspeed: building the guest's static plasmd");
    let guest = vmnet::static_plasmd(arch, &workspace, &target_dir)?;
    let plasmd_initrd = work.join("plasmd.cpio.gz");
    vmnet::boot_initramfs(&plasmd, &guest, &modules, &busybox, &plasmd_initrd)?;
    let base_initrd = work.join("baseline.cpio.gz");
    baseline_initramfs(
        &base_initrd,
        arch,
        &busybox,
        &modules,
        &BaselineKexec {
            bin: kexec.clone(),
            root: kexec_root,
            flags: kexec_flags.clone(),
        },
        args.baseline_pad / 65536,
    )?;

    // The artifacts both inits fetch, and the seed.
    let token = format!("bs{}", std::process::id());
    let marker = work.join("marker-initramfs");
    std::fs::write(&marker, vmnet::marker_initramfs(&busybox)?)?;
    vmnet::write_artifacts(&work.join("artifacts"), arch, &kernel, &marker, &token)?;
    let (seed, url, pubkey) = start_seed(&plasmd, &work)?;
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {url}"))?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!(
        "bootspeed: {} kernel {} ({} bytes), target initramfs {} bytes; boot initramfs: plasmd {} bytes, \
         baseline {} bytes (gzip); kexec flags {:?}; baseline pad {} bytes; {} runs each",
        arch.name(),
        kernel.display(),
        size(&kernel),
        size(&marker),
        size(&plasmd_initrd),
        size(&base_initrd),
        kexec_flags,
        args.baseline_pad / 65536 * 65536,
        args.runs
    );

    let base_append = format!("console={} loglevel=4 panic=-1", arch.console());
    let plasmd_append = vmnet::guest_cmdline(arch, "http://10.0.2.100:80", &pubkey, "");
    let timeout = Duration::from_secs(args.timeout_s);
    let mut base_t = Vec::new();
    let mut ours_t = Vec::new();
    let mut timelines: Vec<BTreeMap<String, f64>> = Vec::new();
    for r in 1..=args.runs {
        let b = boot(
            arch,
            &kernel,
            &base_initrd,
            &base_append,
            port,
            &token,
            timeout,
        )
        .with_context(|| format!("baseline boot {r}"))?;
        let o = boot(
            arch,
            &kernel,
            &plasmd_initrd,
            &plasmd_append,
            port,
            &token,
            timeout,
        )
        .with_context(|| format!("plasmd boot {r}"))?;
        for (who, lines) in [("baseline", &b.1), ("plasmd", &o.1)] {
            let text: String = lines
                .iter()
                .map(|l| format!("[{:7.3}] {}\n", l.at.as_secs_f64(), l.text))
                .collect();
            let path = work.join(format!("console-{who}-{r}.log"));
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let tl = timeline(&o.1);
        let show = |tl: &[(String, f64)]| {
            tl.iter()
                .map(|(s, t)| format!("{s}={t:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "run {r}: baseline {:.2} s, plasmd {:.2} s, ratio {:.2}; baseline steps (QEMU s): {}; \
             plasmd timeline (QEMU s): {}",
            b.0,
            o.0,
            o.0 / b.0,
            show(&baseline_steps(&b.1)),
            show(&tl)
        );
        base_t.push(b.0);
        ours_t.push(o.0);
        timelines.push(tl.into_iter().collect());
    }
    let (mb, mo) = (median(&base_t), median(&ours_t));
    println!(
        "median over {} runs: baseline {mb:.2} s, plasmd {mo:.2} s, ratio {:.2} (target 1.10)",
        args.runs,
        mo / mb
    );
    let mut steps: Vec<String> = Vec::new();
    for tl in &timelines {
        for s in tl.keys() {
            if !steps.contains(s) {
                steps.push(s.clone());
            }
        }
    }
    steps.sort_by(|a, b| {
        let m = |s: &str| {
            median(
                &timelines
                    .iter()
                    .filter_map(|t| t.get(s).copied())
                    .collect::<Vec<_>>(),
            )
        };
        m(a).total_cmp(&m(b))
    });
    let med: Vec<String> = steps
        .iter()
        .map(|s| {
            let v: Vec<f64> = timelines.iter().filter_map(|t| t.get(s).copied()).collect();
            format!("{s}={:.2}", median(&v))
        })
        .collect();
    println!(
        "median plasmd timeline (QEMU s): {} marker={mo:.2}",
        med.join(" ")
    );
    drop(seed);
    Ok(())
}

/// Boots one guest; returns seconds from QEMU start to the marker and the
/// console lines.
fn boot(
    arch: Arch,
    kernel: &Path,
    initrd: &Path,
    append: &str,
    port: u16,
    token: &str,
    timeout: Duration,
) -> anyhow::Result<(f64, Vec<simulations::proc::Line>)> {
    let g = vmnet::start_user_net(arch, kernel, initrd, append, port)?;
    let want = format!("{MARKER} token={token}");
    let line = g
        .try_wait_for(timeout, |l| l.contains(&want) || l.contains("Kernel panic"))
        .with_context(|| {
            format!(
                "no marker within {} s; console:\n{}",
                timeout.as_secs(),
                g.output()
            )
        })?;
    if line.contains("Kernel panic") {
        bail!("kernel panic; console:\n{}", g.output());
    }
    Ok((line.at.as_secs_f64(), g.lines()))
}

/// `plasmd: phase timeline step=NAME ...` lines: first time each step was
/// seen (QEMU seconds), in console order.
fn timeline(lines: &[simulations::proc::Line]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for l in lines {
        let step = if l.contains("plasmd: phase entropy ready") {
            "entropy"
        } else if l.contains("plasmd: phase verified kernel=") {
            // Reassembled and carried, before the kexec syscall.
            "verified"
        } else {
            let Some(rest) = l.split("plasmd: phase timeline step=").nth(1) else {
                continue;
            };
            let Some(step) = rest.split_whitespace().next() else {
                continue;
            };
            step
        };
        if !out.iter().any(|(s, _)| s == step) {
            out.push((step.to_owned(), l.at.as_secs_f64()));
        }
    }
    out
}

/// The baseline init's own `baseline: WHAT` lines (QEMU seconds).
fn baseline_steps(lines: &[simulations::proc::Line]) -> Vec<(String, f64)> {
    lines
        .iter()
        .filter_map(|l| {
            let what = l.split("baseline: ").nth(1)?;
            Some((what.trim().replace(' ', "-"), l.at.as_secs_f64()))
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// `plasmd serve` on 127.0.0.1 (mDNS off): the process, its URL, its key.
fn start_seed(plasmd: &Path, work: &Path) -> anyhow::Result<(Proc, String, String)> {
    let mut c = Command::new(plasmd);
    c.env("PLASMD_MDNS", "0")
        .arg("serve")
        .arg("-a")
        .arg(work.join("artifacts"))
        .args(["-p", "0", "--bind", "127.0.0.1", "--state"])
        .arg(work.join("state"));
    let p = Proc::spawn("plasmd serve", c)?;
    let word = |l: &str, m: &str| {
        l.split(m)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned)
    };
    let wait = Duration::from_secs(120);
    let k = p.expect(wait, "public key", |l| l.contains("public key "))?;
    let pubkey = word(&k, "public key ").context("key in the seed's banner")?;
    let u = p.expect(wait, "serving http://", |l| l.contains("serving http://"))?;
    let url = word(&u, "serving ").context("URL in the seed's banner")?;
    Ok((p, url, pubkey))
}

/// The baseline: busybox as shell, `udhcpc` and `wget`, kexec-tools with
/// its shared libraries, the same virtio modules, and an `/init` that
/// does what a classic netboot script does.
/// The baseline's kexec-tools: the binary, where its shared libraries are
/// found, and its load flags.
struct BaselineKexec {
    bin: PathBuf,
    root: PathBuf,
    flags: String,
}

fn baseline_initramfs(
    out: &Path,
    arch: Arch,
    busybox: &Path,
    modules: &Path,
    kexec: &BaselineKexec,
    pad_blocks: u64,
) -> anyhow::Result<()> {
    let pad = if pad_blocks > 0 {
        format!(
            "$B dd if=/dev/zero bs=65536 count={pad_blocks} 2>/dev/null >> /tmp/initramfs\n\
             echo \"baseline: padded\"\n"
        )
    } else {
        String::new()
    };
    let url = format!("http://10.0.2.100:80/stable/{}", arch.name());
    let flags = &kexec.flags;
    let init = format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
echo "baseline: start"
for m in /lib/modules/*.ko; do $B insmod "$m"; done
echo "baseline: modules"
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do $B usleep 50000; i=$((i+1)); done
$B udhcpc -f -q -n -t 5 -T 2 -i eth0 -s /etc/udhcpc.script || echo "baseline: dhcp failed"
echo "baseline: network up"
$B wget -q -O /tmp/kernel {url}/kernel || echo "baseline: wget kernel failed"
$B wget -q -O /tmp/initramfs {url}/initramfs || echo "baseline: wget initramfs failed"
$B wget -q -O /tmp/cmdline {url}/cmdline || echo "baseline: wget cmdline failed"
echo "baseline: fetched"
{pad}/sbin/kexec {flags} -l /tmp/kernel --initrd=/tmp/initramfs --command-line="$($B cat /tmp/cmdline)" || echo "baseline: kexec load failed"
echo "baseline: kexec loaded"
/sbin/kexec -e
echo "baseline: kexec -e failed"
while true; do $B sleep 1000; done
"#
    );
    let script = "#!/bin/busybox sh\n\
        case \"$1\" in\n\
        deconfig) /bin/busybox ifconfig \"$interface\" 0.0.0.0 up ;;\n\
        bound|renew)\n\
          /bin/busybox ifconfig \"$interface\" \"$ip\" netmask \"${subnet:-255.255.255.0}\" up\n\
          for r in $router; do /bin/busybox route add default gw \"$r\" dev \"$interface\"; break; done ;;\n\
        esac\n\
        exit 0\n";
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::best());
    let mut w = phase_boot::cpio::Writer::new(gz);
    let mut dirs: Vec<String> = [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "run",
        "tmp",
        "sbin",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let libs = shared_libs(&kexec.bin, &kexec.root, arch)?;
    for (_, rel) in &libs {
        let mut p = Path::new(rel).parent();
        let mut chain = Vec::new();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            chain.push(d.to_string_lossy().into_owned());
            p = d.parent();
        }
        for d in chain.into_iter().rev() {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    for d in &dirs {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, init.as_bytes())?;
    w.file("bin/busybox", 0o755, &std::fs::read(busybox)?)?;
    w.symlink("bin/sh", "busybox")?;
    w.file("etc/udhcpc.script", 0o755, script.as_bytes())?;
    w.file("sbin/kexec", 0o755, &std::fs::read(&kexec.bin)?)?;
    for (l, rel) in &libs {
        let bytes = std::fs::read(l).with_context(|| format!("reading {}", l.display()))?;
        w.file(rel, 0o755, &bytes)?;
    }
    for (i, (name, path)) in resolve_modules(modules, &WANTED_MODULES)?
        .iter()
        .enumerate()
    {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        w.file(&format!("lib/modules/{i:02}-{name}.ko"), 0o644, &bytes)?;
    }
    let mut buf = w.finish()?.finish()?;
    buf.flush()?;
    Ok(())
}

/// The shared libraries `bin` loads, its interpreter first, each as (the
/// file under `root`, its path in the guest relative to `/`): the ELF
/// interpreter and the `NEEDED` entries as `readelf` prints them (binutils'
/// readelf reads any architecture, unlike `ldd`), followed through each
/// library's own, looked up in `root`'s multiarch and plain library
/// directories as the guest's loader will.
fn shared_libs(bin: &Path, root: &Path, arch: Arch) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let readelf = |flag: &str, file: &Path| -> anyhow::Result<String> {
        let o = Command::new("readelf")
            .args([flag, "-W"])
            .arg(file)
            .output()
            .context("running readelf (binutils)")?;
        anyhow::ensure!(
            o.status.success(),
            "readelf {flag} {}: {}",
            file.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let bracketed = |line: &str, key: &str| -> Option<String> {
        let rest = &line[line.find(key)? + key.len()..];
        Some(rest[..rest.find(']')?].trim().to_owned())
    };
    let multiarch = match arch {
        Arch::X86_64 => "x86_64-linux-gnu",
        Arch::Aarch64 => "aarch64-linux-gnu",
    };
    let dirs = [
        format!("lib/{multiarch}"),
        format!("usr/lib/{multiarch}"),
        "lib".to_owned(),
        "usr/lib".to_owned(),
    ];
    let mut out: Vec<(PathBuf, String)> = Vec::new();
    let interp = readelf("-l", bin)?
        .lines()
        .find_map(|l| bracketed(l, "Requesting program interpreter:"));
    let Some(interp) = interp else {
        // A static kexec needs none.
        return Ok(out);
    };
    let rel = interp.trim_start_matches('/').to_owned();
    out.push((root.join(&rel), rel));
    let mut todo = vec![bin.to_owned()];
    let mut seen = HashSet::new();
    while let Some(file) = todo.pop() {
        for name in readelf("-d", &file)?
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| bracketed(l, "Shared library: ["))
        {
            if !seen.insert(name.clone()) {
                continue;
            }
            let rel = dirs
                .iter()
                .map(|d| format!("{d}/{name}"))
                .find(|rel| root.join(rel).is_file())
                .with_context(|| {
                    format!(
                        "{} needs {name}, which is in none of {} under {}",
                        file.display(),
                        dirs.join(", "),
                        root.display()
                    )
                })?;
            let host = root.join(&rel);
            todo.push(host.clone());
            out.push((host, rel));
        }
    }
    Ok(out)
}

/// `wanted` and their dependencies (each module's `depends=`), in load
/// order, from the module tree.
fn resolve_modules(tree: &Path, wanted: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                index.insert(n.replace('-', "_"), p);
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut HashSet<String>,
        out: &mut Vec<(String, PathBuf)>,
    ) -> anyhow::Result<()> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        // Not in the tree: built into the kernel.
        let Some(p) = index.get(name) else {
            return Ok(());
        };
        let bytes = std::fs::read(p)?;
        for dep in depends(&bytes) {
            visit(&dep, index, seen, out)?;
        }
        out.push((name.to_owned(), p.clone()));
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// A module's `depends=` list from its modinfo section.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("bootspeed-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
