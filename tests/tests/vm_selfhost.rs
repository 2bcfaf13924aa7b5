//! The self-hosting loop in real VMs (TCG) on one bridge: booted nodes serve
//! the next, with the seed gone (DESIGN.md decision 6, issue 5).
//!
//! Each test builds a namespace with a bridge, dnsmasq, the host's
//! `plasmd serve` with default flags (no `--bind`) and QEMU guests on taps,
//! and removes all of it on drop. The target initramfs is the boot initramfs itself: after
//! kexec its `plasmd` finds the carried store and serves it.
//!
//! Run: `cargo test --release --test vm_selfhost` (root). Skips loudly
//! without root, QEMU, dnsmasq or the guest kernel (the Debian cloud kernel;
//! for arm64 the one `scripts/vm-arm64-kernel.sh` unpacks); under CI
//! (`CI=true`) fails naming what is missing.

use std::time::{Duration, Instant};

use phase_tests::Proc;
use phase_tests::selfhost::{Lab, assert_mostly_seed_swarm, field, phase};
use phase_tests::vm::Arch;

/// The `SAW KEXEC=Y` line with our token.
fn marker(lab: &Lab, g: &Proc) -> Duration {
    let (t, line) = phase(g, "SAW KEXEC=Y");
    assert!(
        line.contains(&format!("SAW KEXEC=Y token={}", lab.token)),
        "{}: marker without our token: {line}",
        g.name()
    );
    t
}

/// (peer id, kind, bytes) of every source a guest fetched from.
fn sources(g: &Proc) -> Vec<(String, String, u64)> {
    phase_tests::selfhost::vmnet::sources(g)
}

/// The first stage's `phase kexec path=` line names `want` (Debian's arm64
/// kernels have no KEXEC_FILE, so arm64 must go through kexec_load + DTB +
/// trampoline).
fn kexec_path(g: &Proc, want: &str) {
    let (_, line) = phase(g, "plasmd: phase kexec path=");
    assert_eq!(
        field(&line, "path").as_deref(),
        Some(want),
        "{}: {line}",
        g.name()
    );
}

#[test]
fn three_vms_the_seed_leaves_and_two_boot_from_the_first() {
    three_vms(Arch::X86_64, "kexec_load");
}

#[test]
fn arm64_three_vms_the_seed_leaves_and_two_boot_from_the_first() {
    three_vms(Arch::Aarch64, "kexec_load");
}

