//! Max-min fair sharing of links among flows (progressive filling), the
//! rates TCP flows converge to when their bottlenecks are access links.
//!
//! Every flow crosses two links (in the simulator: its sender's upload and
//! its receiver's download). Progressive filling raises all rates together;
//! the link that fills first (the smallest remaining capacity over its
//! unfrozen flows) freezes its flows at that share, its capacity is taken
//! off the other links those flows cross, and the filling goes on with the
//! rest. The result is the unique max-min fair allocation: no flow can get
//! more without taking from a flow that has no more than it.
//!
//! ```
//! use simulations::fair::max_min_rates;
//! // One uploader (link 0, 10) to two receivers (links 1 and 2, down 2 and 100).
//! let r = max_min_rates(&[10.0, 2.0, 100.0], &[(0, 1), (0, 2)]);
//! assert!((r[0] - 2.0).abs() < 1e-9 && (r[1] - 8.0).abs() < 1e-9);
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Progressive filling with reusable buffers: `O(F log F)` for `F` flows.
#[derive(Debug, Default)]
pub struct WaterFill {
    /// Per link: capacity not yet given to frozen flows.
    rem: Vec<f64>,
    /// Per link: flows on it not yet frozen.
    left: Vec<u32>,
    /// Per link: where the next of its flows goes in `adj` (while building it).
    cursor: Vec<u32>,
    /// Links' flows, compressed: link `l`'s are `adj[start[l]..start[l + 1]]`.
    start: Vec<u32>,
    adj: Vec<u32>,
    rates: Vec<f64>,
    frozen: Vec<bool>,
    /// Links by their share, one entry each (a key may be stale: too low).
    heap: BinaryHeap<Reverse<(u64, u32)>>,
}

/// A non-negative share as a key that sorts like the number.
fn key(share: f64) -> u64 {
    share.max(0.0).to_bits()
}

impl WaterFill {
    /// The max-min fair rates of `flows`, each crossing the two links it
    /// names (indices into `caps`, the links' capacities; the two differ).
    /// A flow's rate is at `rates()[i]` in the order given.
    pub fn fill(&mut self, caps: &[f64], flows: &[(u32, u32)]) -> &[f64] {
        let (nl, nf) = (caps.len(), flows.len());
        self.left.clear();
        self.left.resize(nl, 0);
        for &(a, b) in flows {
            debug_assert_ne!(a, b, "a flow crosses two different links");
            self.left[a as usize] += 1;
            self.left[b as usize] += 1;
        }
        self.start.clear();
        self.start.push(0);
        let mut at = 0;
        for &d in &self.left {
            at += d;
            self.start.push(at);
        }
        self.adj.clear();
        self.adj.resize(2 * nf, 0);
        self.cursor.clear();
        self.cursor.extend_from_slice(&self.start[..nl]);
        for (i, &(a, b)) in flows.iter().enumerate() {
            for l in [a, b] {
                let c = &mut self.cursor[l as usize];
                self.adj[*c as usize] = i as u32;
                *c += 1;
            }
        }
        self.rem.clear();
        self.rem.extend_from_slice(caps);
        self.rates.clear();
        self.rates.resize(nf, 0.0);
        self.frozen.clear();
        self.frozen.resize(nf, false);
        self.heap.clear();
        for l in 0..nl {
            if self.left[l] > 0 {
                let share = self.rem[l] / f64::from(self.left[l]);
                self.heap.push(Reverse((key(share), l as u32)));
            }
        }
        // A link's share only grows as other links freeze flows it holds
        // (each takes at most the link's share), so an entry's key is a lower
        // bound: when a link comes up with a stale key it goes back in with
        // its share now.
        while let Some(Reverse((k, l))) = self.heap.pop() {
            let l = l as usize;
            if self.left[l] == 0 {
                continue;
            }
            let share = (self.rem[l] / f64::from(self.left[l])).max(0.0);
            if key(share) > k {
                self.heap.push(Reverse((key(share), l as u32)));
                continue;
            }
            // The tightest link: its unfrozen flows get its equal share.
            for j in self.start[l]..self.start[l + 1] {
                let i = self.adj[j as usize] as usize;
                if self.frozen[i] {
                    continue;
                }
                self.frozen[i] = true;
                self.rates[i] = share;
                let (a, b) = flows[i];
                let o = if a as usize == l { b } else { a } as usize;
                self.rem[o] = (self.rem[o] - share).max(0.0);
                self.left[o] -= 1;
            }
            self.left[l] = 0;
            self.rem[l] = 0.0;
        }
        &self.rates
    }
}

