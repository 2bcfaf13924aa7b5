//! Real kexec in real QEMU (TCG): a guest boots our initramfs with `plasmd`
//! as PID 1, fetches a signed kernel + initramfs from `plasmd serve` on the
//! host's loopback (reachable only through one `guestfwd` rule, user
//! networking with `restrict=on`), verifies them and kexecs; the target's
//! init prints `SAW KEXEC=Y token=...` with a token from its own cmdline.
//!
//! Run: `cargo test --release --test vm_kexec`. A test whose QEMU is missing
//! skips loudly, or fails under CI (`CI=true`); a missing guest kernel or
//! busybox always fails, naming what to install.

use std::time::{Duration, Instant};

use phase_tests::vm::{self, Arch};
use phase_tests::{Proc, Seed};

/// Generous: TCG on a busy 2-core machine, two kernel boots.
const BOOT: Duration = Duration::from_secs(240);

struct Setup {
    _dir: tempfile::TempDir,
    seed: Seed,
    kernel: std::path::PathBuf,
    initramfs: std::path::PathBuf,
    token: String,
}

/// The seed and guest pieces; the guest's `plasmd` has test knobs when
/// `knobs` (only a test that passes a `phase.test_*` knob asks for them).
fn setup(arch: Arch, knobs: bool) -> Option<Setup> {
    if !vm::require_qemu(arch) {
        return None;
    }
    // QEMU present but no guest kernel is a setup error, not a skip.
    let (kernel, modules) = vm::kernel(arch).unwrap_or_else(|| {
        panic!(
            "no {} guest kernel: x86_64 needs linux-image-cloud-amd64 installed; aarch64 needs \
             scripts/vm-arm64-kernel.sh run with the same CARGO_TARGET_DIR \
             (or set PHASE_VM_KERNEL_<ARCH> and PHASE_VM_MODULES_<ARCH>)",
            arch.name()
        )
    });
    Some(setup_with(arch, kernel, modules, knobs))
}

