//! `plasmd serve`: publish a directory, then seed it over HTTP and the swarm.
//!
//! HTTP is the bootstrap: the signed manifest, the seed's libp2p addresses,
//! chunks by hash (the fallback source when no peer has one), and the raw
//! artifacts at `/CHANNEL/ARCH/NAME` so a plain wget-based init still boots.
//! `/metrics` is the Prometheus scrape ([`crate::metrics`]). Connections,
//! timeouts and body slots are bounded in [`crate::http_limits`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::StreamExt;
use phase_content::publish::{PublishOptions, publish_dir};
use phase_content::{Artifact, ChunkStore, FsStore, Hash, SecretKey, SignedManifest};

pub(crate) use crate::http_limits::Conn;
use crate::http_limits::{self, BODY_WAIT, HttpLimits, MAX_BODIES, MAX_BODIES_PER_IP, Slots};
use crate::metrics::Exporter;
use crate::swarm_serve::{self, SeedSwarm, SwarmOptions};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Directory holding CHANNEL/ARCH/{kernel,initramfs[,cmdline][,dtb]}.
    #[arg(short = 'a', long)]
    artifacts: PathBuf,
    /// HTTP port (0 picks a free one; the banner says which).
    #[arg(short = 'p', long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on, for HTTP and the swarm.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Publisher key file; without it, STATE/publisher.key is created on first run and reused.
    #[arg(long)]
    key: Option<PathBuf>,
    /// State directory (key, chunk store, libp2p identity). Default: $PLASMD_STATE,
    /// $XDG_STATE_HOME/plasmd or ~/.local/state/plasmd.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Chunk size in bytes for newly published manifests (default: 64 KiB;
    /// doubled for a set over 2 GiB until it needs at most 32,768 chunks).
    #[arg(long)]
    chunk_size: Option<u32>,
    /// libp2p TCP port for the swarm (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    p2p_port: u16,
    /// The swarm's chunk protocol: v1 (a request per chunk) or v2 (one
    /// session per peer, pushed haves, pipelined requests). The node answers
    /// v1 requests either way.
    #[arg(long, value_name = "v1|v2", default_value_t = phase_swarm::Protocol::V1)]
    swarm_protocol: phase_swarm::Protocol,
    /// Seconds a client has to send a request head, and the longest a
    /// keep-alive connection may idle (tests shorten it).
    #[arg(long, hide = true, default_value_t = http_limits::HEADER_TIMEOUT.as_secs_f64(),
          value_parser = parse_secs)]
    http_header_timeout: f64,
    /// Open HTTP connections at most (never more than RLIMIT_NOFILE allows).
    #[arg(long, hide = true, default_value_t = http_limits::MAX_CONNECTIONS)]
    http_max_connections: usize,
    /// The most peers the seed's swarm node holds connected.
    #[arg(long, hide = true, default_value_t = swarm_serve::SEED_NEIGHBOURS,
          value_parser = clap::value_parser!(u16).range(1..))]
    max_neighbours: u16,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

pub(crate) struct AppState {
    store: FsStore,
    manifests: BTreeMap<(String, String), SignedManifest>,
    swarm: SeedSwarm,
    metrics: Exporter,
    /// Artifact and chunk bodies in flight, held until each body ends.
    bodies: Arc<Slots>,
}

/// The host's architecture in the names manifests use.
pub(crate) fn host_arch() -> &'static str {
    std::env::consts::ARCH
}

