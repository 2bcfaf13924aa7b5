//! `plasmd serve`, `publish`, `keygen` and `verify` as a user runs them: real
//! processes, a plain HTTP client on loopback, and the tamper cases.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use phase_content::{PublicKey, SignedManifest};
use phase_tests::{Seed, make_artifacts, plasmd, pseudo_random, require};

const T: Duration = Duration::from_secs(60);

fn agent() -> ureq::Agent {
    phase_tests::http_agent(T)
}

fn get(url: &str) -> (u16, Vec<u8>) {
    phase_tests::http_get(url, T)
}

/// Runs plasmd with args; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(plasmd())
        .args(args)
        .output()
        .expect("run plasmd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn wget_style_boot_fetches_exact_bytes() {
    let t = tempfile::tempdir().expect("tempdir");
    let arch = std::env::consts::ARCH;
    let dir = make_artifacts(t.path(), "stable", arch, 1_500_000, 300_001);
    fs::write(
        dir.join("stable").join(arch).join("cmdline"),
        "console=ttyS0 quiet\n",
    )
    .expect("cmdline");
    let seed = Seed::start(&dir, &t.path().join("state"), &["--chunk-size", "65536"]);
    let pinned: PublicKey = seed.pubkey.parse().expect("banner key");

    // What a shell+wget init does: the manifest, then the artifact URLs.
    let (status, envelope) = get(&format!("{}/manifest.json", seed.url));
    assert_eq!(status, 200);
    let m = SignedManifest::verify(&envelope, &pinned).expect("manifest verifies with banner key");
    assert_eq!(m.manifest().channel, "stable");
    assert_eq!(m.manifest().arch, arch);
    assert_eq!(m.manifest().cmdline.as_deref(), Some("console=ttyS0 quiet"));
    for name in ["kernel", "initramfs"] {
        let (status, body) = get(&format!("{}/stable/{arch}/{name}", seed.url));
        assert_eq!(status, 200, "{name}");
        let want = fs::read(dir.join("stable").join(arch).join(name)).expect("read");
        assert!(
            body == want,
            "{name}: served bytes differ from the published file"
        );
        // Every chunk the manifest lists is served by hash.
        let art = m.manifest().artifact(name).expect("artifact in manifest");
        let (st, c) = get(&format!("{}/chunks/{}", seed.url, art.chunks[1]));
        assert_eq!(st, 200);
        assert_eq!(&c[..], &want[65536..131072]);
    }
    let (status, cmdline) = get(&format!("{}/stable/{arch}/cmdline", seed.url));
    assert_eq!((status, cmdline), (200, b"console=ttyS0 quiet\n".to_vec()));
    let (status, same) = get(&format!("{}/stable/{arch}/manifest.json", seed.url));
    assert_eq!((status, &same), (200, &envelope));
    let (status, _) = get(&format!(
        "{}/manifest.json?channel=beta&arch={arch}",
        seed.url
    ));
    assert_eq!(status, 404);
    let (status, _) = get(&format!("{}/chunks/{}", seed.url, "ab".repeat(32)));
    assert_eq!(status, 404);
    let (status, _) = get(&format!("{}/chunks/nothex", seed.url));
    assert_eq!(status, 400);
}

