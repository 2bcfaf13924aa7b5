//! Where a swarm storm's chunks wait, from the chunk events its `plasmd`
//! processes log (`phase_swarm::CHUNK_EVENT_MARK`; `storm --trace` turns them
//! on). The link counters of [`crate::links`] say how busy the links were;
//! these say why they were not busier:
//! - **lag**: chunks some node holds minus the chunks the mean node holds.
//!   The seed and every node's link run at the same rate here, so a lag built
//!   up early is never made up: it is the tail after the seed's last new
//!   chunk.
//! - **to first ask**: from a node verifying a chunk to the first request
//!   another node sends it for that chunk (how long a fresh chunk sits
//!   unasked: the have-map pull or the pushed HAVE, and the asker's queue).
//!   Requests sent after the node asked for the chunk itself count, so a
//!   promised chunk (asked for before it arrived) gives a negative wait.
//! - **ask to got**: from a request to the chunk verified at the asker (the
//!   request's way there, the wait for an upload slot, the transfer).
//!
//! Each figure is the median over the events of one interval, by the time of
//! the event that starts it (the verify, the request).

use std::collections::HashMap;

use serde::Serialize;

/// One process's lines: seconds since the storm's start, and the text.
pub type Lines = Vec<(f64, String)>;

/// One interval of the chunk events.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HopInterval {
    /// End of the interval, seconds since the storm's start.
    pub t: f64,
    /// Chunks at least one node holds by `t`.
    pub anywhere: usize,
    /// Chunks the mean node holds by `t`.
    pub held_mean: f64,
    /// Median seconds from a node verifying a chunk in this interval to
    /// the first request for it to that node, sent after the node asked for
    /// it itself (negative: asked before it arrived; None: no such pair).
    pub to_first_ask_s: Option<f64>,
    /// Median seconds from a request sent in this interval to that chunk
    /// verified from that peer (None: none answered).
    pub ask_to_got_s: Option<f64>,
}

/// Over the whole run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HopSummary {
    /// When the seed started the upload of the last chunk it had not sent
    /// before (the end of its first round), seconds since the start.
    pub seed_last_new_s: Option<f64>,
    /// When the last node had every chunk.
    pub last_done_s: Option<f64>,
    /// Medians over the run, as in [`HopInterval`].
    pub to_first_ask_s: Option<f64>,
    /// See [`HopInterval::ask_to_got_s`].
    pub ask_to_got_s: Option<f64>,
    /// Median seconds from a request to the holder starting that upload
    /// (waiting for a promised chunk or an upload slot, and the request's
    /// own trip), over the requests answered with the chunk.
    pub ask_to_serve_s: Option<f64>,
    /// Median seconds from the upload's start to the chunk verified at the
    /// asker (the bytes' trip through the queues and links).
    pub serve_to_got_s: Option<f64>,
    /// Answers other than a chunk: busy, do-not-have, failed.
    pub busy: usize,
    /// See [`HopSummary::busy`].
    pub do_not_have: usize,
    /// See [`HopSummary::busy`].
    pub failed: usize,
    /// Have-maps pulled (requests sent), over all nodes.
    pub map_pulls: usize,
    /// Have-maps that came with a chunk, over all nodes.
    pub maps_with_chunks: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Me,
    Req,
    Got,
    Busy,
    Dnh,
    Fail,
    Serve,
    Done,
    Pull,
    Map,
}

