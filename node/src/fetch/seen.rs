//! `plasmd fetch`'s memory of freshness: the highest manifest sequence it
//! accepted per (publisher key, channel, arch), one small file each in
//! `STATE/seen/` (the top-level DESIGN.md, decision 8). A later fetch refuses
//! anything older, whoever serves it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use phase_content::PublicKey;

use crate::files;

/// The high-water file of one (key, channel, arch).
pub(crate) struct Seen {
    path: PathBuf,
}

impl Seen {
    /// The file for `key`/`channel`/`arch` under `state` (creating
    /// `state/seen`, mode 0700). `@` cannot occur in a channel or arch, so
    /// names never collide.
    pub(crate) fn open(
        state: &Path,
        key: &PublicKey,
        channel: &str,
        arch: &str,
    ) -> anyhow::Result<Seen> {
        anyhow::ensure!(
            phase_content::valid_component(channel) && phase_content::valid_component(arch),
            "channel {channel:?} / arch {arch:?}: want plain names (letters, digits, . _ -)"
        );
        let dir = state.join("seen");
        files::private_dir(&dir)?;
        Ok(Seen {
            path: dir.join(format!("{key}@{channel}@{arch}")),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The highest sequence recorded, if any.
    pub(crate) fn get(&self) -> anyhow::Result<Option<u64>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", self.path.display()));
            }
        };
        let n = text.trim().parse::<u64>().with_context(|| {
            format!(
                "{} holds {:?}, not a sequence number: fix or remove it",
                self.path.display(),
                text.trim()
            )
        })?;
        Ok(Some(n))
    }

    /// Records `sequence` unless a higher one is there already.
    pub(crate) fn record(&self, sequence: u64) -> anyhow::Result<()> {
        if self.get()?.is_some_and(|s| s >= sequence) {
            return Ok(());
        }
        files::write_atomic(&self.path, format!("{sequence}\n").as_bytes(), 0o600)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_high_water_mark_only_rises_and_is_kept_per_key_channel_arch() {
        let t = tempfile::tempdir().unwrap();
        let k1 = phase_content::SecretKey::from_seed([1; 32]).public();
        let k2 = phase_content::SecretKey::from_seed([2; 32]).public();
        let s = Seen::open(t.path(), &k1, "stable", "x86_64").unwrap();
        assert_eq!(s.get().unwrap(), None);
        s.record(2).unwrap();
        s.record(1).unwrap();
        assert_eq!(s.get().unwrap(), Some(2), "never goes back");
        s.record(5).unwrap();
        // Reopened (a later run) it still knows.
        let again = Seen::open(t.path(), &k1, "stable", "x86_64").unwrap();
        assert_eq!(again.get().unwrap(), Some(5));
        for (k, ch, ar) in [
            (&k2, "stable", "x86_64"),
            (&k1, "beta", "x86_64"),
            (&k1, "stable", "aarch64"),
        ] {
            let o = Seen::open(t.path(), k, ch, ar).unwrap();
            assert_eq!(o.get().unwrap(), None, "{ch}/{ar}");
        }
        std::fs::write(s.path(), "junk").unwrap();
        let e = format!("{:#}", s.get().unwrap_err());
        assert!(e.contains("not a sequence number"), "{e}");
        assert!(Seen::open(t.path(), &k1, "../x", "x86_64").is_err());
    }
}
