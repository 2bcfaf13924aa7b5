//! Super-seeding: how a node that holds every chunk spreads its upload.
//!
//! In a cold storm every fetcher asks the seed first, and rarest-first on
//! stale have-maps makes many of them ask for the same chunks: the seed then
//! sends some chunks many times while others are still missing from the swarm,
//! and its upload (the one scarce resource at the start) is wasted on copies
//! peers could have served. A complete node therefore offers only the chunks it
//! has sent least (BitTorrent's super-seeding, done through have-maps and
//! "do not have" answers): each chunk leaves the seed about once before any
//! leaves twice, and fetchers get the rest from each other. A node that is
//! still fetching serves whatever it holds.
//!
//! ```
//! use phase_swarm::superseed::SendCounts;
//! let mut s = SendCounts::new(3);
//! assert!(s.offer(0) && s.offer(1));
//! s.record(0);
//! assert!(!s.offer(0), "sent once while others were never sent");
//! s.record(1);
//! s.record(2);
//! assert!(s.offer(0), "every chunk sent once: all on offer again");
//! assert_eq!(s.offer_map(), vec![true, true, true]);
//! ```

/// Per-chunk send counts of a complete node, and which chunks it offers.
#[derive(Debug, Clone)]
pub struct SendCounts {
    counts: Vec<u32>,
    min: u32,
    at_min: usize,
}

impl SendCounts {
    /// Nothing sent yet, every chunk on offer.
    pub fn new(chunks: usize) -> Self {
        SendCounts {
            counts: vec![0; chunks],
            min: 0,
            at_min: chunks,
        }
    }

    /// Chunks counted (the manifest's chunk count).
    pub fn chunks(&self) -> usize {
        self.counts.len()
    }

    /// Whether chunk `i` is offered: it has been sent no more than the least-sent chunk.
    pub fn offer(&self, i: usize) -> bool {
        self.counts.get(i).is_some_and(|&c| c <= self.min)
    }

    /// The have-map a complete node advertises.
    pub fn offer_map(&self) -> Vec<bool> {
        self.counts.iter().map(|&c| c <= self.min).collect()
    }

    /// How many times every chunk has been sent at least. It rises when the
    /// last least-sent chunk goes out, which puts every chunk back on offer.
    pub fn round(&self) -> u32 {
        self.min
    }

    /// Chunk `i` was sent once more. True when that raised the round (every
    /// chunk is on offer again, so a node that withdrew chunks re-announces them).
    pub fn record(&mut self, i: usize) -> bool {
        let Some(c) = self.counts.get_mut(i) else {
            return false;
        };
        *c = c.saturating_add(1);
        if *c == self.min + 1 {
            self.at_min -= 1;
            if self.at_min == 0 {
                self.min += 1;
                let min = self.min;
                self.at_min = self.counts.iter().filter(|&&c| c == min).count();
                return true;
            }
        }
        false
    }

    /// A send recorded for chunk `i` did not go out (the session ended
    /// first): it is taken back, so a copy the swarm never got does not keep
    /// the chunk off offer. True when that put chunk `i` back on offer.
    pub fn unrecord(&mut self, i: usize) -> bool {
        let Some(c) = self.counts.get_mut(i) else {
            return false;
        };
        if *c == 0 {
            return false;
        }
        *c -= 1;
        if *c == self.min {
            self.at_min += 1;
            true
        } else if *c < self.min {
            // It was on offer already, and is now the least-sent alone: the
            // round falls back to it and every other chunk leaves the offer.
            self.min = *c;
            self.at_min = 1;
            false
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn offers_exactly_the_least_sent(sends in proptest::collection::vec(0usize..8, 0..200)) {
            let mut s = SendCounts::new(8);
            let mut counts = [0u32; 8];
            for i in sends {
                s.record(i);
                counts[i] += 1;
                let min = *counts.iter().min().unwrap();
                for (j, c) in counts.iter().enumerate() {
                    prop_assert_eq!(s.offer(j), *c == min);
                }
            }
        }

        /// Sends and sends taken back in any order: the offer is always
        /// exactly the least-sent chunks, and the round their count.
        #[test]
        fn taking_sends_back_keeps_the_offer_exact(
            ops in proptest::collection::vec((any::<bool>(), 0usize..6), 0..300),
        ) {
            let mut s = SendCounts::new(6);
            let mut counts = [0u32; 6];
            for (send, i) in ops {
                let before = s.round();
                if send {
                    let rose = s.record(i);
                    counts[i] += 1;
                    prop_assert_eq!(rose, s.round() > before);
                } else if counts[i] > 0 {
                    let was = s.offer(i);
                    let back = s.unrecord(i);
                    counts[i] -= 1;
                    prop_assert_eq!(back, !was && s.offer(i));
                } else {
                    prop_assert!(!s.unrecord(i));
                }
                let min = *counts.iter().min().unwrap();
                prop_assert_eq!(s.round(), min);
                for (j, c) in counts.iter().enumerate() {
                    prop_assert_eq!(s.offer(j), *c == min);
                }
            }
        }
    }

    #[test]
    fn empty_and_out_of_range() {
        let mut s = SendCounts::new(0);
        s.record(3);
        assert!(!s.offer(0));
        assert!(s.offer_map().is_empty());
    }
}
