//! Prometheus metrics as an operator scrapes them: a seed and two
//! `plasmd fetch --serve-after --metrics` processes on loopback, every
//! `/metrics` parsed as OpenMetrics text and checked against the fetches'
//! JSON summaries and against each other (what one sent, the others received).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use phase_tests::plasmd;
use phase_tests::swarm::{STEP, SeedSetup, fetcher, seeding_addr, summary};
use phase_tests::{Proc, word_after};

/// One sample: metric name and its labels.
type Key = (String, BTreeMap<String, String>);

/// A parsed scrape.
struct Scrape {
    samples: BTreeMap<Key, f64>,
    text: String,
}

impl Scrape {
    /// Parses OpenMetrics text: `name{k="v",...} value` lines, `#` comments,
    /// and the mandatory `# EOF` at the end.
    fn parse(text: &str) -> Scrape {
        assert!(
            text.ends_with("# EOF\n"),
            "not OpenMetrics text (no # EOF):\n{text}"
        );
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value in {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                    (name.to_owned(), labels(body, line))
                }
            };
            let old = samples.insert((name, labels), value);
            assert!(old.is_none(), "sample twice: {line:?}");
        }
        Scrape {
            samples,
            text: text.to_owned(),
        }
    }

    /// The sample with exactly these labels; 0 if absent (a counter family
    /// shows a label set only once it has counted something).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let l = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .get(&(name.to_owned(), l))
            .copied()
            .unwrap_or(0.0)
    }

    /// The sum over every sample of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.keys().any(|(n, _)| n == name)
    }
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes in values.
fn labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (k, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label in {line:?}"));
        let mut v = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => v.push('\n'),
                    Some((_, c)) => v.push(c),
                    None => panic!("dangling escape in {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => v.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        out.insert(k.to_owned(), v);
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    out
}

fn scrape(url: &str) -> Scrape {
    let mut resp = ureq::get(url)
        .config()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        ct.starts_with("application/openmetrics-text"),
        "{url}: content-type {ct:?}"
    );
    let text = resp
        .body_mut()
        .with_config()
        .limit(8 << 20)
        .read_to_string()
        .expect("body");
    Scrape::parse(&text)
}

/// The `/metrics` URL a fetcher printed (`plasmd fetch: metrics on URL`).
fn metrics_url(p: &Proc) -> String {
    let line = p.wait_for_first(STEP, |l| l.starts_with("plasmd fetch: metrics on "));
    word_after(&line, "metrics on ").expect("url after 'metrics on'")
}

/// Summary bytes and chunks per source kind (the metric's `source` label):
/// the seed's swarm node, the HTTP rescue, or another peer.
fn by_kind(sum: &serde_json::Value, seed_id: &str) -> BTreeMap<&'static str, (f64, f64)> {
    let mut out: BTreeMap<&'static str, (f64, f64)> =
        ["seed", "peer", "http"].map(|k| (k, (0.0, 0.0))).into();
    for (peer, v) in sum["peers"].as_object().expect("peers object") {
        let kind = match peer.as_str() {
            "http-seed" => "http",
            p if p == seed_id => "seed",
            _ => "peer",
        };
        let e = out.get_mut(kind).expect("kind");
        e.0 += v["bytes"].as_f64().expect("bytes");
        e.1 += v["chunks"].as_f64().expect("chunks");
    }
    out
}

/// A fetcher's scrape agrees with its JSON summary.
fn check_fetcher(name: &str, m: &Scrape, sum: &serde_json::Value, seed_id: &str) {
    let ctx = || format!("{name}: summary {sum}\nscrape:\n{}", m.text);
    let mut total = 0.0;
    for (kind, (bytes, chunks)) in by_kind(sum, seed_id) {
        let l = [("source", kind)];
        assert_eq!(
            m.get("plasmd_bytes_received_total", &l),
            bytes,
            "bytes from {kind}; {}",
            ctx()
        );
        assert_eq!(
            m.get("plasmd_chunks_verified_total", &l),
            chunks,
            "chunks from {kind}; {}",
            ctx()
        );
        total += bytes;
    }
    assert_eq!(
        total,
        sum["bytes"].as_f64().expect("bytes"),
        "summary total; {}",
        ctx()
    );
    assert_eq!(
        m.get("plasmd_fetch_duration_seconds_count", &[]),
        1.0,
        "one fetch; {}",
        ctx()
    );
    let fetch_s = sum["fetch_s"].as_f64().expect("fetch_s");
    assert!(
        (m.get("plasmd_fetch_duration_seconds_sum", &[]) - fetch_s).abs() < 1e-6,
        "histogram sum is the fetch's wall time {fetch_s}; {}",
        ctx()
    );
    assert_eq!(
        m.get(
            "plasmd_manifest_sequence",
            &[("channel", "stable"), ("arch", "x86_64")]
        ),
        sum["sequence"].as_f64().expect("sequence"),
        "{}",
        ctx()
    );
    assert_eq!(m.sum("plasmd_chunks_rejected_total", &[]), 0.0, "{}", ctx());
    assert_eq!(m.sum("plasmd_bans_total", &[]), 0.0, "{}", ctx());
    assert!(
        m.get("plasmd_connected_peers", &[]) >= 1.0,
        "connected to the seed at least; {}",
        ctx()
    );
    // libp2p's own counters share the registry: everything that came over
    // the swarm came in through its transport.
    let swarm_in = m.get("plasmd_bytes_received_total", &[("source", "seed")])
        + m.get("plasmd_bytes_received_total", &[("source", "peer")]);
    assert!(
        m.sum(
            "plasmd_libp2p_bandwidth_bytes_total",
            &[("direction", "Inbound")]
        ) >= swarm_in,
        "libp2p inbound bandwidth covers the swarm's chunk bytes; {}",
        ctx()
    );
    assert!(m.has("plasmd_libp2p_swarm_connections_established_total"));
}