fn load_key(a: &Args, state: &std::path::Path) -> anyhow::Result<SecretKey> {
    if let Some(k) = &a.key {
        return crate::files::read_secret_key(k);
    }
    let path = state.join("publisher.key");
    if path.exists() {
        return crate::files::read_secret_key(&path);
    }
    let key = SecretKey::generate();
    key.write_new(&path)?;
    eprintln!("plasmd serve: created publisher key {}", path.display());
    Ok(key)
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let nofile = http_limits::raise_nofile_limit();
    let limits = HttpLimits::default()
        .with_max_connections(a.http_max_connections)
        .with_nofile(nofile)
        .with_header_timeout(Duration::from_secs_f64(a.http_header_timeout));
    if limits.max_connections < a.http_max_connections {
        eprintln!(
            "plasmd serve: only {nofile} open files allowed (RLIMIT_NOFILE): at most {} HTTP connections; raise it with `ulimit -n`",
            limits.max_connections
        );
    }
    let state_dir = a.state.clone().unwrap_or_else(crate::default_state_dir);
    // Bind first: a port in use should fail before any publishing work.
    let addr = SocketAddr::new(a.bind, a.port);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another server holds it; pick another with -p)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot listen on {addr}: {e}{hint}")
    })?;
    let local = listener.local_addr()?;
    crate::files::private_dir(&state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let key = load_key(&a, &state_dir)?;
    eprintln!("plasmd serve: publisher public key {}", key.public());

    let store = FsStore::open(state_dir.join("store"))?;
    let started = Instant::now();
    let published = {
        let (store, dir) = (store.clone(), a.artifacts.clone());
        let opts = PublishOptions::default()
            .with_chunk_size(a.chunk_size)
            .with_bump_if_unchanged(false);
        tokio::task::spawn_blocking(move || publish_dir(&key, &dir, &store, &opts))
            .await?
            .with_context(|| format!("publishing {}", a.artifacts.display()))?
    };
    let mut manifests = BTreeMap::new();
    for p in published {
        let m = p.manifest.manifest();
        let bytes: u64 = m.artifacts.iter().map(|a| a.size).sum();
        eprintln!(
            "plasmd serve: {} {}/{} sequence {} root {} ({} bytes)",
            if p.changed { "published" } else { "unchanged" },
            m.channel,
            m.arch,
            m.sequence,
            p.manifest.root(),
            bytes
        );
        manifests.insert((m.channel.clone(), m.arch.clone()), p.manifest);
    }
    eprintln!(
        "plasmd serve: publishing took {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let metrics = Exporter::new();
    let swarm = swarm_serve::start(
        &metrics,
        store.clone(),
        manifests.values().cloned().collect(),
        SwarmOptions {
            port: a.p2p_port,
            state_dir: Some(state_dir.clone()),
            // The swarm listens where HTTP does: --bind 127.0.0.1 keeps both on loopback.
            bind: a.bind,
            max_neighbours: a.max_neighbours.into(),
            protocol: a.swarm_protocol,
            ..Default::default()
        },
    )
    .await
    .context("starting the swarm node")?;
    let on = swarm.info(local.ip(), None).await;
    for addr in &on.addrs {
        eprintln!("plasmd serve: swarm listening on {addr}");
    }

    let state = Arc::new(AppState {
        store,
        manifests,
        swarm,
        metrics,
        bodies: Slots::new(MAX_BODIES, MAX_BODIES_PER_IP),
    });
    eprintln!("plasmd serve: serving http://{local}");
    http_limits::serve(listener, router(state), limits, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/manifest.json", get(default_manifest))
        .route("/swarm", get(swarm_info))
        .route("/metrics", get(metrics))
        .route("/chunks/{hash}", get(chunk))
        .route("/{channel}/{arch}/{name}", get(artifact))
        .with_state(state)
}

/// A body slot for `conn`'s address, or the 503 that says the seed is busy.
async fn body_slot(s: &AppState, conn: &Conn) -> Result<http_limits::Slot, Response> {
    s.bodies
        .take_within(conn.remote.ip(), BODY_WAIT)
        .await
        .map_err(|full| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                format!("seed busy: artifact and chunk transfers {full}; retry\n"),
            )
                .into_response()
        })
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, format!("{what}\n")).into_response()
}

async fn index(State(s): State<Arc<AppState>>) -> String {
    let mut out = String::from("plasmd seed\n");
    for ((c, a), m) in &s.manifests {
        out.push_str(&format!(
            "/{c}/{a}/manifest.json sequence {} root {}\n",
            m.manifest().sequence,
            m.root()
        ));
        for art in &m.manifest().artifacts {
            out.push_str(&format!("/{c}/{a}/{} {} bytes\n", art.name, art.size));
        }
    }
    out
}

#[derive(serde::Deserialize)]
struct Select {
    channel: Option<String>,
    arch: Option<String>,
}

