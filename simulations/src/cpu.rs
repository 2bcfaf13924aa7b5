//! Whole-machine CPU use during a run, from `/proc/stat`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

fn read() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((v.iter().sum(), idle))
}

/// CPU use over a run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuUse {
    /// Mean busy fraction of all cores, 0..1.
    pub mean: f64,
    /// Busiest 1 s window, 0..1.
    pub peak: f64,
    /// CPU-seconds spent over the run, all cores together (busy ticks of
    /// `/proc/stat` at USER_HZ = 100). Unlike `mean`, this does not grow
    /// when the same work finishes sooner: compare modes by it.
    pub core_s: f64,
}

impl CpuUse {
    /// The run was CPU-bound rather than link-bound.
    pub fn saturated(&self) -> bool {
        self.mean > 0.85
    }
}

/// Samples CPU use once a second until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<CpuUse>,
}

impl Sampler {
    /// Starts sampling.
    pub fn start() -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let first = read().unwrap_or((0, 0));
            let mut prev = first;
            let mut peak = 0.0f64;
            while !s.load(Ordering::Relaxed) {
                std::thread::park_timeout(Duration::from_secs(1));
                if let Some(now) = read() {
                    let (dt, di) = (now.0.saturating_sub(prev.0), now.1.saturating_sub(prev.1));
                    // A window cut short by the stop is no peak.
                    if dt > 0 && !s.load(Ordering::Relaxed) {
                        peak = peak.max(1.0 - di as f64 / dt as f64);
                    }
                    prev = now;
                }
            }
            let (dt, di) = (
                prev.0.saturating_sub(first.0),
                prev.1.saturating_sub(first.1),
            );
            CpuUse {
                mean: if dt > 0 {
                    1.0 - di as f64 / dt as f64
                } else {
                    0.0
                },
                peak,
                // USER_HZ is 100 in every Linux ABI.
                core_s: dt.saturating_sub(di) as f64 / 100.0,
            }
        });
        Sampler { stop, handle }
    }

    /// Stops and returns the figures.
    pub fn finish(self) -> CpuUse {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        self.handle.join().unwrap_or_default()
    }
}
