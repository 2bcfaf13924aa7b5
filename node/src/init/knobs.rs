//! Test knobs: `phase.test_disable_kexec=1` (PID 1 sets the kernel's one-way
//! `kexec_load_disabled` latch), `phase.test_force_kexec_load=1`
//! (`kexec_file_load` answers ENOSYS so the `kexec_load` fallback runs),
//! `phase.test_force_kexec_file_load=1` (`kexec_load` answers ENOSYS, so an
//! x86_64 kernel that prefers it goes on to `kexec_file_load`) and
//! `phase.test_liar=1` (the booted node corrupts every chunk it serves).
//!
//! They act only in a `plasmd` built with the cargo feature `test-knobs`
//! (off by default; the QEMU tests that need a knob build their guest with
//! it). Any other build boots normally and prints one line per knob it was
//! given: `plasmd: ignoring phase.test_X: this build has no test knobs`.

use phase_boot::cmdline::{self, PhaseConfig};

/// Whether this build acts on test knobs.
pub(crate) const ENABLED: bool = cfg!(feature = "test-knobs");

/// The console line for a knob this build ignores.
fn ignored(name: &str) -> String {
    format!("plasmd: ignoring phase.{name}: this build has no test knobs")
}

/// Leaves the knobs in `cfg` as parsed in a build with test knobs; in any
/// other build switches them off and returns one console line for each one
/// that was set.
pub(crate) fn apply(cfg: &mut PhaseConfig) -> Vec<String> {
    let mut lines = Vec::new();
    if ENABLED {
        return lines;
    }
    for (name, on) in [
        ("test_disable_kexec", &mut cfg.test_disable_kexec),
        ("test_force_kexec_load", &mut cfg.test_force_kexec_load),
        (
            "test_force_kexec_file_load",
            &mut cfg.test_force_kexec_file_load,
        ),
    ] {
        if std::mem::take(on) {
            lines.push(ignored(name));
        }
    }
    lines
}

/// `phase.test_liar` in the carried parameters `raw`: whether to serve
/// corrupted chunks, and the console line if this build ignores the knob.
pub(crate) fn liar(raw: &str) -> (bool, Option<String>) {
    let set = cmdline::split(raw)
        .iter()
        .any(|p| p.key == "phase.test_liar" && matches!(p.value, Some("1") | None));
    if set && !ENABLED {
        return (false, Some(ignored("test_liar")));
    }
    (set, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &str = "console=ttyS0 phase.test_disable_kexec=1 phase.test-force-kexec-load \
                       phase.test_force_kexec_file_load=1";

    fn parsed(line: &str) -> PhaseConfig {
        PhaseConfig::parse(line).expect("parses").0
    }

    #[test]
    fn knobs_that_are_off_print_nothing_in_any_build() {
        let mut cfg = parsed("phase.test_disable_kexec=0 phase.test_force_kexec_load=n");
        assert!(apply(&mut cfg).is_empty());
        assert!(!cfg.test_disable_kexec && !cfg.test_force_kexec_load);
        assert_eq!(liar("phase.test_liar=0 phase.test_liarx=1"), (false, None));
        assert_eq!(liar(""), (false, None));
    }

    #[cfg(feature = "test-knobs")]
    #[test]
    fn a_build_with_test_knobs_acts_on_them() {
        let mut cfg = parsed(ALL);
        assert!(apply(&mut cfg).is_empty());
        assert!(cfg.test_disable_kexec && cfg.test_force_kexec_load);
        assert!(cfg.test_force_kexec_file_load);
        assert_eq!(liar("phase.pubkey=x phase.test_liar=1"), (true, None));
        assert_eq!(liar("phase.test_liar"), (true, None));
    }

    #[cfg(not(feature = "test-knobs"))]
    #[test]
    fn a_build_without_test_knobs_ignores_them_with_one_line_each() {
        let mut cfg = parsed(ALL);
        assert_eq!(
            apply(&mut cfg),
            [
                "plasmd: ignoring phase.test_disable_kexec: this build has no test knobs",
                "plasmd: ignoring phase.test_force_kexec_load: this build has no test knobs",
                "plasmd: ignoring phase.test_force_kexec_file_load: this build has no test knobs",
            ]
        );
        assert!(!cfg.test_disable_kexec && !cfg.test_force_kexec_load);
        assert!(!cfg.test_force_kexec_file_load);
        assert_eq!(
            liar("phase.pubkey=x phase.test_liar=1"),
            (
                false,
                Some("plasmd: ignoring phase.test_liar: this build has no test knobs".into())
            )
        );
        // A bad value must not stop a production boot either.
        let mut cfg = parsed("phase.test_force_kexec_load=maybe");
        assert_eq!(
            apply(&mut cfg),
            ["plasmd: ignoring phase.test_force_kexec_load: this build has no test knobs"]
        );
        assert!(!cfg.test_force_kexec_load);
    }
}
