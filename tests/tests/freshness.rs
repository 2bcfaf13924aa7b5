//! Freshness on loopback (issue 12, item 1): a proxy in front of the seed
//! keeps serving the seed's previous signed manifest (sequence 1) after the
//! seed published sequence 2. `plasmd fetch` through it refuses the old one,
//! in one line naming both sequences, and writes no artifact, whether the
//! floor comes from `--min-sequence 2` or from its state directory having
//! seen 2; and when the seed's swarm node is reachable, the fetch takes
//! sequence 2 from it and writes the NEW kernel.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use phase_tests::swarm::{STEP, fetcher, start_seed, summary};
use phase_tests::{make_artifacts, pseudo_random};

/// The longest request head the proxy reads.
const MAX_HEAD: usize = 64 << 10;

/// A raw HTTP/1.1 proxy on 127.0.0.1: `*/manifest.json` gets `stale` (the
/// old signed manifest), `/swarm` a 404 when `hide_swarm`, everything else
/// is forwarded to `upstream` (one request per connection).
struct Proxy {
    url: String,
}

impl Proxy {
    fn start(upstream: String, stale: Vec<u8>, hide_swarm: bool) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let url = format!("http://{}", l.local_addr().expect("proxy addr"));
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (up, stale) = (upstream.clone(), stale.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(c, &up, &stale, hide_swarm);
                });
            }
        });
        Proxy { url }
    }
}

fn serve_one(
    mut c: TcpStream,
    upstream: &str,
    stale: &[u8],
    hide_swarm: bool,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf)?;
        if n == 0 || head.len() > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
    let reply = |c: &mut TcpStream, status: &str, body: &[u8]| {
        write!(
            c,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        )?;
        c.write_all(body)
    };
    if path.ends_with("/manifest.json") {
        return reply(&mut c, "200 OK", stale);
    }
    if hide_swarm && path.starts_with("/swarm") {
        return reply(&mut c, "404 Not Found", b"{}");
    }
    // Forward with `Connection: close`, so the seed ends the response.
    let host = upstream.trim_start_matches("http://");
    let mut u = TcpStream::connect(host)?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut fwd = format!("{first}\r\n");
    for l in lines.take_while(|l| !l.is_empty()) {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            fwd.push_str(l);
            fwd.push_str("\r\n");
        }
    }
    fwd.push_str("Connection: close\r\n\r\n");
    u.write_all(fwd.as_bytes())?;
    std::io::copy(&mut u, &mut c)?;
    Ok(())
}

fn get(url: &str) -> Vec<u8> {
    ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_vec()
        .expect("body")
}

fn sequence(envelope: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(envelope).expect("manifest JSON");
    v["manifest"]["sequence"].as_u64().expect("sequence")
}

/// Runs a fetch that must be refused; returns its refusal line.
fn refused(name: &str, provider: &str, pubkey: &str, out: &Path, extra: &[&str]) -> String {
    let mut f = fetcher(name, provider, pubkey, out, extra);
    let status = f.wait_exit(STEP);
    let output = f.output();
    assert!(!status.success(), "{name} must fail:\n{output}");
    assert!(
        !out.join("kernel").exists() && !out.join("manifest.json").exists(),
        "{name} wrote artifacts from a refused manifest:\n{output}"
    );
    output
        .lines()
        .find(|l| l.contains("refusing the stable/x86_64 manifest sequence 1 from"))
        .unwrap_or_else(|| panic!("{name}: no refusal line:\n{output}"))
        .to_owned()
}

#[test]
fn old_manifest_served_by_a_proxy_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let artifacts = make_artifacts(dir.path(), "stable", "x86_64", 300_000, 50_000);
    let state = dir.path().join("seed-state");
    let seed = start_seed(&artifacts, &state, 16 << 10);
    let old = get(&format!("{}/stable/x86_64/manifest.json", seed.url));
    assert_eq!(sequence(&old), 1);
    drop(seed);
    // The seed publishes a new kernel: sequence 2, same key.
    let new_kernel = pseudo_random(300_000, 3);
    std::fs::write(artifacts.join("stable/x86_64/kernel"), &new_kernel).expect("write");
    let seed = start_seed(&artifacts, &state, 16 << 10);
    assert_eq!(
        sequence(&get(&format!("{}/stable/x86_64/manifest.json", seed.url))),
        2
    );
    let pk = seed.pubkey.clone();
    let hidden = Proxy::start(seed.url.clone(), old.clone(), true);
    let wait = ["--manifest-wait", "1"];

    // 1. --min-sequence 2: the proxy's sequence 1 is refused.
    let out = dir.path().join("out-min");
    let line = refused(
        "min-sequence",
        &hidden.url,
        &pk,
        &out,
        &[&wait[..], &["--min-sequence", "2"]].concat(),
    );
    assert!(
        line.contains(&hidden.url) && line.contains("older than sequence 2 (--min-sequence 2)"),
        "names the proxy and both sequences: {line}"
    );

    // 2. The state directory saw 2 (a fetch from the seed itself): later,
    //    through the proxy, 1 is refused without any flag.
    let out = dir.path().join("out-direct");
    let f = fetcher("direct", &seed.url, &pk, &out, &[]);
    assert_eq!(summary(&f)["sequence"], 2);
    assert_eq!(
        std::fs::read(out.join("kernel")).expect("kernel"),
        new_kernel
    );
    let state_dir = out.with_extension("state");
    let seen: Vec<_> = std::fs::read_dir(state_dir.join("seen"))
        .expect("the fetch keeps a freshness record")
        .flatten()
        .collect();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        std::fs::read_to_string(seen[0].path())
            .expect("read")
            .trim(),
        "2"
    );
    // Same state directory (the fetcher helper puts it beside `out`).
    let again = dir.path().join("out-direct-again");
    std::fs::rename(&state_dir, again.with_extension("state")).expect("move state");
    let line = refused("state", &hidden.url, &pk, &again, &wait);
    assert!(
        line.contains("older than sequence 2 (seen before, recorded in "),
        "names both sequences and the record: {line}"
    );

    // 3. The proxy hands out the seed's swarm node too: the seed's node
    //    offers 2, which wins over the proxy's 1; the NEW kernel is written.
    let open = Proxy::start(seed.url.clone(), old, false);
    let out = dir.path().join("out-peer");
    let f = fetcher("via-peer", &open.url, &pk, &out, &["--min-sequence", "2"]);
    let sum = summary(&f);
    assert_eq!(sum["sequence"], 2, "{}", f.output());
    assert_eq!(sum["ok"], true);
    assert_eq!(
        std::fs::read(out.join("kernel")).expect("kernel"),
        new_kernel
    );
}
