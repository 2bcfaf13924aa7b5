//! The libp2p swarm of Phase swarm boot: who has the bytes and how they move.
//!
//! One [`Node`] per process owns a libp2p `Swarm` (TCP + noise + yamux,
//! Kademlia in server mode unless [`NodeConfig::dht`] is off, mDNS, identify
//! and the chunk protocol of [`protocol`]) inside one event loop; a cloneable
//! [`Handle`] talks to it over a bounded channel. A node seeds the manifests it holds completely, serves
//! whatever verified chunks it holds while fetching, and announces a manifest
//! root on the DHT as soon as it holds the first verified chunk. Which chunks a
//! peer holds travels peer to peer as a have-map.
//!
//! Which chunk to ask which peer for is decided by the sans-I/O
//! [`scheduler::Scheduler`], which the event loop drives and which a simulator
//! can drive too.
//!
//! ```no_run
//! use std::sync::Arc;
//! use phase_content::MemStore;
//! use phase_swarm::{Node, NodeConfig};
//!
//! # async fn demo() -> Result<(), phase_swarm::Error> {
//! let store = Arc::new(MemStore::new());
//! let handle = Node::spawn(NodeConfig::default(), store)?;
//! println!("listening on {:?}", handle.listen_addrs().await?);
//! # Ok(()) }
//! ```

pub mod addr;
mod codec;
mod error;
mod limits;
pub mod metrics;
pub mod neighbours;
mod node;
pub mod protocol;
pub mod scheduler;
pub mod serving;
pub mod superseed;
pub mod v2;

pub use error::Error;
pub use libp2p::{Multiaddr, PeerId, identity::Keypair};
pub use limits::{Limits, Memory};
pub use node::{
    CHUNK_EVENT_MARK, Fallback, FetchProgress, FetchReport, Handle, Node, NodeConfig, PeerStats,
    Protocol, Source, Span, load_or_create_key, span_by_chunks,
};
