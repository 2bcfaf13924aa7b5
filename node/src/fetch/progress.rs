//! Progress of `plasmd fetch`: one bar per artifact on a terminal (bytes,
//! rate, ETA, peers; drawn by `indicatif`), plain periodic lines otherwise.

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use phase_swarm::FetchProgress;
use tokio::sync::watch;

/// How often a terminal is redrawn.
const TTY_EVERY: Duration = Duration::from_millis(200);

/// Shows progress until the sender is dropped or every chunk is held.
pub(crate) async fn show(rx: watch::Receiver<FetchProgress>, tty: bool, plain_every: Duration) {
    if tty {
        bars(rx).await
    } else {
        lines(rx, plain_every).await
    }
}

async fn bars(mut rx: watch::Receiver<FetchProgress>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} ETA {eta:>4} {msg}",
    )
    .map(|s| s.progress_chars("#>-"))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut bars: Vec<ProgressBar> = Vec::new();
    loop {
        let changed = tokio::time::timeout(TTY_EVERY, rx.changed()).await;
        if let Ok(Err(_)) = changed {
            break;
        }
        let p = rx.borrow_and_update().clone();
        if p.total == 0 {
            continue;
        }
        if bars.is_empty() {
            for (name, _, size) in &p.artifacts {
                let b = multi.add(ProgressBar::new(*size).with_style(style.clone()));
                b.set_prefix(name.clone());
                bars.push(b);
            }
        }
        for (b, (_, have, _)) in bars.iter().zip(&p.artifacts) {
            b.set_position(*have);
            b.set_message(format!("{} peers", p.peers));
        }
        if p.held == p.total {
            break;
        }
    }
    for b in &bars {
        b.finish();
    }
}

async fn lines(mut rx: watch::Receiver<FetchProgress>, every: Duration) {
    let start = Instant::now();
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
        if last.elapsed() >= every || done {
            last = Instant::now();
            let parts: Vec<String> = p
                .artifacts
                .iter()
                .map(|(n, h, s)| format!("{n} {h}/{s}"))
                .collect();
            let _ = writeln!(
                std::io::stderr().lock(),
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
