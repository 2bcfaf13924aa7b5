//! Progress of `plasmd fetch`: bars per artifact on a terminal, plain
//! periodic lines otherwise.

use std::io::Write;
use std::time::{Duration, Instant};

use phase_swarm::FetchProgress;
use tokio::sync::watch;

/// Shows progress until the sender is dropped or every chunk is held.
pub(crate) async fn show(mut rx: watch::Receiver<FetchProgress>, tty: bool, plain_every: Duration) {
    let start = Instant::now();
    let every = if tty {
        Duration::from_millis(200)
    } else {
        plain_every
    };
    let mut drawn = 0usize;
    let mut last = Instant::now();
    loop {
        let changed = tokio::time::timeout(every, rx.changed()).await;
        if let Ok(Err(_)) = changed {
            return;
        }
        let p = rx.borrow_and_update().clone();
        if p.total == 0 {
            continue;
        }
        let done = p.held == p.total;
        let mut err = std::io::stderr().lock();
        if tty {
            if drawn > 0 {
                let _ = write!(err, "\x1b[{drawn}A");
            }
            for (name, have, size) in &p.artifacts {
                let frac = if *size == 0 {
                    1.0
                } else {
                    *have as f64 / *size as f64
                };
                let filled = (frac * 30.0) as usize;
                let _ = writeln!(
                    err,
                    "\x1b[2K{name:>10} [{}{}] {:>5.1}% {:>8.1} MB  {} peers",
                    "#".repeat(filled),
                    " ".repeat(30 - filled.min(30)),
                    frac * 100.0,
                    *have as f64 / 1e6,
                    p.peers
                );
            }
            drawn = p.artifacts.len();
        } else if last.elapsed() >= every || done {
            last = Instant::now();
            let parts: Vec<String> = p
                .artifacts
                .iter()
                .map(|(n, h, s)| format!("{n} {h}/{s}"))
                .collect();
            let _ = writeln!(
                err,
                "plasmd fetch: {:.1} s: {}/{} chunks, {}, {} peers",
                start.elapsed().as_secs_f64(),
                p.held,
                p.total,
                parts.join(", "),
                p.peers
            );
        }
        if done {
            return;
        }
    }
}