/// VM1 boots from the seed (over its swarm node, not HTTP) and serves its
/// carried store; the seed stops; VM2 and VM3 boot from VM1 (and each other).
fn three_vms(arch: Arch, want_path: &str) {
    let Some(mut lab) = Lab::start_arch(arch, 3) else {
        return;
    };
    let t0 = Instant::now();
    let vm1 = lab.guest("vm1", 0, None, "");
    phase(&vm1, "plasmd: phase manifest ok sequence=");
    let (_, fetched) = phase(&vm1, "plasmd: phase fetched");
    assert_eq!(
        field(&fetched, "peer_bytes").as_deref(),
        Some("0"),
        "{fetched}"
    );
    let share = assert_mostly_seed_swarm(&vm1);
    kexec_path(&vm1, want_path);
    let (_, carried) = phase(&vm1, "plasmd: phase carried ok");
    assert!(carried.contains("chunks="), "{carried}");
    let (_, serving) = phase(&vm1, "plasmd: phase serving root=");
    let vm1_id = field(&serving, "peer").expect("peer id in the serving line");
    let t1 = marker(&lab, &vm1);
    // The target served at once: after its init started it fetched nothing.
    let out = vm1.output();
    let after = out.split("plasmd: phase serve start").nth(1).unwrap_or("");
    assert!(
        !after.contains("phase manifest ok") && !after.contains("phase fetched"),
        "the target fetched again:\n{out}"
    );

    lab.stop_seed();
    eprintln!(
        "seed stopped {:.1} s after vm1 started",
        t0.elapsed().as_secs_f64()
    );
    let t_rest = Instant::now();
    let others = [lab.guest("vm2", 1, None, ""), lab.guest("vm3", 2, None, "")];
    // VM2 and VM3 may also trade chunks with each other while fetching (that is
    // the swarm working); the seed must be absent from every source.
    let first_stage_ids: Vec<String> = others
        .iter()
        .map(|g| field(&phase(g, "plasmd: phase swarm node peer=").1, "peer").expect("peer id"))
        .collect();
    for g in &others {
        let (_, m) = phase(g, "plasmd: phase manifest ok sequence=");
        assert!(
            m.contains("via=swarm"),
            "{}: the manifest came from: {m}",
            g.name()
        );
        let (_, f) = phase(g, "plasmd: phase fetched");
        assert_eq!(
            field(&f, "seed_bytes").as_deref(),
            Some("0"),
            "{}: {f}",
            g.name()
        );
        kexec_path(g, want_path);
        marker(&lab, g);
        let src = sources(g);
        let from_vm1: u64 = src.iter().filter(|s| s.0 == vm1_id).map(|s| s.2).sum();
        assert!(
            from_vm1 > 0,
            "{}: nothing from vm1:\n{}",
            g.name(),
            g.output()
        );
        for (peer, kind, bytes) in &src {
            assert!(
                kind == "peer" && (peer == &vm1_id || first_stage_ids.contains(peer)),
                "{}: {bytes} bytes from {peer} ({kind}), neither vm1 ({vm1_id}) nor a booting VM",
                g.name()
            );
        }
    }
    eprintln!(
        "{}: vm1 target up {:.1} s after start ({:.1} % of its bytes from the seed's swarm \
         node); vm2 and vm3 up {:.1} s after the seed left; first start to last marker {:.1} s",
        arch.name(),
        t1.as_secs_f64(),
        share * 100.0,
        t_rest.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn a_wrong_pubkey_is_refused_and_never_kexecs() {
    let Some(lab) = Lab::start(1) else { return };
    let wrong = phase_content::SecretKey::from_seed([7; 32])
        .public()
        .to_string();
    assert_ne!(wrong, lab.pubkey);
    let g = lab.guest("wrongkey", 0, Some(&wrong), "");
    let (_, refused) = phase(&g, "plasmd: phase refused manifest from");
    assert!(
        refused.contains(&format!("pinned key {wrong}")) && refused.contains("refusing"),
        "{refused}"
    );
    // It asks the swarm too, finds nothing signed by that key, and retries:
    // the second refusal (`phase` waits past the first) is the proof that it
    // went on without booting anything.
    phase(&g, "plasmd: fetch failed");
    phase(&g, "plasmd: phase refused manifest from");
    let out = g.output();
    for never in ["phase fetched", "phase kexec", "SAW KEXEC=Y"] {
        assert!(
            !out.contains(never),
            "a refused manifest led to {never:?}:\n{out}"
        );
    }
}

#[test]
fn a_lying_peer_is_banned_and_the_victim_still_boots() {
    let Some(lab) = Lab::start(2) else { return };
    let liar = lab.guest("liar", 0, None, "phase.test_liar=1");
    phase(&liar, "plasmd: test knob: phase.test_liar=1");
    let (_, serving) = phase(&liar, "plasmd: phase serving root=");
    assert!(serving.contains("liar=1"), "{serving}");
    let liar_id = field(&serving, "peer").expect("peer id");
    let addrs = field(&serving, "addrs").expect("addrs");
    marker(&lab, &liar);

    // The victim dials the liar at start (phase.peers) and the seed; the
    // liar's chunks fail verification, it is banned, the seed supplies the rest.
    let victim = lab.guest("victim", 1, None, &format!("phase.peers={addrs}"));
    // The ban is reported before the fetch's summary line.
    let (_, banned) = phase(&victim, "plasmd: phase banned peer=");
    let (_, f) = phase(&victim, "plasmd: phase fetched");
    assert_eq!(
        field(&banned, "peer").as_deref(),
        Some(liar_id.as_str()),
        "{banned}"
    );
    assert!(field(&f, "banned").is_some_and(|b| b != "0"), "{f}");
    for (peer, _, bytes) in sources(&victim) {
        assert!(
            peer != liar_id || bytes == 0,
            "verified bytes from the liar: {bytes}"
        );
    }
    marker(&lab, &victim);
}
