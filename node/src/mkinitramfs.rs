//! `plasmd mkinitramfs`: the boot initramfs, a gzip'd cpio newc archive with
//! a static `plasmd` as `/init`, the kernel modules virtio networking needs
//! (numbered in dependency order, read from each module's own `depends=`),
//! busybox-static for `udhcpc`, and the udhcpc script.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use phase_boot::cpio;

use crate::init::net::{BUSYBOX, UDHCPC_SCRIPT};

/// Arguments of `plasmd mkinitramfs`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where to write the gzip'd initramfs.
    #[arg(long, short)]
    out: PathBuf,
    /// The target kernel's module tree (`/lib/modules/VERSION`); without it no modules are packed.
    #[arg(long)]
    kernel_modules: Option<PathBuf>,
    /// Modules to pack (with their dependencies), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "virtio_pci,virtio_net")]
    modules: Vec<String>,
    /// A static plasmd for /init (default: this binary, if it is static).
    #[arg(long)]
    plasmd: Option<PathBuf>,
    /// A static busybox providing udhcpc.
    #[arg(long, default_value = "/bin/busybox")]
    udhcpc: PathBuf,
}

/// busybox udhcpc calls this with `$1` = deconfig|bound|renew|... and the
/// lease in the environment.
const SCRIPT: &str = r#"#!/bin/busybox sh
case "$1" in
deconfig) /bin/busybox ifconfig "$interface" 0.0.0.0 up ;;
bound|renew)
  /bin/busybox ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
  for r in $router; do /bin/busybox route add default gw "$r" dev "$interface"; break; done
  echo "ip=$ip router=${router%% *} subnet=$subnet" > /run/phase-lease ;;
esac
exit 0
"#;

/// Whether an ELF file has no program interpreter (statically linked).
fn elf_is_static(b: &[u8]) -> anyhow::Result<bool> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16le = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16le(54), u16le(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let t = b.get(o..o + 4).context("program header out of range")?;
        if u32::from_le_bytes(t.try_into()?) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

fn read_static(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let b = std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    if !elf_is_static(&b).with_context(|| format!("{what} {}", path.display()))? {
        bail!(
            "{what} {} is dynamically linked; /init needs a static binary \
             (cargo build --profile initramfs --target x86_64-unknown-linux-musl -p plasmd)",
            path.display()
        );
    }
    Ok(b)
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// `depends=` from a module's `.modinfo` strings.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let mut i = 0;
    while let Some(pos) = ko[i..].windows(key.len()).position(|w| w == key) {
        let at = i + pos;
        if at == 0 || ko[at - 1] == 0 {
            let rest = &ko[at + key.len()..];
            let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
            return String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(norm)
                .collect();
        }
        i = at + 1;
    }
    Vec::new()
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = name.strip_suffix(".ko") {
                out.insert(norm(stem), p.clone());
            } else if [".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .any(|s| name.ends_with(s))
            {
                let stem = name.split(".ko").next().unwrap_or(name);
                out.entry(norm(stem)).or_insert(p.clone());
            }
        }
    }
    Ok(())
}

/// The wanted modules and their dependencies, dependencies first.
fn resolve_modules(tree: &Path, wanted: &[String]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut index = BTreeMap::new();
    index_modules(&tree.join("kernel"), &mut index)?;
    let builtin: HashSet<String> = std::fs::read_to_string(tree.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(norm)
        .collect();
    let mut order = Vec::new();
    let mut done = HashSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &HashSet<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> anyhow::Result<()> {
        if done.contains(name) || builtin.contains(name) {
            return Ok(());
        }
        if depth > 32 {
            bail!("module dependencies nest too deeply at {name}");
        }
        let Some(path) = index.get(name) else {
            bail!("module {name} not found (and not built in)");
        };
        if path.extension().is_none_or(|x| x != "ko") {
            bail!(
                "{} is compressed; finit_module needs plain .ko files: decompress the tree first",
                path.display()
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, builtin, done, order, depth + 1)?;
        }
        done.insert(name.to_owned());
        order.push((name.to_owned(), bytes));
        Ok(())
    }
    for w in wanted {
        visit(&norm(w), &index, &builtin, &mut done, &mut order, 0)?;
    }
    Ok(order)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let plasmd_path = match &args.plasmd {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this binary")?,
    };
    let plasmd = read_static(&plasmd_path, "plasmd")?;
    let busybox = read_static(&args.udhcpc, "busybox (udhcpc)")?;
    let modules = match &args.kernel_modules {
        Some(tree) => resolve_modules(tree, &args.modules)?,
        None => Vec::new(),
    };

    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::best());
    let mut w = cpio::Writer::new(gz);
    for d in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "run",
        "tmp",
    ] {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, &plasmd)?;
    w.file(BUSYBOX, 0o755, &busybox)?;
    w.symlink("bin/sh", "busybox")?;
    w.file(UDHCPC_SCRIPT, 0o755, SCRIPT.as_bytes())?;
    for (i, (name, bytes)) in modules.iter().enumerate() {
        w.file(&format!("lib/modules/{i:02}-{name}.ko"), 0o644, bytes)?;
    }
    let raw = w.written();
    let mut buf = w.finish()?.finish()?;
    buf.flush()?;
    let size = std::fs::metadata(&args.out)?.len();
    let names: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "wrote {} ({size} bytes gzip, {raw} bytes cpio); modules: {}",
        args.out.display(),
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(" ")
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_modinfo_depends() {
        let ko =
            b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring,net-failover\0vermagic=6.1\0";
        assert_eq!(
            module_depends(ko),
            ["virtio", "virtio_ring", "net_failover"]
        );
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }

    #[test]
    fn resolves_debian_virtio_net_in_dependency_order() {
        let Some(tree) = std::fs::read_dir("/lib/modules").ok().and_then(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.join("kernel/drivers/net/virtio_net.ko").exists())
        }) else {
            eprintln!("SKIP: no Debian kernel modules with virtio_net.ko installed");
            return;
        };
        let order =
            resolve_modules(&tree, &["virtio_pci".into(), "virtio_net".into()]).expect("resolve");
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap_or(usize::MAX);
        assert!(pos("virtio_ring") < pos("virtio_pci"), "{names:?}");
        assert!(pos("failover") < pos("net_failover"), "{names:?}");
        assert!(pos("net_failover") < pos("virtio_net"), "{names:?}");
        assert_eq!(names.last(), Some(&"virtio_net"));
    }

    #[test]
    fn static_check() {
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        // The test binary is built for the host; either answer is fine, but it must parse.
        elf_is_static(&me).expect("parses our own ELF");
        assert!(elf_is_static(b"#!/bin/sh").is_err());
    }
}