/// Received by fetches plus arrived late, from one kind of source.
fn received(m: &Scrape, kind: &str) -> f64 {
    let l = [("source", kind)];
    m.get("plasmd_bytes_received_total", &l) + m.get("plasmd_late_bytes_received_total", &l)
}

#[test]
fn scrapes_match_the_fetch_summaries_and_each_other() {
    let s = SeedSetup::start(3 << 20, 1 << 20, 64 << 10);
    let (seed_id, _) = s.swarm();
    let seed_metrics = format!("{}/metrics", s.seed.url);
    let extra = ["--serve-after", "--metrics", "127.0.0.1:0"];

    let (oa, ob) = (s.path("a"), s.path("b"));
    let a = fetcher("a", &s.seed.url, &s.seed.pubkey, &oa, &extra);
    let sum_a = summary(&a);
    let a_addr = seeding_addr(&a);
    let a_url = metrics_url(&a);
    let mut with_a = vec!["--peer", a_addr.as_str()];
    with_a.extend(extra);
    let b = fetcher("b", &s.seed.url, &s.seed.pubkey, &ob, &with_a);
    let sum_b = summary(&b);
    seeding_addr(&b);
    let b_url = metrics_url(&b);
    s.assert_same(&oa);
    s.assert_same(&ob);

    check_fetcher("a", &scrape(&a_url), &sum_a, &seed_id);
    check_fetcher("b", &scrape(&b_url), &sum_b, &seed_id);

    // What each sender counted as sent, its receivers counted as received.
    // End-game duplicates may still be in flight when the summaries print,
    // so wait (bounded) for the books to balance.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (seed, ma, mb) = loop {
        let (seed, ma, mb) = (scrape(&seed_metrics), scrape(&a_url), scrape(&b_url));
        let balanced = seed.get("plasmd_bytes_sent_total", &[("via", "swarm")])
            == received(&ma, "seed") + received(&mb, "seed")
            && seed.get("plasmd_bytes_sent_total", &[("via", "http")])
                == received(&ma, "http") + received(&mb, "http")
            && ma.get("plasmd_bytes_sent_total", &[("via", "swarm")]) == received(&mb, "peer");
        if balanced {
            break (seed, ma, mb);
        }
        assert!(
            Instant::now() < deadline,
            "sent and received bytes do not balance within 30 s\nseed:\n{}\na:\n{}\nb:\n{}",
            seed.text,
            ma.text,
            mb.text
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(received(&ma, "peer"), 0.0, "a fetched before b existed");
    assert!(
        seed.get("plasmd_bytes_sent_total", &[("via", "swarm")]) > 0.0,
        "the seed's swarm node served: {}",
        seed.text
    );
    assert_eq!(
        seed.get(
            "plasmd_manifest_sequence",
            &[("channel", "stable"), ("arch", "x86_64")]
        ),
        sum_a["sequence"].as_f64().expect("sequence")
    );
    assert_eq!(seed.get("plasmd_fetch_duration_seconds_count", &[]), 0.0);
    eprintln!(
        "seed sent swarm={} http={}; b from a={} bytes",
        seed.get("plasmd_bytes_sent_total", &[("via", "swarm")]),
        seed.get("plasmd_bytes_sent_total", &[("via", "http")]),
        received(&mb, "peer")
    );

    // A wget-style download of an artifact counts as HTTP bytes sent.
    let before = seed.get("plasmd_bytes_sent_total", &[("via", "http")]);
    let kernel = ureq::get(&format!("{}/stable/x86_64/kernel", s.seed.url))
        .call()
        .expect("GET kernel")
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .expect("kernel body");
    assert_eq!(kernel.len(), 3 << 20);
    let after = scrape(&seed_metrics).get("plasmd_bytes_sent_total", &[("via", "http")]);
    assert_eq!(after - before, kernel.len() as f64);
}

/// `--metrics` on an address already taken fails at once, in one line
/// naming it; a malformed one is refused by the argument parser.
#[test]
fn a_metrics_address_that_cannot_be_had_is_one_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = phase_content::SecretKey::from_seed([5; 32])
        .public()
        .to_string();
    let run = |metrics: &str| {
        let out = Command::new(plasmd())
            .args(["fetch", "--pubkey", &key, "--no-mdns"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--out"])
            .arg(Path::new(dir.path()).join("out"))
            .args(["--metrics", metrics])
            .output()
            .expect("run plasmd");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&at);
    assert!(!ok, "{err}");
    assert!(
        err.contains(&format!("cannot listen for metrics scrapes on {at}")),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let (ok, err) = run("nine-thousand");
    assert!(!ok, "{err}");
    assert!(err.contains("--metrics"), "{err}");
}
