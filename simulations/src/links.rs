//! Where a real storm's time goes: every host's bytes sent and received,
//! sampled from the hub namespace's veth counters while the storm runs, and
//! summarised in the same terms as `sim --trace` (upload use, download use,
//! starved nodes, seed copies) so the two can be read side by side.
//!
//! The hub-side end of a host's veth receives what the host sends (its
//! upload) and transmits what the host receives (its download), so one read
//! of the hub's `/proc/net/dev` gives every host's counters at one instant.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::sh;

/// How often the counters are read: fine enough to see a 0.1 s chunk
/// transfer's worth of idling, coarse enough that the `ip netns exec` per
/// read stays far below 1 % of a core.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// One reading of every host's counters.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Since the storm started.
    pub t: Duration,
    /// Per host (the seed first, then the nodes in order): bytes sent so far.
    pub sent: Vec<u64>,
    /// Per host: bytes received so far.
    pub received: Vec<u64>,
}

/// Parses `/proc/net/dev` into interface -> (rx_bytes, tx_bytes).
pub fn parse_net_dev(text: &str) -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes ...
        if v.len() >= 9 {
            out.insert(name.trim().to_owned(), (v[0], v[8]));
        }
    }
    out
}

fn read(hub: &str, ifs: &[String]) -> Option<(Vec<u64>, Vec<u64>)> {
    let text = sh(&["ip", "netns", "exec", hub, "cat", "/proc/net/dev"]).ok()?;
    let dev = parse_net_dev(&text);
    let mut sent = Vec::with_capacity(ifs.len());
    let mut received = Vec::with_capacity(ifs.len());
    for i in ifs {
        let &(rx, tx) = dev.get(i)?;
        sent.push(rx);
        received.push(tx);
    }
    Some((sent, received))
}

/// Reads the counters every [`SAMPLE_EVERY`] until stopped.
pub struct LinkSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Reading>>,
}

impl LinkSampler {
    /// Starts reading the hub-side interfaces `ifs` (seed first) in `hub`;
    /// `t0` is the storm's start. At most `limit` readings are kept (the
    /// storm's timeout bounds a run; this bounds the memory whatever it is).
    pub fn start(hub: String, ifs: Vec<String>, t0: Instant, limit: usize) -> LinkSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) && out.len() < limit {
                if let Some((sent, received)) = read(&hub, &ifs) {
                    out.push(Reading {
                        t: t0.elapsed(),
                        sent,
                        received,
                    });
                }
                std::thread::park_timeout(SAMPLE_EVERY);
            }
            if let Some((sent, received)) = read(&hub, &ifs) {
                out.push(Reading {
                    t: t0.elapsed(),
                    sent,
                    received,
                });
            }
            out
        });
        LinkSampler { stop, handle }
    }

    /// Stops and returns the readings.
    pub fn finish(self) -> Vec<Reading> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        self.handle.join().unwrap_or_default()
    }
}

/// A storm's state over one interval, in the simulator's terms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Interval {
    /// End of the interval, seconds since the start.
    pub t: f64,
    /// Nodes done by then, fraction of all.
    pub done: f64,
    /// Bytes the seed sent so far over the artifact size.
    pub seed_copies: f64,
    /// Bytes all hosts sent in the interval over what their links could send.
    pub upload_use: f64,
    /// Bytes the nodes still fetching received over what their links could take.
    pub download_use: f64,
    /// Nodes still fetching that received under a tenth of their link.
    pub starved: f64,
    /// Nodes (fetching or done) that sent under a tenth of their link.
    pub idle_uploaders: f64,
}

/// Summarises `readings` into intervals of about `every`: `up_bps` per host
/// (seed first), `down_bps` per node, `done_s` per node (None: never),
/// `artifact` bytes.
pub fn intervals(
    readings: &[Reading],
    every: Duration,
    up_bps: &[f64],
    down_bps: f64,
    done_s: &[Option<f64>],
    artifact: u64,
) -> Vec<Interval> {
    let mut out = Vec::new();
    let Some(first) = readings.first() else {
        return out;
    };
    let mut prev = first;
    for (k, r) in readings.iter().enumerate().skip(1) {
        let last = k + 1 == readings.len();
        if r.t.saturating_sub(prev.t) < every && !last {
            continue;
        }
        let dt = r.t.saturating_sub(prev.t).as_secs_f64();
        if dt <= 0.0 {
            continue;
        }
        let t = r.t.as_secs_f64();
        let sent: f64 = r
            .sent
            .iter()
            .zip(&prev.sent)
            .map(|(a, b)| a.saturating_sub(*b) as f64 * 8.0)
            .sum();
        let cap: f64 = up_bps.iter().sum::<f64>() * dt;
        // Nodes fetching for the whole interval: received bytes count against
        // their link; a node that finished inside it would dilute the figure.
        let (mut got, mut fetching, mut starved) = (0.0, 0usize, 0usize);
        for (i, done) in done_s.iter().enumerate() {
            if done.is_some_and(|d| d <= t) {
                continue;
            }
            let rx = r.received[i + 1].saturating_sub(prev.received[i + 1]) as f64 * 8.0;
            fetching += 1;
            got += rx;
            starved += usize::from(rx < 0.1 * down_bps * dt);
        }
        let n = done_s.len().max(1) as f64;
        let idle = (1..r.sent.len())
            .filter(|&i| {
                let tx = r.sent[i].saturating_sub(prev.sent[i]) as f64 * 8.0;
                tx < 0.1 * up_bps[i] * dt
            })
            .count();
        out.push(Interval {
            idle_uploaders: idle as f64 / n,
            t,
            done: done_s.iter().filter(|d| d.is_some_and(|d| d <= t)).count() as f64 / n,
            seed_copies: r.sent[0].saturating_sub(first.sent[0]) as f64 / artifact.max(1) as f64,
            upload_use: if cap > 0.0 { sent / cap } else { 0.0 },
            download_use: if fetching > 0 {
                got / (fetching as f64 * down_bps * dt)
            } else {
                0.0
            },
            starved: if fetching > 0 {
                starved as f64 / fetching as f64
            } else {
                0.0
            },
        });
        prev = r;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n    \
v1: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n";
        let d = parse_net_dev(text);
        assert_eq!(d["v1"], (1000, 2000));
        assert_eq!(d["lo"], (0, 0));
    }

    #[test]
    fn intervals_measure_use_against_the_links() {
        let s = |t: u64, sent: Vec<u64>, received: Vec<u64>| Reading {
            t: Duration::from_millis(t),
            sent,
            received,
        };
        // Seed and two nodes at 8 kbit/s (1,000 bytes/s): in the first second
        // the seed sends 1,000 bytes to node 1 only; node 2 finished at 0.5 s.
        let r = vec![
            s(0, vec![0, 0, 0], vec![0, 0, 0]),
            s(1000, vec![1000, 0, 0], vec![0, 1000, 0]),
        ];
        let iv = intervals(
            &r,
            Duration::from_millis(500),
            &[8000.0; 3],
            8000.0,
            &[None, Some(0.5)],
            2000,
        );
        assert_eq!(iv.len(), 1);
        let i = &iv[0];
        assert!((i.upload_use - 1.0 / 3.0).abs() < 1e-9, "{i:?}");
        assert!((i.download_use - 1.0).abs() < 1e-9, "{i:?}");
        assert!((i.seed_copies - 0.5).abs() < 1e-9);
        assert!((i.done - 0.5).abs() < 1e-9);
        assert_eq!(i.starved, 0.0);
        assert!(
            (i.idle_uploaders - 1.0).abs() < 1e-9,
            "neither node sent: {i:?}"
        );
    }
}
