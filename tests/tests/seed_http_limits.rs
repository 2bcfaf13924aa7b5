//! The HTTP seed under idle sockets and slow readers (issue 12, item 4): a
//! real `plasmd serve` on loopback, 2,000 TCP connections that never send a
//! byte (reconnecting whenever the seed closes one) and 400 clients that ask
//! for the kernel and read it at about 1 KB/s, while an honest `plasmd fetch`
//! and plain HTTP GETs of every artifact run.
//!
//! Linux routes all of 127.0.0.0/8 to loopback, so attackers bind source
//! addresses of their own (127.0.1.x idle, 127.0.2.x slow) and the seed's
//! per-address caps apply to them as to clients on a LAN.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use phase_tests::{Seed, make_artifacts, plasmd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

/// The seed's header-read timeout in this test (`--http-header-timeout`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle sockets kept open, from [`IDLE_ADDRS`] source addresses.
const IDLE: usize = 2000;
const IDLE_ADDRS: usize = 10;
/// Slow readers, from [`SLOW_ADDRS`] source addresses.
const SLOW: usize = 400;
const SLOW_ADDRS: usize = 8;
/// The seed's defaults (node/src/http_limits.rs) this test relies on.
const CONNECTIONS_PER_ADDR: usize = 64;
const BODIES_PER_ADDR: usize = 16;
/// Descriptors the seed holds besides HTTP connections (stdio, epoll, the
/// listeners, libp2p sockets, store files); measured around 30 here.
const FD_OVERHEAD: usize = 150;
/// Bytes a slow reader reads per second.
const SLOW_RATE: usize = 1024;
/// The longest wait for anything in this test.
const T: Duration = Duration::from_secs(120);

/// Raises this process's soft RLIMIT_NOFILE to its hard limit; the attack
/// needs one descriptor per socket.
fn raise_nofile(need: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) },
        0,
        "getrlimit"
    );
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads one rlimit from the struct we pass.
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0;
    assert!(
        ok && lim.rlim_cur >= need,
        "this test needs RLIMIT_NOFILE >= {need} (2,400 sockets and the seed's own), \
         but the hard limit is {} (raise it: ulimit -Hn, /etc/security/limits.conf)",
        lim.rlim_max
    );
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The seed's descriptors now, and its TCP sockets among them: socket inode
/// -> remote IPv4 address, from `/proc/PID/fd` and the namespace's
/// `/proc/net/tcp`.
fn seed_sockets(pid: u32) -> (usize, HashMap<u64, Ipv4Addr>) {
    let mut mine = HashSet::new();
    let mut fds = 0;
    if let Ok(d) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in d.flatten() {
            fds += 1;
            if let Ok(l) = fs::read_link(e.path())
                && let Some(n) = l
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
            {
                mine.insert(n);
            }
        }
    }
    let mut out = HashMap::new();
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(rem), Some(inode)) = (f.get(2), f.get(9)) else {
            continue;
        };
        let Ok(inode) = inode.parse::<u64>() else {
            continue;
        };
        if !mine.contains(&inode) {
            continue;
        }
        // "0101007F:1F90": the address as the kernel's u32, in host order.
        if let Some(Ok(ip)) = rem.split(':').next().map(|h| u32::from_str_radix(h, 16)) {
            out.insert(inode, Ipv4Addr::from(ip.to_ne_bytes()));
        }
    }
    (fds, out)
}

/// What the seed itself held of the idle attackers' connections, sampled.
#[derive(Default)]
struct HeldBySeed {
    /// Per socket inode: first and last seen.
    seen: HashMap<u64, (Instant, Instant)>,
    /// The most connections from one idle address held at once.
    peak_per_addr: usize,
}

impl HeldBySeed {
    /// Samples the seed's sockets; returns how many descriptors it holds.
    fn sample(&mut self, pid: u32) -> usize {
        let now = Instant::now();
        let mut per_addr: HashMap<Ipv4Addr, usize> = HashMap::new();
        let (fds, sockets) = seed_sockets(pid);
        for (inode, ip) in sockets {
            if ip.octets()[..3] != [127, 0, 1] {
                continue;
            }
            *per_addr.entry(ip).or_default() += 1;
            self.seen
                .entry(inode)
                .and_modify(|e| e.1 = now)
                .or_insert((now, now));
        }
        let most = per_addr.values().copied().max().unwrap_or(0);
        self.peak_per_addr = self.peak_per_addr.max(most);
        fds
    }

