//! Prometheus metrics: one registry per process, prefixed `plasmd_`, holding
//! the swarm node's counters ([`phase_swarm::metrics::Metrics`]), libp2p's own
//! (`plasmd_libp2p_*`: bandwidth, connections, Kademlia, identify) and what
//! the HTTP seed serves. `plasmd serve` answers `GET /metrics` on its HTTP
//! port; `plasmd fetch --metrics ADDR` and a booted node with
//! `phase.metrics=PORT` start [`listen`], a listener that answers only that.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use phase_swarm::NodeConfig;
use phase_swarm::metrics::{Metrics, Registry, SharedRegistry};

/// Scrapes answered at once by [`listen`]; more wait in the accept queue.
const MAX_CONCURRENT_SCRAPES: usize = 8;

/// The OpenMetrics text format prometheus-client writes (Prometheus reads it).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A process's metrics: clones share the registry and the counters.
#[derive(Clone)]
pub(crate) struct Exporter {
    registry: SharedRegistry,
    metrics: Metrics,
}

impl Exporter {
    /// A registry prefixed `plasmd` with the node's counters registered.
    pub(crate) fn new() -> Exporter {
        let metrics = Metrics::new();
        let mut registry = Registry::with_prefix("plasmd");
        metrics.register(&mut registry);
        Exporter {
            registry: Arc::new(Mutex::new(registry)),
            metrics,
        }
    }

    /// The node's counters (the HTTP seed counts what it serves into them).
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `cfg` counting into this registry, libp2p's metrics included.
    pub(crate) fn node_config(&self, cfg: NodeConfig) -> NodeConfig {
        cfg.with_metrics(self.metrics.clone(), self.registry.clone())
    }

    /// The answer to `GET /metrics`.
    pub(crate) fn response(&self) -> Response {
        (
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            phase_swarm::metrics::encode(&self.registry),
        )
            .into_response()
    }
}

/// Answers `GET /metrics` on `addr` in the background; returns the address
/// it listens on (port 0 picks a free one).
pub(crate) async fn listen(exporter: Exporter, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics scrapes on {addr}"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let e = exporter.clone();
                async move { e.response() }
            }),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            MAX_CONCURRENT_SCRAPES,
        ));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_scrape_returns_the_registry_as_openmetrics_text() {
        let e = Exporter::new();
        e.metrics().sent_http(4096);
        let at = listen(e, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let text = tokio::task::spawn_blocking(move || {
            let mut r = ureq::get(&format!("http://{at}/metrics")).call().unwrap();
            let ct = r.headers().get("content-type").cloned();
            (ct, r.body_mut().read_to_string().unwrap())
        })
        .await
        .unwrap();
        assert_eq!(text.0.unwrap().to_str().unwrap(), CONTENT_TYPE);
        assert!(
            text.1
                .contains("plasmd_bytes_sent_total{via=\"http\"} 4096"),
            "{}",
            text.1
        );
        assert!(text.1.ends_with("# EOF\n"), "{}", text.1);
    }
}
