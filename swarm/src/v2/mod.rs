//! The stream protocol `/phase/swarm/2`: one long-lived stream per peer pair
//! and manifest, with a have-bitfield once when it opens, pushed haves,
//! pipelined requests, cancel and choke/unchoke.
//!
//! [`frame`] is the wire encoding (pure, no I/O); [`session`] runs one stream
//! per peer over `libp2p-stream` with a task that reads and writes it, so the
//! node's event loop only ever touches bounded channels. The node runs it
//! with `NodeConfig::protocol = Protocol::V2` (`node/v2.rs`); see the crate's
//! `DESIGN.md`, "Protocol v2".

pub mod frame;
pub mod session;

pub use frame::{Frame, FrameCodec, FrameError, Limits};
pub use session::{
    CommandError, End, Event, Local, PROTOCOL, Session, SessionConfig, SessionError, SessionHandle,
};
