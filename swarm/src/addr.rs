//! Typed helpers for the multiaddrs the node hands out and dials: read them
//! with [`Multiaddr::iter`] and build them from [`Protocol`]s, never as text.
//!
//! ```
//! use std::net::IpAddr;
//! use phase_swarm::{Keypair, addr};
//!
//! let peer = Keypair::generate_ed25519().public().to_peer_id();
//! let a = addr::with_peer(addr::tcp(IpAddr::from([10, 0, 0, 2]), 4001), peer);
//! assert_eq!(addr::peer_id(&a), Some(peer));
//! assert!(addr::on_host(&a, "10.0.0.2"));
//! assert!(!addr::is_loopback(&a));
//! ```

use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// `/ip4/IP/tcp/PORT` (or `/ip6/...`).
pub fn tcp(ip: IpAddr, port: u16) -> Multiaddr {
    Multiaddr::empty().with(ip.into()).with(Protocol::Tcp(port))
}

/// The peer id of the last `/p2p/ID` component, if any.
pub fn peer_id(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().fold(None, |found, p| match p {
        Protocol::P2p(id) => Some(id),
        _ => found,
    })
}

/// `addr` ending in `/p2p/peer` (unchanged if it already names a peer).
pub fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    addr.with_p2p(peer).unwrap_or_else(|a| a)
}

/// The IP address the multiaddr starts with, if it is an IP address.
pub fn ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(v4) => Some(IpAddr::V4(v4)),
        Protocol::Ip6(v6) => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

/// Whether the address is on loopback (127.0.0.0/8, ::1).
pub fn is_loopback(addr: &Multiaddr) -> bool {
    ip(addr).is_some_and(|ip| ip.is_loopback())
}

/// Whether the address is on `host`: an IP literal (IPv6 with or without
/// brackets) equal to the address's IP, or a DNS name equal to its name.
pub fn on_host(addr: &Multiaddr, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match (addr.iter().next(), host.parse::<IpAddr>()) {
        (Some(Protocol::Ip4(a)), Ok(h)) => IpAddr::V4(a) == h,
        (Some(Protocol::Ip6(a)), Ok(h)) => IpAddr::V6(a) == h,
        (Some(Protocol::Dns(n) | Protocol::Dns4(n) | Protocol::Dns6(n)), Err(_)) => {
            n.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

/// `addrs` without duplicates, loopback last, so a client on another host
/// tries the routable ones first. Stable otherwise.
pub fn routable_first(mut addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(a.clone()));
    addrs.sort_by_key(is_loopback);
    addrs
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn peer_ids_hosts_and_order() {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let a = with_peer(ma("/ip4/192.168.2.1/tcp/4001"), peer);
        assert_eq!(
            a.to_string(),
            format!("/ip4/192.168.2.1/tcp/4001/p2p/{peer}")
        );
        assert_eq!(peer_id(&a), Some(peer));
        assert_eq!(
            with_peer(a.clone(), peer),
            a,
            "a peer id is not added twice"
        );
        assert_eq!(peer_id(&ma("/ip4/1.2.3.4/tcp/1")), None);

        assert!(on_host(&a, "192.168.2.1"));
        assert!(!on_host(&a, "192.168.2.10"), "no prefix match");
        assert!(on_host(&ma("/ip6/::1/tcp/1"), "[::1]"));
        assert!(on_host(&ma("/dns4/seed.lan/tcp/1"), "SEED.lan"));
        assert!(!on_host(&ma("/dns4/seed.lan/tcp/1"), "10.0.0.1"));

        let lo = ma("/ip4/127.0.0.1/tcp/1");
        let lo6 = ma("/ip6/::1/tcp/1");
        let lan = ma("/ip4/10.0.0.1/tcp/1");
        assert!(is_loopback(&lo) && is_loopback(&lo6) && !is_loopback(&lan));
        assert_eq!(
            routable_first(vec![lo.clone(), lan.clone(), lo6.clone(), lan.clone()]),
            vec![lan, lo, lo6]
        );
        assert_eq!(
            tcp(IpAddr::from([0, 0, 0, 0]), 4001).to_string(),
            "/ip4/0.0.0.0/tcp/4001"
        );
        assert_eq!(tcp("::".parse().unwrap(), 0).to_string(), "/ip6/::/tcp/0");
    }
}
