//! The node's transport: TCP, noise, yamux, as `SwarmBuilder::with_tcp`
//! builds it, except that no dial binds to a listening port.
//!
//! libp2p's TCP transport binds each dial to the node's listening port
//! (`PortUse::Reuse`, there for NAT hole punching, which phase does not do).
//! In CI that bind failed with "Address already in use" for a fetcher whose
//! kernel-chosen listening port had been in use by another of the test's
//! connections a moment before, and every retry of its `--peer` failed the
//! same way for the 20 s the test waited (libp2p retries on a fresh port
//! only after "address not available" at connect). A dial on a fresh
//! ephemeral port has nothing to collide with. Peers learn where to dial us
//! from identify's listen addresses, never from the source port of our
//! dials, so nothing is lost (`swarm/tests/dial.rs`).

use std::pin::Pin;
use std::task::{Context, Poll};

use libp2p::Multiaddr;
use libp2p::core::Transport;
use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportError, TransportEvent};

/// A transport whose dials always take a fresh local port.
#[derive(Debug)]
pub(super) struct FreshPortDials<T>(pub(super) T);

impl<T: Transport + Unpin> Transport for FreshPortDials<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let opts = DialOpts {
            port_use: PortUse::New,
            ..opts
        };
        self.0.dial(addr, opts)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.get_mut().0).poll(cx)
    }
}