/// Publishes `kernel` plus the marker initramfs and starts the seed.
fn setup_with(
    arch: Arch,
    kernel: std::path::PathBuf,
    modules: std::path::PathBuf,
    knobs: bool,
) -> Setup {
    assert!(
        vm::busybox(arch).is_some(),
        "no static busybox for {} (busybox-static; aarch64: scripts/vm-arm64-kernel.sh)",
        arch.name()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let initramfs = dir.path().join("boot.cpio.gz");
    let size = vm::boot_initramfs(arch, &initramfs, &modules, knobs);
    eprintln!("boot initramfs: {size} bytes compressed");

    // Fresh per run, so a stale console or cached artifact cannot match.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let token = format!("tok{:x}{}", nanos as u64, std::process::id());
    let adir = dir.path().join("artifacts");
    let a = adir.join("stable").join(arch.name());
    std::fs::create_dir_all(&a).expect("mkdir");
    std::fs::copy(&kernel, a.join("kernel")).expect("copy kernel");
    std::fs::write(a.join("initramfs"), vm::marker_initramfs(arch)).expect("write initramfs");
    std::fs::write(
        a.join("cmdline"),
        format!(
            "console={} loglevel=4 panic=-1 token={token}\n",
            arch.console()
        ),
    )
    .expect("write cmdline");
    let seed = Seed::start(&adir, &dir.path().join("state"), &[]);
    Setup {
        _dir: dir,
        seed,
        kernel,
        initramfs,
        token,
    }
}

fn boot(arch: Arch, s: &Setup, extra: &str) -> Proc {
    let append = format!(
        "console={} loglevel=4 panic=-1 phase.provider=http://10.0.2.100:80 phase.pubkey={} \
         phase.arch={} {extra}",
        arch.console(),
        s.seed.pubkey,
        arch.name()
    );
    vm::start(
        arch,
        &s.kernel,
        &s.initramfs,
        &append,
        vm::port_of(&s.seed.url),
    )
}

fn phase(guest: &Proc, started: Instant, needle: &str) -> String {
    let line = guest.wait_for(BOOT, |l| l.contains(needle) || l.contains("Kernel panic"));
    assert!(
        !line.contains("Kernel panic"),
        "kernel panic:\n{}",
        guest.output()
    );
    eprintln!(
        "[{:>6.1}s] {}",
        started.elapsed().as_secs_f64(),
        line.trim_end()
    );
    line.text
}

fn kexec_boots_target(arch: Arch, want_path: &str) {
    let Some(s) = setup(arch, false) else { return };
    boots_target(arch, &s, want_path);
}

fn boots_target(arch: Arch, s: &Setup, want_path: &str) {
    boots_target_with(arch, s, want_path, "");
}

fn boots_target_with(arch: Arch, s: &Setup, want_path: &str, extra: &str) -> Proc {
    let started = Instant::now();
    let guest = boot(arch, s, extra);
    phase(&guest, started, "plasmd: phase cmdline ok");
    phase(&guest, started, "plasmd: phase modules loaded");
    let net = phase(&guest, started, "plasmd: phase network up");
    assert!(net.contains("ip=10.0.2."), "{net}");
    phase(&guest, started, "plasmd: phase manifest ok sequence=");
    phase(&guest, started, "plasmd: phase fetched");
    let path = phase(&guest, started, "plasmd: phase kexec path=");
    assert!(path.contains(&format!("path={want_path} ")), "{path}");
    let marker = phase(&guest, started, "SAW KEXEC=Y");
    assert!(
        marker.contains(&format!("SAW KEXEC=Y token={}", s.token)),
        "marker without our token: {marker}\n{}",
        guest.output()
    );
    eprintln!(
        "{}: QEMU start to target marker {:.1}s via {want_path}",
        arch.name(),
        started.elapsed().as_secs_f64()
    );
    // PID 1's timeline beside the QEMU-relative time each line arrived.
    let steps: Vec<(String, f64)> = guest
        .lines()
        .iter()
        .filter_map(|l| {
            let step = l.split("plasmd: phase timeline step=").nth(1)?;
            let step = step.split_whitespace().next()?.to_owned();
            Some((step, l.at.as_secs_f64()))
        })
        .collect();
    for (step, at) in &steps {
        eprintln!("{}: timeline {step:<13} qemu={at:.2}s", arch.name());
    }
    // First occurrences: a retried attempt repeats its own steps.
    let mut names: Vec<&str> = Vec::new();
    for (s, _) in &steps {
        if !names.contains(&s.as_str()) {
            names.push(s);
        }
    }
    assert_eq!(
        names,
        [
            "start",
            "modules",
            "network",
            "node",
            "manifest",
            "first-chunk",
            "last-chunk",
            "carry",
            "kexec-loaded"
        ],
        "every milestone on the console timeline, in order:\n{}",
        guest.output()
    );
    guest
}

#[test]
fn x86_64_kexec_load_first_boots_the_fetched_kernel() {
    // A BIOS-booted guest without lockdown takes kexec_load first: our
    // bzImage planner, zero page and trampoline boot the target, with no
    // in-kernel digest and no purgatory (DESIGN.md decision 5).
    let Some(s) = setup(Arch::X86_64, false) else {
        return;
    };
    let guest = boots_target_with(Arch::X86_64, &s, "kexec_load", "");
    let out = guest.output();
    assert!(
        out.contains("plasmd: phase kexec path=kexec_load reason=preferred on a BIOS-booted"),
        "{out}"
    );
}

#[test]
fn x86_64_kexec_file_load_boots_the_fetched_kernel() {
    // The test knob answers kexec_load with ENOSYS, so the kernel's own
    // file interface (and its purgatory) boots the target.
    let Some(s) = setup(Arch::X86_64, true) else {
        return;
    };
    let guest = boots_target_with(
        Arch::X86_64,
        &s,
        "kexec_file_load",
        "phase.test_force_kexec_file_load=1",
    );
    let out = guest.output();
    assert!(
        out.contains("plasmd: test knob: kexec_load answered ENOSYS without calling it"),
        "{out}"
    );
    assert!(
        out.contains("plasmd: phase kexec path=kexec_file_load reason=kexec_load failed: "),
        "{out}"
    );
}

#[test]
fn x86_64_kexec_disabled_is_diagnosed_without_panic() {
    let Some(s) = setup(Arch::X86_64, true) else {
        return;
    };
    let started = Instant::now();
    let guest = boot(Arch::X86_64, &s, "phase.test_disable_kexec=1");
    phase(
        &guest,
        started,
        "plasmd: test knob: set kernel.kexec_load_disabled=1",
    );
    phase(&guest, started, "plasmd: phase fetched");
    phase(
        &guest,
        started,
        "plasmd: phase kexec preflight kexec_load_disabled=1",
    );
    let failed = phase(&guest, started, "plasmd: phase kexec failed");
    assert!(
        failed.contains("kernel.kexec_load_disabled=1") && failed.contains("reboot"),
        "diagnosis names cause and remedy: {failed}"
    );
    // Init reports that it stays up instead of exiting (which would panic).
    phase(&guest, started, "plasmd: phase stopped");
    let out = guest.output();
    assert!(!out.contains("Kernel panic"), "{out}");
    assert!(!out.contains("SAW KEXEC=Y"), "{out}");
    assert!(!out.contains("phase kexec path="), "{out}");
}

#[test]
fn x86_64_a_guest_without_test_knobs_ignores_them_and_boots() {
    // The guest's plasmd is built as a user's initramfs has it: the knobs
    // that would stop (or divert) the kexec are ignored, one line each.
    let Some(s) = setup(Arch::X86_64, false) else {
        return;
    };
    let guest = boots_target_with(
        Arch::X86_64,
        &s,
        "kexec_load",
        "phase.test_disable_kexec=1 phase.test_force_kexec_load=1 \
         phase.test_force_kexec_file_load=1",
    );
    let out = guest.output();
    for knob in [
        "test_disable_kexec",
        "test_force_kexec_load",
        "test_force_kexec_file_load",
    ] {
        let line = format!("plasmd: ignoring phase.{knob}: this build has no test knobs");
        assert_eq!(out.matches(&line).count(), 1, "{line}:\n{out}");
    }
    assert!(!out.contains("plasmd: test knob"), "{out}");
}

/// The `sequence` inside the signed manifest the seed serves for `arch`.
fn served_sequence(s: &Setup, arch: Arch) -> u64 {
    let url = format!("{}/stable/{}/manifest.json", s.seed.url, arch.name());
    let body = ureq::get(&url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_vec()
        .expect("manifest body");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
    v["manifest"]["sequence"]
        .as_u64()
        .unwrap_or_else(|| panic!("no sequence in {url}: {v}"))
}

#[test]
fn x86_64_pid1_refuses_a_manifest_older_than_phase_min_sequence() {
    let Some(s) = setup(Arch::X86_64, false) else {
        return;
    };
    let n = served_sequence(&s, Arch::X86_64);
    let floor = n + 1;
    let started = Instant::now();
    let guest = boot(Arch::X86_64, &s, &format!("phase.min_sequence={floor}"));
    phase(&guest, started, "plasmd: phase network up");
    let want =
        format!("refusing the stable/x86_64 manifest sequence {n} from http://10.0.2.100:80");
    let why = format!("older than sequence {floor} (phase.min_sequence={floor})");
    for attempt in ["first", "retried"] {
        let line = phase(&guest, started, "plasmd: phase refused older manifest");
        assert!(
            line.contains(&want) && line.contains(&why),
            "{attempt} refusal names both sequences ({want} ... {why}): {line}"
        );
    }
    // Two attempts refused it: nothing was fetched, loaded or booted.
    let out = guest.output();
    for never in [
        "plasmd: phase manifest ok",
        "plasmd: phase fetched",
        "step=kexec-loaded",
        "plasmd: phase kexec path=",
        "SAW KEXEC=Y",
    ] {
        assert!(
            !out.contains(never),
            "{never:?} after a refused manifest:\n{out}"
        );
    }
    eprintln!(
        "x86_64: refused sequence {n} below phase.min_sequence={floor} twice in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Dropping the guest stops QEMU by its process group.
}

#[test]
fn aarch64_kexec_load_with_dtb_and_trampoline_boots_the_fetched_kernel() {
    // Debian's arm64 kernel has no CONFIG_KEXEC_FILE: kexec_file_load is
    // ENOSYS and our kexec_load path must boot it.
    kexec_boots_target(Arch::Aarch64, "kexec_load");
}

#[test]
#[ignore = "needs an arm64 kernel with CONFIG_KEXEC_FILE: scripts/vm-arm64-kexec-file-kernel.sh builds one (minutes)"]
fn aarch64_kexec_file_load_boots_the_fetched_kernel() {
    if !vm::require_qemu(Arch::Aarch64) {
        return;
    }
    let (kernel, modules) = vm::arm64_kexec_file_kernel()
        .expect("run scripts/vm-arm64-kexec-file-kernel.sh with the same CARGO_TARGET_DIR first");
    let s = setup_with(Arch::Aarch64, kernel, modules, false);
    boots_target(Arch::Aarch64, &s, "kexec_file_load");
}
