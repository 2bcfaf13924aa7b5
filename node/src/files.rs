//! Files `plasmd` writes and secrets it reads, done one safe way: state
//! directories are created 0700, every file is written to a fresh temp file
//! beside its final name (created with `O_CREAT|O_EXCL|O_NOFOLLOW`, a random
//! suffix, so a planted file or symlink is never opened or followed) and
//! renamed into place, and a key file that others can read is refused.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Creates `dir` (and missing parents) with mode 0700 where it creates them.
pub(crate) fn private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .with_context(|| format!("creating directory {}", dir.display()))
}

/// A name no other writer guesses: the process id, a counter and the
/// standard library's per-process random hash keys.
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("{}.{n}.{:016x}", std::process::id(), h.finish())
}

/// Opens a new file at `path`: fails if anything (a file, a symlink) is there.
pub(crate) fn create_new(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW).mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    o.open(path)
}

/// The temp name `write_atomic` uses for `path`: `.NAME.SUFFIX.tmp` beside it.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", random_suffix()))
}

/// Writes `data` to `path` atomically: a new temp file beside it
/// (`O_EXCL|O_NOFOLLOW`, `mode`), synced, then renamed over `path`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = temp_beside(path);
    let r = (|| -> anyhow::Result<()> {
        let mut f =
            create_new(&tmp, mode).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
        Ok(())
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Refuses a secret key file that its group or others can read or write.
pub(crate) fn check_private(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("reading key file {}", path.display()))?
            .permissions()
            .mode();
        anyhow::ensure!(
            mode & 0o077 == 0,
            "key file {} is accessible by group or others (mode {:03o}): refusing it; \
             run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Reads the publisher's secret key after [`check_private`].
pub(crate) fn read_secret_key(path: &Path) -> anyhow::Result<phase_content::SecretKey> {
    check_private(path)?;
    Ok(phase_content::SecretKey::read(path)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("seen");
        write_atomic(&p, b"1\n", 0o600).unwrap();
        write_atomic(&p, b"2\n", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2\n");
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the file itself remains");
    }

    #[cfg(unix)]
    #[test]
    fn create_new_never_follows_or_reuses_a_planted_symlink() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = create_new(&link, 0o600).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        // A dangling symlink is refused as well (O_EXCL does not create its target).
        let dangling = t.path().join("dangling");
        std::os::unix::fs::symlink(t.path().join("nowhere"), &dangling).unwrap();
        assert!(create_new(&dangling, 0o600).is_err());
        assert!(!t.path().join("nowhere").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("publisher.key");
        phase_content::SecretKey::from_seed([4; 32])
            .write_new(&p)
            .unwrap();
        assert!(read_secret_key(&p).is_ok(), "0600 as written is fine");
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = format!("{:#}", read_secret_key(&p).unwrap_err());
            assert!(
                e.contains("chmod 600") && e.contains(&format!("{mode:03o}")),
                "{e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn private_dir_is_0700() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        private_dir(&d).unwrap();
        for p in [t.path().join("a"), d] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", p.display());
        }
    }
}