/// [`WaterFill::fill`] with fresh buffers.
pub fn max_min_rates(caps: &[f64], flows: &[(u32, u32)]) -> Vec<f64> {
    WaterFill::default().fill(caps, flows).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn one_uploader_two_receivers() {
        // Up 10 (link 0); downs 2 and 100: the slow receiver's spare goes to the other.
        let r = max_min_rates(&[10.0, 2.0, 100.0], &[(0, 1), (0, 2)]);
        assert!(close(r[0], 2.0) && close(r[1], 8.0), "{r:?}");
    }

    #[test]
    fn one_receiver_two_senders() {
        // Ups 1 and 50 (links 0, 1), down 20 (link 2).
        let r = max_min_rates(&[1.0, 50.0, 20.0], &[(0, 2), (1, 2)]);
        assert!(close(r[0], 1.0) && close(r[1], 19.0), "{r:?}");
    }

    #[test]
    fn equal_split_when_one_link_binds_all() {
        let r = max_min_rates(&[9.0, 100.0, 100.0, 100.0], &[(0, 1), (0, 2), (0, 3)]);
        assert!(r.iter().all(|&x| close(x, 3.0)), "{r:?}");
        assert!(max_min_rates(&[5.0], &[]).is_empty());
    }

    #[test]
    fn spare_capacity_travels_along_a_chain() {
        // Links: u0 = 0 (cap 6), u1 = 1 (cap 10), d0 = 2 (cap 1), d1 = 3 (cap 10).
        // u0 -> d0, u0 -> d1, u1 -> d1: d0 binds at 1, u0 gives 5 to d1,
        // which has 5 left for u1's flow.
        let r = max_min_rates(&[6.0, 10.0, 1.0, 10.0], &[(0, 2), (0, 3), (1, 3)]);
        assert!(
            close(r[0], 1.0) && close(r[1], 5.0) && close(r[2], 5.0),
            "{r:?}"
        );
    }

    /// Feasible (no link over capacity) and max-min fair: every flow crosses
    /// a saturated link on which no other flow gets more than it (its
    /// bottleneck), so it cannot be raised without lowering a flow that has
    /// no more than it.
    fn check(caps: &[f64], flows: &[(u32, u32)], r: &[f64]) {
        let mut used = vec![0.0; caps.len()];
        let mut most = vec![0.0f64; caps.len()];
        for (&(a, b), &x) in flows.iter().zip(r) {
            assert!(x >= 0.0 && x.is_finite());
            for l in [a as usize, b as usize] {
                used[l] += x;
                most[l] = most[l].max(x);
            }
        }
        for (l, (&u, &c)) in used.iter().zip(caps).enumerate() {
            assert!(u <= c * (1.0 + 1e-9) + 1e-9, "link {l} over: {u} > {c}");
        }
        for (i, (&(a, b), &x)) in flows.iter().zip(r).enumerate() {
            let bottleneck = [a as usize, b as usize]
                .iter()
                .any(|&l| close(used[l], caps[l]) && most[l] <= x * (1.0 + 1e-9) + 1e-12);
            assert!(
                bottleneck,
                "flow {i} ({a}->{b}) at {x} could be raised: {caps:?} {flows:?} {r:?}"
            );
        }
    }

    #[test]
    fn random_instances_are_feasible_and_max_min_fair() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut wf = WaterFill::default();
        for _ in 0..2000 {
            // Hosts with an upload (link 2h) and a download (link 2h + 1).
            let hosts = rng.gen_range(2..8u32);
            let caps: Vec<f64> = (0..2 * hosts)
                .map(|_| {
                    if rng.gen_bool(0.3) {
                        10.0
                    } else {
                        rng.gen_range(0.5..50.0)
                    }
                })
                .collect();
            let nf = rng.gen_range(0..20);
            let flows: Vec<(u32, u32)> = (0..nf)
                .map(|_| {
                    let s = rng.gen_range(0..hosts);
                    let mut t = rng.gen_range(0..hosts - 1);
                    if t >= s {
                        t += 1;
                    }
                    (2 * s, 2 * t + 1)
                })
                .collect();
            let r = wf.fill(&caps, &flows).to_vec();
            check(&caps, &flows, &r);
            assert_eq!(r, max_min_rates(&caps, &flows), "buffers reused cleanly");
        }
    }
}
