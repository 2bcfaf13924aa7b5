//! Chunk events: one debug line per request, answer and upload, for
//! `storm --trace` to see where a storm's chunks wait (`simulations/src/hops.rs`).
//!
//! Off unless the `phase_swarm::chunk_events` tracing target is enabled
//! (`RUST_LOG=...,phase_swarm::chunk_events=debug`); then each line's message
//! is [`MARK`] followed by `KIND PEER CHUNK`:
//! - `me ID 0`: this node's peer id, once at start;
//! - `req PEER i`: we asked PEER (or `http-seed`) for chunk i;
//! - `got PEER i`: chunk i from PEER verified and stored;
//! - `busy PEER i`, `dnh PEER i`, `fail PEER i`: PEER answered busy, do
//!   not have (a withheld chunk included), or the request failed;
//! - `serve PEER i`: we started uploading chunk i to PEER;
//! - `pull PEER 0`: we asked PEER for its have-map;
//! - `map PEER i`: PEER's have-map came with chunk i (no pull needed);
//! - `done - 0`: every chunk held.
//!
//! The message is fixed so a harness can find it whatever the subscriber
//! prints before it; times are the harness's own (when it read the line).

use std::fmt::Display;

/// What every chunk-event message starts with.
pub const MARK: &str = "chunk-event ";

/// Logs one chunk event (cheap when the target is off: tracing caches that).
pub(super) fn log(kind: &str, peer: impl Display, chunk: u32) {
    tracing::debug!(target: "phase_swarm::chunk_events", "{MARK}{kind} {peer} {chunk}");
}