    /// The longest the seed held one idle connection (as sampled).
    fn longest(&self) -> Duration {
        self.seen
            .values()
            .map(|(a, b)| b.duration_since(*a))
            .max()
            .unwrap_or_default()
    }
}

fn addr(third: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, third, 1 + i as u8))
}

/// How often the seed's descriptors and sockets are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// What an idle connection may stay at the seed past its header timeout:
/// the sampling interval and a timer that fires late on a loaded machine.
const TIMER_SLACK: Duration = Duration::from_secs(2);

/// How long an idle client waits for the seed to close its connection
/// before it gives up on it (counted in `too_long`, printed, not asserted).
/// The client's clock starts at its connect, and the kernel can hold a
/// connection in front of the seed for many seconds first: in the accept
/// queue (1,024 long, which the 1,360 sockets over the per-address cap keep
/// refilling) or, once that overflows, waiting for a SYN-ACK retransmit. Two
/// CI runs on a loaded 2-core machine saw 16 connections open past 7 s and 6
/// past 17 s that way, so the header timeout is checked at the seed
/// ([`HeldBySeed`]), from accept to close.
const QUEUE_SLACK: Duration = Duration::from_secs(15);

/// Connects in flight at once. The seed's accept queue holds 1,024; a
/// burst of 2,400 handshakes overflows it, and the kernel then leaves
/// connections waiting seconds for a SYN-ACK retransmit before the seed even
/// sees them (a SYN flood is the kernel's business, not the HTTP seed's).
const CONNECTS_IN_FLIGHT: usize = 128;

async fn connect_from(
    gate: &Semaphore,
    from: IpAddr,
    to: SocketAddr,
    rcvbuf: Option<u32>,
) -> std::io::Result<tokio::net::TcpStream> {
    let _turn = gate.acquire().await.expect("gate open");
    let s = TcpSocket::new_v4()?;
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n)?;
    }
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// What the idle sockets saw: how long each connection lasted before the seed closed it.
#[derive(Default)]
struct IdleSeen {
    /// Closed within half the header timeout: refused at the door.
    refused: AtomicUsize,
    /// Closed by the header timeout (at least 90 % of it).
    timed_out: AtomicUsize,
    /// Lasted longer than the header timeout plus [`QUEUE_SLACK`] (kernel queues).
    too_long: AtomicUsize,
    /// The longest an idle connection lasted, in milliseconds (printed).
    longest_ms: AtomicUsize,
    /// Connections made on the first round, so the attack is at full strength after it.
    first_round: AtomicUsize,
    /// Connect errors (a full accept queue).
    connect_errors: AtomicUsize,
}