/// The prototype's shell init: busybox wget fetches `/manifest.json`, finds
/// the kernel and initramfs by their absolute URLs in it, and wgets them.
/// The URLs sit outside the signed bytes; the bytes fetched are exact.
#[test]
fn a_busybox_wget_init_finds_artifacts_by_url_in_the_manifest() {
    let busybox = Path::new("/bin/busybox");
    if !require(
        busybox.is_file(),
        "busybox at /bin/busybox (Debian's busybox-static)",
    ) {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let arch = std::env::consts::ARCH;
    let dir = make_artifacts(t.path(), "stable", arch, 700_000, 90_001);
    let seed = Seed::start(&dir, &t.path().join("state"), &[]);
    let work = t.path().join("init");
    fs::create_dir_all(&work).expect("mkdir");
    let script = r#"set -e
busybox wget -q -O manifest.json "$SEED/manifest.json"
for name in kernel initramfs; do
  url=$(busybox sed -n "s/.*\"urls\":{[^}]*\"$name\":\"\([^\"]*\)\".*/\1/p" manifest.json)
  [ -n "$url" ] || { echo "no $name URL in the manifest" >&2; exit 1; }
  echo "$name $url"
  busybox wget -q -O "$name" "$url"
done"#;
    let out = Command::new(busybox)
        .args(["sh", "-c", script])
        .env("SEED", &seed.url)
        .env("PATH", "/bin:/usr/bin")
        .current_dir(&work)
        .output()
        .expect("run busybox sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["kernel", "initramfs"] {
        assert!(
            stdout.contains(&format!("{name} {}/stable/{arch}/{name}\n", seed.url)),
            "the URL names the host the client used: {stdout}"
        );
        let want = fs::read(dir.join("stable").join(arch).join(name)).expect("read");
        let got = fs::read(work.join(name)).expect("fetched");
        assert!(
            got == want,
            "{name}: {} bytes differ from the published file",
            got.len()
        );
    }
    // The manifest a wget init saw still verifies, and verify drops the URLs.
    let pinned: PublicKey = seed.pubkey.parse().expect("key");
    let raw = fs::read(work.join("manifest.json")).expect("manifest");
    let m = SignedManifest::verify(&raw, &pinned).expect("verifies with the URLs beside it");
    assert!(!String::from_utf8_lossy(m.envelope()).contains("urls"));
}

#[test]
fn range_and_head_requests() {
    let t = tempfile::tempdir().expect("tempdir");
    let arch = std::env::consts::ARCH;
    let dir = make_artifacts(t.path(), "stable", arch, 200_000, 5_000);
    let seed = Seed::start(&dir, &t.path().join("state"), &["--chunk-size", "4096"]);
    let kernel = fs::read(dir.join("stable").join(arch).join("kernel")).expect("read");
    let url = format!("{}/stable/{arch}/kernel", seed.url);
    // A range spanning several chunks, starting and ending mid-chunk.
    let mut r = agent()
        .get(&url)
        .header("Range", "bytes=4000-12345")
        .call()
        .expect("range");
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(
        r.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some("bytes 4000-12345/200000")
    );
    let body = r.body_mut().read_to_vec().expect("body");
    assert_eq!(body, &kernel[4000..=12345]);
    let mut r = agent()
        .get(&url)
        .header("Range", "bytes=-10")
        .call()
        .expect("suffix");
    assert_eq!(
        r.body_mut().read_to_vec().expect("body"),
        &kernel[199_990..]
    );
    let r = agent()
        .get(&url)
        .header("Range", "bytes=200000-")
        .call()
        .expect("416");
    assert_eq!(r.status().as_u16(), 416);
    let r = agent().head(&url).call().expect("head");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some("200000")
    );
}

#[test]
fn corrupt_chunk_in_store_is_never_served() {
    let t = tempfile::tempdir().expect("tempdir");
    let arch = std::env::consts::ARCH;
    let dir = make_artifacts(t.path(), "stable", arch, 40_000, 5_000);
    let state = t.path().join("state");
    let seed = Seed::start(&dir, &state, &["--chunk-size", "8192"]);
    let (_, envelope) = get(&format!("{}/manifest.json", seed.url));
    let m = SignedManifest::verify(&envelope, &seed.pubkey.parse().expect("key")).expect("verify");
    let h = m.manifest().artifact("kernel").expect("kernel").chunks[2];
    let hex = h.to_string();
    let file = state.join("store/chunks").join(&hex[..2]).join(&hex);
    let mut bytes = fs::read(&file).expect("chunk file");
    bytes[100] ^= 0xff;
    fs::write(&file, &bytes).expect("corrupt");
    // The raw artifact stops short instead of carrying wrong bytes.
    let res = agent()
        .get(&format!("{}/stable/{arch}/kernel", seed.url))
        .call()
        .and_then(|mut r| r.body_mut().read_to_vec());
    assert!(
        res.is_err(),
        "a corrupt chunk must cut the body short, got {:?} bytes",
        res.map(|b| b.len())
    );
    // The corrupt file was dropped from the store: the chunk is now absent.
    let (status, _) = get(&format!("{}/chunks/{hex}", seed.url));
    assert_eq!(status, 404, "a corrupt chunk must not be served");
}