/// The envelope plus, outside the signed bytes, each artifact's absolute URL
/// on the host the client named (the prototype's wget init reads those).
fn manifest_response(
    s: &AppState,
    channel: &str,
    arch: &str,
    headers: &HeaderMap,
    conn: &Conn,
) -> Response {
    let Some(m) = s.manifests.get(&(channel.to_owned(), arch.to_owned())) else {
        return not_found(format!("no manifest for {channel}/{arch}"));
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.parse::<axum::http::uri::Authority>().is_ok())
        .map(str::to_owned)
        .or_else(|| conn.local.map(|a| a.to_string()));
    let body = match host {
        Some(host) => phase_content::with_urls(
            m.envelope(),
            m.manifest().artifacts.iter().map(|a| {
                (
                    a.name.as_str(),
                    format!("http://{host}/{channel}/{arch}/{}", a.name),
                )
            }),
        ),
        None => m.envelope().to_vec(),
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn default_manifest(
    State(s): State<Arc<AppState>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Query(q): Query<Select>,
    headers: HeaderMap,
) -> Response {
    let channel = q.channel.as_deref().unwrap_or("stable");
    let arch = q.arch.as_deref().unwrap_or(host_arch());
    manifest_response(&s, channel, arch, &headers, &conn)
}

async fn swarm_info(
    State(s): State<Arc<AppState>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
) -> Response {
    let reached = conn.local.map(|a| a.ip());
    axum::Json(s.swarm.info(conn.remote.ip(), reached).await).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    s.metrics.response()
}

async fn chunk(
    State(s): State<Arc<AppState>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path(hash): Path<String>,
) -> Response {
    let Ok(hash) = hash.parse::<Hash>() else {
        return (StatusCode::BAD_REQUEST, "not a chunk hash\n").into_response();
    };
    let slot = match body_slot(&s, &conn).await {
        Ok(slot) => slot,
        Err(busy) => return busy,
    };
    let store = s.store.clone();
    match tokio::task::spawn_blocking(move || store.get(&hash)).await {
        Ok(Ok(Some(data))) => {
            s.metrics.metrics().sent_http(data.len() as u64);
            let len = data.len();
            let body = Body::from_stream(http_limits::hold(
                futures_util::stream::iter([Ok::<_, std::convert::Infallible>(data)]),
                slot,
            ));
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    ),
                    (header::CONTENT_LENGTH, HeaderValue::from(len)),
                ],
                body,
            )
                .into_response()
        }
        Ok(Ok(None)) => not_found(format!("no chunk {hash}")),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading chunk");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

pub(crate) use phase_content::range::RangeReq;

/// Parses a `Range` header for one range (`phase_content::range`, pure and
/// fuzzed there); a value that is not visible ASCII counts as absent.
pub(crate) fn parse_range(h: Option<&HeaderValue>, len: u64) -> RangeReq {
    phase_content::range::parse_range(h.and_then(|v| v.to_str().ok()), len)
}

async fn artifact(
    State(s): State<Arc<AppState>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path((channel, arch, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if name == "manifest.json" {
        return manifest_response(&s, &channel, &arch, &headers, &conn);
    }
    let Some(m) = s.manifests.get(&(channel.clone(), arch.clone())) else {
        return not_found(format!("no manifest for {channel}/{arch}"));
    };
    if name == "cmdline" {
        return match &m.manifest().cmdline {
            Some(c) => format!("{c}\n").into_response(),
            None => not_found(format!("{channel}/{arch} has no cmdline")),
        };
    }
    let Some(art) = m.manifest().artifact(&name) else {
        return not_found(format!("{channel}/{arch} has no {name}"));
    };
    let len = art.size;
    let (start, end, status) = match parse_range(headers.get(header::RANGE), len) {
        RangeReq::Full => (0, len, StatusCode::OK),
        RangeReq::Part(s, e) => (s, e, StatusCode::PARTIAL_CONTENT),
        RangeReq::Unsatisfiable => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
    };
    let slot = match body_slot(&s, &conn).await {
        Ok(slot) => slot,
        Err(busy) => return busy,
    };
    let body = Body::from_stream(http_limits::hold(
        range_stream(s.store.clone(), art.clone(), start, end, s.metrics.clone()),
        slot,
    ));
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", art.hash)) {
        h.insert(header::ETAG, etag);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

/// Streams `start..end` of an artifact chunk by chunk from the store. Every
/// chunk is verified on read; a bad one ends the stream with an error, so the
/// client sees a short body rather than wrong bytes. Each piece handed to
/// the connection counts as one chunk sent over HTTP.
fn range_stream(
    store: FsStore,
    art: Artifact,
    start: u64,
    end: u64,
    metrics: Exporter,
) -> impl futures_util::Stream<Item = Result<Bytes, phase_content::Error>> + Send + 'static {
    let cs = u64::from(art.chunk_size);
    let first = (start / cs) as usize;
    futures_util::stream::unfold(
        (store, art, first, start),
        move |(store, art, idx, pos)| async move {
            if pos >= end {
                return None;
            }
            let hash = *art.chunks.get(idx)?;
            let st = store.clone();
            let got = tokio::task::spawn_blocking(move || st.get(&hash))
                .await
                .unwrap_or_else(|e| {
                    Err(phase_content::Error::BadManifest {
                        reason: format!("chunk reader failed: {e}"),
                    })
                });
            let data = match got {
                Ok(Some(d)) => d,
                Ok(None) => {
                    let e = phase_content::Error::MissingChunk {
                        artifact: art.name.clone(),
                        index: idx,
                        hash,
                    };
                    tracing::error!(error = %e, "serving artifact");
                    return Some((Err(e), (store, art, usize::MAX, end)));
                }
                Err(e) => {
                    tracing::error!(error = %e, "serving artifact");
                    return Some((Err(e), (store, art, usize::MAX, end)));
                }
            };
            let chunk_start = idx as u64 * cs;
            let lo = (pos - chunk_start) as usize;
            let hi = ((end - chunk_start).min(data.len() as u64)) as usize;
            let piece = data.slice(lo..hi);
            let next = chunk_start + hi as u64;
            Some((Ok(piece), (store, art, idx + 1, next)))
        },
    )
    .map(move |piece| {
        if let Ok(p) = &piece {
            metrics.metrics().sent_http(p.len() as u64);
        }
        piece
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The parsing cases are in phase_content::range; here only what the
    // header wrapper adds: no header and a header that is not text.
    #[test]
    fn a_missing_or_non_text_range_header_means_the_whole_file() {
        assert_eq!(parse_range(None, 10), RangeReq::Full);
        let binary = HeaderValue::from_bytes(b"bytes=0-\xff").expect("header");
        assert_eq!(parse_range(Some(&binary), 10), RangeReq::Full);
        let text = HeaderValue::from_static("bytes=2-3");
        assert_eq!(parse_range(Some(&text), 10), RangeReq::Part(2, 4));
    }
}
