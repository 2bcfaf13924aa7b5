//! The libp2p swarm (see the swarm issue).