/// (kind, peer, chunk) from a line holding the mark.
fn parse(line: &str) -> Option<(Kind, &str, u32)> {
    let (_, rest) = line.split_once(phase_swarm::CHUNK_EVENT_MARK)?;
    let mut it = rest.split_whitespace();
    let kind = match it.next()? {
        "me" => Kind::Me,
        "req" => Kind::Req,
        "got" => Kind::Got,
        "busy" => Kind::Busy,
        "dnh" => Kind::Dnh,
        "fail" => Kind::Fail,
        "serve" => Kind::Serve,
        "done" => Kind::Done,
        "pull" => Kind::Pull,
        "map" => Kind::Map,
        _ => return None,
    };
    let peer = it.next()?;
    let chunk = it.next()?.parse().ok()?;
    Some((kind, peer, chunk))
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The intervals (every `every` seconds up to the last event) and the
/// summary, from the seed's lines and each node's.
pub fn analyse<'a>(
    seed: &'a Lines,
    nodes: &'a [Lines],
    every: f64,
) -> (Vec<HopInterval>, HopSummary) {
    // Peer id -> node index, from each node's "me" line.
    let mut who: HashMap<&str, usize> = HashMap::new();
    for (i, lines) in nodes.iter().enumerate() {
        for (_, l) in lines {
            if let Some((Kind::Me, id, _)) = parse(l) {
                who.insert(id, i);
            }
        }
    }
    // (holder id, asker id, chunk) -> when the holder started the upload.
    let me_of = |lines: &'a Lines| {
        lines.iter().find_map(|(_, l)| match parse(l) {
            Some((Kind::Me, id, _)) => Some(id),
            _ => None,
        })
    };
    let mut serves: HashMap<(&str, &str, u32), f64> = HashMap::new();
    for lines in nodes.iter().chain(std::iter::once(seed)) {
        let Some(holder) = me_of(lines) else { continue };
        for (t, l) in lines {
            if let Some((Kind::Serve, asker, chunk)) = parse(l) {
                serves.entry((holder, asker, chunk)).or_insert(*t);
            }
        }
    }
    let mut ask_to_serve: Vec<f64> = Vec::new();
    let mut serve_to_got: Vec<f64> = Vec::new();
    let mut got: HashMap<(usize, u32), f64> = HashMap::new();
    // (node, chunk) -> when the node first asked anyone for it.
    let mut own_ask: HashMap<(usize, u32), f64> = HashMap::new();
    let mut first_got: HashMap<u32, f64> = HashMap::new();
    // (asked node, chunk) -> times it was asked.
    let mut asked: HashMap<(usize, u32), Vec<f64>> = HashMap::new();
    let mut ask_to_got: Vec<(f64, f64)> = Vec::new();
    let mut got_times: Vec<f64> = Vec::new();
    let (mut busy, mut dnh, mut failed) = (0, 0, 0);
    let (mut pulls, mut maps) = (0, 0);
    let mut last_done: Option<f64> = None;
    let mut end = 0.0f64;
    for (i, lines) in nodes.iter().enumerate() {
        let mut open: HashMap<(&str, u32), f64> = HashMap::new();
        for (t, l) in lines {
            let Some((kind, peer, chunk)) = parse(l) else {
                continue;
            };
            end = end.max(*t);
            match kind {
                Kind::Req => {
                    open.insert((peer, chunk), *t);
                    own_ask.entry((i, chunk)).or_insert(*t);
                    if let Some(&j) = who.get(peer) {
                        asked.entry((j, chunk)).or_default().push(*t);
                    }
                }
                Kind::Got => {
                    let at = open.remove(&(peer, chunk));
                    // A second copy (an end-game duplicate, or one a v2
                    // node cancelled and reports as answered) is no get.
                    if got.contains_key(&(i, chunk)) {
                        continue;
                    }
                    got.insert((i, chunk), *t);
                    got_times.push(*t);
                    let f = first_got.entry(chunk).or_insert(*t);
                    *f = f.min(*t);
                    if let Some(at) = at {
                        ask_to_got.push((at, t - at));
                        let me = me_of(lines).unwrap_or("");
                        if let Some(&ts) = serves.get(&(peer, me, chunk))
                            && ts >= at
                            && ts <= *t
                        {
                            ask_to_serve.push(ts - at);
                            serve_to_got.push(t - ts);
                        }
                    }
                }
                Kind::Busy | Kind::Dnh | Kind::Fail => {
                    open.remove(&(peer, chunk));
                    match kind {
                        Kind::Busy => busy += 1,
                        Kind::Dnh => dnh += 1,
                        _ => failed += 1,
                    }
                }
                Kind::Done => last_done = Some(last_done.unwrap_or(0.0).max(*t)),
                Kind::Pull => pulls += 1,
                Kind::Map => maps += 1,
                Kind::Me | Kind::Serve => {}
            }
        }
    }
    // A fresh chunk's wait for its first ask.
    let mut to_first: Vec<(f64, f64)> = Vec::new();
    for (&(i, chunk), &t) in &got {
        let from = own_ask.get(&(i, chunk)).copied().unwrap_or(t).min(t);
        let first = asked.get(&(i, chunk)).and_then(|ts| {
            ts.iter()
                .copied()
                .filter(|&a| a >= from)
                .min_by(f64::total_cmp)
        });
        if let Some(a) = first {
            to_first.push((t, a - t));
        }
    }
    let mut seed_first: HashMap<u32, f64> = HashMap::new();
    for (t, l) in seed {
        if let Some((Kind::Serve, _, chunk)) = parse(l) {
            seed_first.entry(chunk).or_insert(*t);
        }
    }
    let seed_last_new_s = seed_first.values().copied().max_by(f64::total_cmp);

    let mut firsts: Vec<f64> = first_got.values().copied().collect();
    firsts.sort_by(f64::total_cmp);
    got_times.sort_by(f64::total_cmp);
    let n = nodes.len().max(1) as f64;
    let mut out = Vec::new();
    let mut k = 1usize;
    while every > 0.0 && !got_times.is_empty() {
        let (lo, hi) = ((k - 1) as f64 * every, k as f64 * every);
        let in_bin = |v: &[(f64, f64)]| -> Vec<f64> {
            v.iter()
                .filter(|(s, _)| *s >= lo && *s < hi)
                .map(|(_, d)| *d)
                .collect()
        };
        out.push(HopInterval {
            t: hi,
            anywhere: firsts.partition_point(|&x| x < hi),
            held_mean: got_times.partition_point(|&x| x < hi) as f64 / n,
            to_first_ask_s: median(&mut in_bin(&to_first)),
            ask_to_got_s: median(&mut in_bin(&ask_to_got)),
        });
        if hi > end {
            break;
        }
        k += 1;
    }
    let all = |v: &[(f64, f64)]| median(&mut v.iter().map(|(_, d)| *d).collect::<Vec<_>>());
    let summary = HopSummary {
        seed_last_new_s,
        last_done_s: last_done,
        to_first_ask_s: all(&to_first),
        ask_to_got_s: all(&ask_to_got),
        ask_to_serve_s: median(&mut ask_to_serve),
        serve_to_got_s: median(&mut serve_to_got),
        busy,
        do_not_have: dnh,
        failed,
        map_pulls: pulls,
        maps_with_chunks: maps,
    };
    (out, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: f64, s: &str) -> (f64, String) {
        (t, format!("2026-12-07T00:00:00Z DEBUG x: chunk-event {s}"))
    }

    /// The seed sends chunk 0 to node A; B asks A, which answers at once;
    /// A and B are done. Every figure follows from the times given.
    #[test]
    fn two_nodes_one_chunk_relayed() {
        let seed = vec![
            ev(0.1, "me S 0"),
            ev(0.1, "serve A 0"),
            ev(0.2, "serve A 1"),
        ];
        let a = vec![
            ev(0.0, "me A 0"),
            ev(0.05, "req S 0"),
            ev(0.3, "got S 0"),
            ev(0.31, "req S 1"),
            ev(0.6, "got S 1"),
            ev(0.6, "done - 0"),
        ];
        let b = vec![
            ev(0.0, "me B 0"),
            ev(0.2, "req S 0"),
            ev(0.25, "dnh S 0"),
            ev(0.45, "req A 0"),
            ev(0.7, "got A 0"),
            ev(0.75, "req A 1"),
            ev(0.95, "got A 1"),
            ev(0.95, "done - 0"),
            ev(0.96, "got S 1"),
        ];
        let (iv, s) = analyse(&seed, &[a, b], 0.5);
        assert_eq!(iv.len(), 2);
        assert_eq!(iv[0].anywhere, 1, "chunk 0 at A by 0.3");
        assert_eq!(iv[0].held_mean, 0.5);
        assert_eq!(iv[1].anywhere, 2);
        assert_eq!(iv[1].held_mean, 2.0);
        // A got chunk 0 at 0.3, B asked A for it at 0.45; chunk 1 at 0.6,
        // asked at 0.75.
        let close = |x: Option<f64>, y: f64| x.is_some_and(|x| (x - y).abs() < 1e-9);
        assert!(close(iv[0].to_first_ask_s, 0.15), "{:?}", iv[0]);
        assert!(close(iv[1].to_first_ask_s, 0.15), "{:?}", iv[1]);
        // Asks in [0, 0.5): 0.25 (A, chunk 0), 0.29 (A, chunk 1), 0.25
        // (B from A); B's refused ask counts nowhere. Median 0.25.
        assert!(close(iv[0].ask_to_got_s, 0.25), "{:?}", iv[0]);
        assert!(close(s.seed_last_new_s, 0.2));
        assert!(close(s.last_done_s, 0.95));
        assert_eq!((s.busy, s.do_not_have, s.failed), (0, 1, 0));
        // Only A's ask for chunk 0 has the upload it got (the seed's at
        // 0.1; chunk 1's upload started before A's logged ask).
        assert!(close(s.ask_to_serve_s, 0.05), "{s:?}");
        assert!(close(s.serve_to_got_s, 0.2), "{s:?}");
    }

    /// B asks A for a chunk A has asked the seed for and not yet got (a
    /// promise): the wait is negative.
    #[test]
    fn a_promised_chunk_is_asked_before_it_arrives() {
        let a = vec![ev(0.0, "me A 0"), ev(0.1, "req S 0"), ev(0.4, "got S 0")];
        let b = vec![ev(0.0, "me B 0"), ev(0.2, "req A 0"), ev(0.5, "got A 0")];
        let (iv, _) = analyse(&Vec::new(), &[a, b], 1.0);
        let w = iv[0].to_first_ask_s.unwrap();
        assert!((w + 0.2).abs() < 1e-9, "asked 0.2 s before it arrived: {w}");
        // An ask before A asked anyone is no promise and does not count.
        let a = vec![ev(0.0, "me A 0"), ev(0.3, "req S 0"), ev(0.4, "got S 0")];
        let b = vec![ev(0.0, "me B 0"), ev(0.2, "req A 0"), ev(0.25, "dnh A 0")];
        let (iv, _) = analyse(&Vec::new(), &[a, b], 1.0);
        assert_eq!(iv[0].to_first_ask_s, None);
    }

    #[test]
    fn lines_without_the_mark_or_malformed_are_skipped() {
        assert_eq!(parse("INFO plasmd: fetching"), None);
        assert_eq!(parse("chunk-event got A"), None, "no chunk index");
        assert_eq!(parse("chunk-event what A 1"), None);
        assert_eq!(parse("x chunk-event got A 7"), Some((Kind::Got, "A", 7)));
        let (iv, s) = analyse(&Vec::new(), &[vec![(0.1, "noise".into())]], 0.5);
        assert!(iv.is_empty());
        assert_eq!(s.last_done_s, None);
    }
}
