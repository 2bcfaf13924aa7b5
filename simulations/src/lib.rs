//! Boot-storm harnesses for plasmd.
//!
//! [`netns`] builds the storm's network: one namespace per node and one for
//! the seed, each joined to a bridge by a veth pair shaped with tbf on both
//! ends (tbf shapes egress, so both ends are needed for upload and download).
//! [`storm`] runs one storm per mode (the swarm, HTTP only, BitTorrent) on the
//! same topology and artifacts, and [`bound`] gives the fluid lower bound the
//! results are measured against. [`vmnet`] does the same for QEMU guests on a
//! bridge. Every child runs as a [`proc::Proc`] (also the process harness of
//! the end-to-end tests); everything a run creates is registered in
//! [`cleanup`] and removed on drop or Ctrl-C.
//!
//! ```
//! use simulations::bound::t_min;
//! // One 20 Mbit/s seed, 8 peers at 20 Mbit/s, 13.2 MB: the download link binds.
//! let t = t_min(13.2e6 * 8.0, 20e6, &[20e6; 8], 20e6);
//! assert!((t - 5.28).abs() < 0.01);
//! ```

pub mod bound;
pub mod cleanup;
pub mod cpu;
pub mod fair;
pub mod hops;
pub mod links;
pub mod netns;
pub mod plot;
pub mod proc;
pub mod sim;
pub mod storm;
pub mod vmnet;