/// One idle attacker: connects, sends nothing, waits for the seed to close,
/// notes how long that took, reconnects until `stop`.
async fn idle_socket(
    gate: Arc<Semaphore>,
    from: IpAddr,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<IdleSeen>,
) {
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let mut s = match connect_from(&gate, from, to, None).await {
            Ok(s) => s,
            Err(_) => {
                seen.connect_errors.fetch_add(1, Ordering::Relaxed);
                if first {
                    first = false;
                    seen.first_round.fetch_add(1, Ordering::Relaxed);
                }
                // The seed's accept queue was full; come back as an attacker would.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let t0 = Instant::now();
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(HEADER_TIMEOUT + QUEUE_SLACK, s.read(&mut buf)).await;
        let held = t0.elapsed();
        seen.longest_ms
            .fetch_max(held.as_millis() as usize, Ordering::Relaxed);
        match r {
            Err(_) => {
                seen.too_long.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) if held < HEADER_TIMEOUT / 2 => {
                seen.refused.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) if held >= HEADER_TIMEOUT.mul_f64(0.9) => {
                seen.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
        }
        if first {
            first = false;
            seen.first_round.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct SlowSeen {
    ok: AtomicUsize,
    busy: AtomicUsize,
    other: AtomicUsize,
    answered: AtomicUsize,
    bytes: AtomicUsize,
}

/// One slow reader: asks for the kernel with a tiny receive buffer and reads
/// [`SLOW_RATE`] bytes a second until `stop` or the seed ends the response.
async fn slow_reader(
    gate: Arc<Semaphore>,
    from: IpAddr,
    to: SocketAddr,
    path: String,
    stop: Arc<AtomicBool>,
    seen: Arc<SlowSeen>,
) {
    let Ok(mut s) = connect_from(&gate, from, to, Some(4096)).await else {
        seen.other.fetch_add(1, Ordering::Relaxed);
        seen.answered.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: seed\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        seen.other.fetch_add(1, Ordering::Relaxed);
        seen.answered.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut buf = vec![0u8; SLOW_RATE];
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let n = match tokio::time::timeout(T, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        if first {
            first = false;
            let head = String::from_utf8_lossy(&buf[..n]);
            let which = if head.starts_with("HTTP/1.1 200") {
                &seen.ok
            } else if head.starts_with("HTTP/1.1 503") {
                &seen.busy
            } else {
                &seen.other
            };
            which.fetch_add(1, Ordering::Relaxed);
            seen.answered.fetch_add(1, Ordering::Relaxed);
            if !head.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        seen.bytes.fetch_add(n, Ordering::Relaxed);
    }
    if first {
        seen.other.fetch_add(1, Ordering::Relaxed);
        seen.answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits until `cond` holds, polling a counter the attackers update; panics naming `what` after [`T`].
async fn until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < T, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `plasmd fetch` of stable/ARCH from the seed into `out`; returns how long it took.
fn honest_fetch(seed: &Seed, out: &Path, state: &Path) -> Duration {
    let t0 = Instant::now();
    let o = Command::new(plasmd())
        .env("PLASMD_MDNS", "0")
        .args(["fetch", "--provider", &seed.url, "--pubkey", &seed.pubkey])
        .args([
            "--no-mdns",
            "--mode",
            "lan",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .args(["--timeout", "90", "--out"])
        .arg(out)
        .arg("--state")
        .arg(state)
        .output()
        .expect("run plasmd fetch");
    assert!(
        o.status.success(),
        "plasmd fetch failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t0.elapsed()
}

fn http_get(url: &str) -> (u16, Vec<u8>) {
    phase_tests::http_get(url, T)
}

fn assert_same_files(dir: &Path, got: &Path, what: &str) {
    for name in ["kernel", "initramfs"] {
        let want = fs::read(dir.join(name)).expect("published file");
        let have = fs::read(got.join(name)).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        assert!(
            have == want,
            "{what}: {name} differs from the published file"
        );
    }
}

#[test]
fn idle_sockets_and_slow_readers_do_not_stop_an_honest_fetch() {
    raise_nofile((IDLE + SLOW + 1000) as u64);
    let t = tempfile::tempdir().expect("tempdir");
    let arch = std::env::consts::ARCH;
    let dir = make_artifacts(t.path(), "stable", arch, 4 << 20, 1 << 20);
    let arts = dir.join("stable").join(arch);
    let timeout = format!("{}", HEADER_TIMEOUT.as_secs_f64());
    let seed = Seed::start(
        &dir,
        &t.path().join("seed"),
        &["--http-header-timeout", &timeout],
    );
    let pid = seed.proc.pid();
    let to: SocketAddr = seed
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("seed address");

    // The clean figures first.
    let fds_before = fd_count(pid);
    let clean = honest_fetch(
        &seed,
        &t.path().join("clean"),
        &t.path().join("clean-state"),
    );
    assert_same_files(&arts, &t.path().join("clean"), "clean fetch");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let idle = Arc::new(IdleSeen::default());
    let slow = Arc::new(SlowSeen::default());
    let mut tasks = Vec::new();
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            let mut held = HeldBySeed::default();
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(held.sample(pid), Ordering::Relaxed);
                std::thread::sleep(SAMPLE_EVERY);
            }
            held
        })
    };
    let kernel_path = format!("/stable/{arch}/kernel");
    let attack_start = Instant::now();
    rt.block_on(async {
        for i in 0..SLOW {
            tasks.push(tokio::spawn(slow_reader(
                gate.clone(),
                addr(2, i % SLOW_ADDRS),
                to,
                kernel_path.clone(),
                stop.clone(),
                slow.clone(),
            )));
        }
        for i in 0..IDLE {
            tasks.push(tokio::spawn(idle_socket(
                gate.clone(),
                addr(1, i % IDLE_ADDRS),
                to,
                stop.clone(),
                idle.clone(),
            )));
        }
        // Full strength: every idle socket has been closed at least once and
        // every slow reader has its answer (200, or 503 after the body-slot wait).
        until("the first round of idle sockets", || {
            idle.first_round.load(Ordering::Relaxed) == IDLE
        })
        .await;
        until("every slow reader's answer", || {
            slow.answered.load(Ordering::Relaxed) == SLOW
        })
        .await;
    });
    let fds_attack = fd_count(pid);

    // The honest client, while the idle sockets keep reconnecting and the slow readers read.
    let attacked = honest_fetch(&seed, &t.path().join("out"), &t.path().join("state"));
    assert_same_files(&arts, &t.path().join("out"), "fetch under attack");
    let get_start = Instant::now();
    for name in ["kernel", "initramfs"] {
        let (status, body) = http_get(&format!("{}/stable/{arch}/{name}", seed.url));
        assert_eq!(status, 200, "GET {name} under attack");
        let want = fs::read(arts.join(name)).expect("published file");
        assert!(body == want, "GET {name} under attack: served bytes differ");
    }
    let get_time = get_start.elapsed();
    let attack_time = attack_start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let held = sampler.join().expect("fd sampler");
    rt.block_on(async {
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    });
    drop(rt);
    let peak = peak.load(Ordering::Relaxed);
    let bound = (IDLE_ADDRS + SLOW_ADDRS + 1) * CONNECTIONS_PER_ADDR + FD_OVERHEAD;
    let (ok, busy) = (
        slow.ok.load(Ordering::Relaxed),
        slow.busy.load(Ordering::Relaxed),
    );
    eprintln!(
        "seed fds: {fds_before} before, {fds_attack} under attack, peak {peak} (bound {bound}); \
         idle: {} refused at once, {} closed by the {:.1} s header timeout, longest open {:.1} s \
         as the client saw it ({} past {:.0} s), {:.1} s held by the seed, at most {} from one \
         address at once, \
         {} connect errors; \
         slow readers: {ok} answered 200, {busy} answered 503, {} other, {} bytes read; \
         honest fetch {:.2} s clean, {:.2} s under attack; GET of both artifacts {:.2} s; \
         attack ran {:.1} s",
        idle.refused.load(Ordering::Relaxed),
        idle.timed_out.load(Ordering::Relaxed),
        HEADER_TIMEOUT.as_secs_f64(),
        idle.longest_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        idle.too_long.load(Ordering::Relaxed),
        (HEADER_TIMEOUT + QUEUE_SLACK).as_secs_f64(),
        held.longest().as_secs_f64(),
        held.peak_per_addr,
        idle.connect_errors.load(Ordering::Relaxed),
        slow.other.load(Ordering::Relaxed),
        slow.bytes.load(Ordering::Relaxed),
        clean.as_secs_f64(),
        attacked.as_secs_f64(),
        get_time.as_secs_f64(),
        attack_time.as_secs_f64(),
    );
    assert!(
        peak <= bound,
        "the seed held {peak} descriptors, more than {bound}"
    );
    // Measured at the seed (from accept to close): a client's clock also
    // counts the kernel's queues in front of the seed.
    assert!(
        !held.seen.is_empty(),
        "no idle connection seen among the seed's sockets"
    );
    assert!(
        held.longest() <= HEADER_TIMEOUT + TIMER_SLACK,
        "the seed held an idle connection {:.1} s, past its {:.1} s header timeout",
        held.longest().as_secs_f64(),
        HEADER_TIMEOUT.as_secs_f64()
    );
    // 200 sockets per address against a cap of 64: the seed fills the cap
    // and lets in no more. A sample may also catch the one socket its accept
    // loop has just accepted to close (over the cap), and a socket accepted
    // into a freed slot while the descriptor list was being read (the list
    // is not one atomic snapshot): 65 seen once in 6 local runs.
    assert!(
        (CONNECTIONS_PER_ADDR..=CONNECTIONS_PER_ADDR + 2).contains(&held.peak_per_addr),
        "the most idle connections from one address the seed held at once: {}, its cap {}",
        held.peak_per_addr,
        CONNECTIONS_PER_ADDR
    );
    // And as the clients saw it: connections past the cap were closed, and
    // those let in were closed by the header timeout, not left open.
    assert!(
        idle.timed_out.load(Ordering::Relaxed) >= IDLE_ADDRS * CONNECTIONS_PER_ADDR / 2,
        "idle sockets closed by the header timeout"
    );
    assert!(
        idle.refused.load(Ordering::Relaxed) + idle.timed_out.load(Ordering::Relaxed) >= IDLE,
        "every idle socket was closed by the seed at least once"
    );
    // Slow bodies keep their body slots while they are sent: no more than the
    // per-address share gets a 200, the rest hear 503 instead of waiting forever.
    assert!(
        ok > 0 && ok <= SLOW_ADDRS * BODIES_PER_ADDR,
        "slow readers answered 200: {ok}"
    );
    assert_eq!(ok + busy, SLOW, "every slow reader got 200 or 503");
    // The seed drops back once the attackers are gone.
    let t0 = Instant::now();
    while fd_count(pid) > fds_before + 10 {
        assert!(
            t0.elapsed() < T,
            "the seed still holds {} descriptors after the attack ({fds_before} before)",
            fd_count(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