#[test]
fn keygen_publish_verify_and_tampering() {
    let t = tempfile::tempdir().expect("tempdir");
    let key = t.path().join("pub.key");
    let (ok, out, err) = run(&["keygen", "--out", p(&key)]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "public key is the only stdout line: {out:?}"
    );
    let pubkey = lines[0].to_owned();
    pubkey.parse::<PublicKey>().expect("printed key parses");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );
    // keygen never overwrites a key.
    let (ok, _, err) = run(&["keygen", "--out", p(&key)]);
    assert!(!ok && err.contains("pub.key"), "{err}");

    let dir = make_artifacts(t.path(), "stable", "aarch64", 100_000, 20_000);
    let store = t.path().join("store");
    for seq in 1..=2 {
        let (ok, out, err) = run(&[
            "publish",
            "--key",
            p(&key),
            "--artifacts",
            p(&dir),
            "--store",
            p(&store),
        ]);
        assert!(ok, "{err}");
        assert!(
            out.contains(&format!("stable/aarch64 sequence {seq} ")),
            "{out}"
        );
    }
    let manifest = store.join("manifests/stable/aarch64.json");
    let arts = dir.join("stable/aarch64");
    let verify = |m: &Path, extra: &[&str]| {
        let mut args = vec!["verify", "--pubkey", &pubkey, p(m)];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, out, err) = verify(&manifest, &["--artifacts", p(&arts)]);
    assert!(ok, "{err}");
    assert!(
        out.contains("signature ok") && out.contains("kernel: ok"),
        "{out}"
    );

    // Wrong key.
    let other = t.path().join("other.key");
    let (_, other_pub, _) = run(&["keygen", "--out", p(&other)]);
    let (ok, _, err) = run(&["verify", "--pubkey", other_pub.trim(), p(&manifest)]);
    assert!(!ok && err.contains("does not verify"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");

    // Tampered manifest.
    let text = fs::read_to_string(&manifest).expect("manifest");
    let tampered = t.path().join("tampered.json");
    fs::write(&tampered, text.replace("\"sequence\":2", "\"sequence\":9")).expect("write");
    let (ok, _, err) = verify(&tampered, &[]);
    assert!(
        !ok && err.contains("tampered.json") && err.contains("does not verify"),
        "{err}"
    );

    // Malformed manifest.
    let garbage = t.path().join("garbage.json");
    fs::write(&garbage, b"{\"manifest\": 5").expect("write");
    let (ok, _, err) = verify(&garbage, &[]);
    assert!(
        !ok && err.contains("garbage.json") && err.contains("invalid manifest"),
        "{err}"
    );

    // Rollback below a sequence already seen.
    let (ok, _, err) = verify(&manifest, &["--min-sequence", "3"]);
    assert!(!ok && err.contains("rollback"), "{err}");

    // Truncated and corrupted artifacts.
    let kernel = arts.join("kernel");
    let orig = fs::read(&kernel).expect("kernel");
    fs::write(&kernel, &orig[..orig.len() - 1]).expect("truncate");
    let (ok, _, err) = verify(&manifest, &["--artifacts", p(&arts)]);
    assert!(
        !ok && err.contains("kernel") && err.contains("truncated"),
        "{err}"
    );
    let mut bad = orig.clone();
    bad[500] ^= 1;
    fs::write(&kernel, &bad).expect("corrupt");
    let (ok, _, err) = verify(&manifest, &["--artifacts", p(&arts)]);
    assert!(
        !ok && err.contains("kernel") && err.contains("hashes to"),
        "{err}"
    );
}

#[test]
fn serve_refuses_bad_directories_and_busy_ports() {
    let t = tempfile::tempdir().expect("tempdir");
    let state = t.path().join("state");
    let serve = |dir: &Path, port: &str, state: &Path| {
        run(&[
            "serve",
            "-a",
            p(dir),
            "-p",
            port,
            "--bind",
            "127.0.0.1",
            "--state",
            p(state),
        ])
    };
    // Missing kernel.
    let dir = make_artifacts(t.path(), "stable", "x86_64", 1000, 1000);
    fs::remove_file(dir.join("stable/x86_64/kernel")).expect("rm");
    let (ok, _, err) = serve(&dir, "0", &state);
    assert!(
        !ok && err.contains("stable/x86_64") && err.contains("no kernel"),
        "{err}"
    );
    assert!(!state.join("store/manifests/stable/x86_64.json").exists());
    // A directory that does not exist.
    let (ok, _, err) = serve(&t.path().join("nope"), "0", &state);
    assert!(!ok && err.contains("nope"), "{err}");
    // A port in use: the error names the address, and nothing is created.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port().to_string();
    fs::write(dir.join("stable/x86_64/kernel"), pseudo_random(1000, 3)).expect("kernel");
    let fresh = t.path().join("fresh-state");
    let (ok, _, err) = serve(&dir, &port, &fresh);
    assert!(
        !ok && err.contains(&format!("127.0.0.1:{port}")) && err.contains("in use"),
        "{err}"
    );
    assert!(!fresh.exists(), "a failed start leaves no state behind");
}

#[test]
fn serve_keeps_its_key_and_sequence_across_restarts() {
    let t = tempfile::tempdir().expect("tempdir");
    let arch = std::env::consts::ARCH;
    let dir = make_artifacts(t.path(), "stable", arch, 10_000, 1_000);
    let state = t.path().join("state");
    let first = Seed::start(&dir, &state, &[]);
    let (_, m1) = get(&format!("{}/manifest.json", first.url));
    drop(first);
    let second = Seed::start(&dir, &state, &[]);
    let (_, m2) = get(&format!("{}/manifest.json", second.url));
    // The unsigned artifact URLs name each run's port; the signed part must not change.
    let key: PublicKey = second.pubkey.parse().expect("key");
    let (v1, v2) = (
        SignedManifest::verify(&m1, &key).expect("verify"),
        SignedManifest::verify(&m2, &key).expect("verify"),
    );
    assert_eq!(
        v1.envelope(),
        v2.envelope(),
        "an unchanged directory keeps its signed manifest"
    );
    drop(second);
    fs::write(
        dir.join("stable").join(arch).join("kernel"),
        pseudo_random(10_000, 77),
    )
    .expect("kernel");
    let third = Seed::start(&dir, &state, &[]);
    let (_, m3) = get(&format!("{}/manifest.json", third.url));
    let key: PublicKey = third.pubkey.parse().expect("key");
    let s1 = SignedManifest::verify(&m1, &key).expect("same key across restarts");
    let s3 = SignedManifest::verify(&m3, &key).expect("verify");
    assert_eq!(s3.manifest().sequence, s1.manifest().sequence + 1);
}
