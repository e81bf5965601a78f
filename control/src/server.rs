//! The HTTP/JSON control API around the [`Registry`] (routes in DESIGN.md "Control plane").
//!
//! One async mutex serializes changes so the store sees them in order; a change is applied to a
//! copy of the registry, written to the store, and only then committed, announced to watchers
//! and acknowledged. Watch streams are NDJSON, resumable from a revision while the history
//! still holds it (410 Gone otherwise, so the client lists again).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ipnet::Ipv4Net;
use podnet_proto::api::{
    validate_node_name, Encap, ErrorBody, EventType, Node, NodeList, RegisterRequest,
    RegisterResponse, WatchEvent, WgKey,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::clock::{now_ms, LeaseClock};
use crate::etcd::{Etcd, EtcdError, Mirror};
use crate::ipam::{Ipam, IpamError};
use crate::replica;
use crate::state::{Gone, History, RegisterError, Registry, RestoreError, Timing};
use crate::store::{Store, StoreError};
use crate::tls::{Identity, Role};

/// Settings of `podnet-control serve`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub cluster_cidr: Ipv4Net,
    pub node_prefix: u8,
    pub lease_ttl: Duration,
    pub reclaim_after: Duration,
    /// Bearer token required on every call but `/healthz`.
    pub token: Option<String>,
    /// Watch events kept for resuming watches.
    pub history_len: usize,
    pub max_body_bytes: usize,
    /// An empty line is sent on idle watch streams this often, so clients can tell a silent
    /// stream from a dead one.
    pub watch_keepalive: Duration,
    /// Open watch streams at most; more get 503 (each costs a task and a queue of 64 lines).
    /// Every agent keeps one open, so this bounds the cluster size.
    pub max_watchers: usize,
    /// Open connections at most; more are answered 503 and closed at once. Every agent keeps
    /// one or two (its watch, and its renewals between them).
    pub max_connections: usize,
    /// A request's headers must arrive within this from its first byte (or the connection's
    /// start), so clients sending headers byte by byte cannot hold connections (slowloris).
    pub header_timeout: Duration,
    /// A connection on which the server has written nothing for this long, and which has no
    /// request in progress, is closed. Longer than `watch_keepalive`, so live watches stay.
    pub idle_timeout: Duration,
    /// A write that makes no progress for this long (a client that stopped reading) closes
    /// the connection.
    pub write_stall_timeout: Duration,
    /// TLS with client certificates (mTLS); `None` serves plain HTTP (`--insecure`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Default of [`ServerConfig::max_watchers`] (`--max-watchers`).
pub const DEFAULT_MAX_WATCHERS: usize = 4096;
/// Default of [`ServerConfig::max_connections`] (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            cluster_cidr: "10.244.0.0/16".parse().expect("literal CIDR"),
            node_prefix: 24,
            lease_ttl: Duration::from_secs(20),
            reclaim_after: Duration::from_secs(24 * 3600),
            token: None,
            history_len: 1024,
            max_body_bytes: 16 * 1024,
            watch_keepalive: Duration::from_secs(10),
            max_watchers: DEFAULT_MAX_WATCHERS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_stall_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid --cluster-cidr/--node-prefix: {0}")]
    Ipam(#[from] IpamError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("state file does not fit this configuration: {0}")]
    Restore(#[from] RestoreError),
    #[error("{0}")]
    Etcd(#[from] EtcdError),
    #[error("--lease-ttl must be at least 10ms")]
    LeaseTtl,
    #[error(
        "the idle timeout ({idle:?}) must be longer than the watch keepalive ({keepalive:?}), \
         or live watch streams are cut"
    )]
    IdleTimeout { idle: Duration, keepalive: Duration },
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) struct Core {
    pub(crate) registry: Registry,
    pub(crate) history: History,
    /// With the etcd store: the key revisions and leases behind `registry`.
    pub(crate) mirror: Mirror,
}

/// Where changes are written.
pub(crate) enum Backend {
    /// One process owns the state (the embedded file store, or memory in tests).
    File(Arc<dyn Store>),
    /// Replicas share etcd; `registry` is this replica's mirror of it.
    Etcd(Box<Etcd>),
}

/// One label pair with a fixed key and value.
type Fixed = [(&'static str, &'static str); 1];

/// The service's metrics, in prometheus-client's types, registered once in `registry`.
/// The node counts, the revision and the capacity are set from the core at each scrape.
pub(crate) struct Metrics {
    registry: prometheus_client::registry::Registry,
    nodes: Family<Fixed, Gauge>,
    revision: Gauge,
    capacity: Gauge,
    pub(crate) registrations: Family<Fixed, Counter>,
    pub(crate) lapsed: Counter,
    pub(crate) store_errors: Counter,
    watchers: Gauge,
    watchers_refused: Counter,
    connections: Gauge,
    connections_closed: Family<Fixed, Counter>,
    requests: Family<[(&'static str, u16); 1], Counter>,
    insecure: Gauge,
    store_available: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Default::default(),
            nodes: Default::default(),
            revision: Default::default(),
            capacity: Default::default(),
            registrations: Default::default(),
            lapsed: Default::default(),
            store_errors: Default::default(),
            watchers: Default::default(),
            watchers_refused: Default::default(),
            connections: Default::default(),
            connections_closed: Default::default(),
            requests: Default::default(),
            insecure: Default::default(),
            store_available: Default::default(),
        };
        // Every labelled sample is there from the start, at 0, so a rate() over a restart
        // sees the series begin rather than appear.
        for state in ["up", "down"] {
            m.nodes.get_or_create(&[("state", state)]).set(0);
        }
        for result in ["added", "modified", "renewed"] {
            m.registrations
                .get_or_create(&[("result", result)])
                .inc_by(0);
        }
        for reason in ["limit", "timeout"] {
            m.connections_closed
                .get_or_create(&[("reason", reason)])
                .inc_by(0);
        }
        let r = &mut m.registry;
        // prometheus-client appends "_total" to counters and a "." to each help text.
        r.register(
            "podnet_control_nodes",
            "Nodes known to the control service, by state",
            m.nodes.clone(),
        );
        r.register(
            "podnet_control_revision",
            "Revision of the node table",
            m.revision.clone(),
        );
        r.register(
            "podnet_control_pod_cidr_capacity",
            "Nodes the cluster CIDR fits",
            m.capacity.clone(),
        );
        r.register(
            "podnet_control_registrations",
            "Accepted registrations by outcome",
            m.registrations.clone(),
        );
        r.register(
            "podnet_control_lease_lapses",
            "Nodes withdrawn because their lease lapsed",
            m.lapsed.clone(),
        );
        r.register(
            "podnet_control_store_errors",
            "Failed writes of the state store",
            m.store_errors.clone(),
        );
        r.register(
            "podnet_control_watchers",
            "Open watch streams",
            m.watchers.clone(),
        );
        r.register(
            "podnet_control_watchers_refused",
            "Watch requests refused at the limit",
            m.watchers_refused.clone(),
        );
        r.register(
            "podnet_control_connections",
            "Open connections",
            m.connections.clone(),
        );
        r.register(
            "podnet_control_connections_closed",
            "Connections closed by a limit",
            m.connections_closed.clone(),
        );
        r.register(
            "podnet_control_http_requests",
            "HTTP requests by status code",
            m.requests.clone(),
        );
        r.register(
            "podnet_control_insecure",
            "1 while the service serves plain HTTP (--insecure), 0 under mTLS",
            m.insecure.clone(),
        );
        r.register(
            "podnet_control_store_available",
            "1 while the store takes writes; with --store etcd, 0 while etcd has no quorum or \
             cannot be reached (reads and watches are still served)",
            m.store_available.clone(),
        );
        m
    }
}

pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) core: tokio::sync::Mutex<Core>,
    pub(crate) events: broadcast::Sender<WatchEvent>,
    pub(crate) backend: Backend,
    pub(crate) metrics: Metrics,
    /// Flips to true on shutdown so watch streams end and the server can drain.
    pub(crate) stopping: watch::Sender<bool>,
    /// One permit per open watch stream.
    watch_slots: Arc<Semaphore>,
    pub(crate) clock: LeaseClock,
    /// With the etcd store: the revision the mirror has caught up with, and why etcd cannot
    /// take writes right now (`None` while it can).
    pub(crate) mirror_revision: watch::Sender<u64>,
    pub(crate) etcd_down: std::sync::Mutex<Option<String>>,
    /// Wakes the sweep when the mirror saw a lease lapse.
    pub(crate) sweep_now: tokio::sync::Notify,
}

/// A loaded control service, ready to serve.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

/// Checks the settings both stores share and makes the IPAM and lease timing from them.
fn check(config: &ServerConfig) -> Result<(Ipam, Timing), ServerError> {
    if config.lease_ttl < Duration::from_millis(10) {
        return Err(ServerError::LeaseTtl);
    }
    if config.idle_timeout <= config.watch_keepalive {
        return Err(ServerError::IdleTimeout {
            idle: config.idle_timeout,
            keepalive: config.watch_keepalive,
        });
    }
    let ipam = Ipam::new(config.cluster_cidr, config.node_prefix)?;
    let timing = Timing {
        lease_ttl_ms: config.lease_ttl.as_millis() as u64,
        reclaim_after_ms: config.reclaim_after.as_millis() as u64,
    };
    Ok((ipam, timing))
}

impl Server {
    /// Loads the state from `store` (a fresh state is saved at once, so an unwritable store
    /// fails here rather than at the first registration).
    pub async fn open(config: ServerConfig, store: Arc<dyn Store>) -> Result<Server, ServerError> {
        let (ipam, timing) = check(&config)?;
        let clock = LeaseClock::starting_at(now_ms());
        let loader = store.clone();
        let stored = tokio::task::spawn_blocking(move || loader.load())
            .await
            .map_err(|e| StoreError::Other(e.to_string()))??;
        let registry = match stored {
            Some(stored) => {
                let registry = Registry::restore(ipam, timing, stored, clock.now_ms())?;
                let (up, down) = registry.counts();
                tracing::info!(revision = registry.revision(), up, down, "state loaded");
                registry
            }
            None => {
                let registry = Registry::new(ipam, timing);
                save(&store, &registry).await?;
                tracing::info!("no saved state, starting with an empty node table");
                registry
            }
        };
        Ok(Server::build(
            config,
            registry,
            Mirror::default(),
            Backend::File(store),
            clock,
        ))
    }

    /// A replica over etcd: stores the cluster layout or checks it against the stored one,
    /// then reads every node into its mirror. Fails when etcd cannot be read.
    pub async fn open_etcd(config: ServerConfig, etcd: Etcd) -> Result<Server, ServerError> {
        let (ipam, timing) = check(&config)?;
        let clock = LeaseClock::starting_at(now_ms());
        let (registry, mirror, revision) = etcd
            .load(ipam, timing, clock.now_ms() + timing.lease_ttl_ms)
            .await?;
        let (up, down) = registry.counts();
        tracing::info!(
            revision,
            up,
            down,
            endpoints = etcd.endpoints(),
            "etcd state loaded"
        );
        Ok(Server::build(
            config,
            registry,
            mirror,
            Backend::Etcd(Box::new(etcd)),
            clock,
        ))
    }

    fn build(
        config: ServerConfig,
        registry: Registry,
        mirror: Mirror,
        backend: Backend,
        clock: LeaseClock,
    ) -> Server {
        let history = History::new(registry.revision(), config.history_len);
        let (mirror_revision, _) = watch::channel(registry.revision());
        let (events, _) = broadcast::channel(config.history_len.max(16));
        let (stopping, _) = watch::channel(false);
        let watch_slots = Arc::new(Semaphore::new(config.max_watchers));
        let metrics = Metrics::new();
        metrics.insecure.set(i64::from(config.tls.is_none()));
        Server {
            shared: Arc::new(Shared {
                watch_slots,
                clock,
                config,
                core: tokio::sync::Mutex::new(Core {
                    registry,
                    history,
                    mirror,
                }),
                events,
                backend,
                metrics,
                stopping,
                mirror_revision,
                etcd_down: std::sync::Mutex::new(None),
                sweep_now: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The routes, with authentication, body limit and request counting.
    pub fn router(&self) -> Router {
        let shared = self.shared.clone();
        let api = Router::new()
            .route("/v1/nodes", get(list_or_watch))
            .route(
                "/v1/nodes/{name}",
                get(get_node).put(put_node).delete(delete_node),
            )
            .route("/metrics", get(metrics))
            .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
        Router::new()
            .route("/healthz", get(healthz))
            .merge(api)
            .fallback(|| async {
                error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such route; see /v1/nodes",
                )
            })
            .layer(middleware::from_fn_with_state(
                shared.clone(),
                count_requests,
            ))
            .layer(DefaultBodyLimit::max(shared.config.max_body_bytes))
            .layer(middleware::from_fn_with_state(
                shared.clone(),
                refuse_declared_oversize,
            ))
            .layer(middleware::from_fn_with_state(shared.clone(), json_errors))
            .with_state(shared)
    }

    /// Serves on `listener` until `shutdown` resolves, sweeping lapsed leases meanwhile; then
    /// ends watch streams and waits for in-flight requests.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let tasks = match &self.shared.backend {
            Backend::File(_) => vec![tokio::spawn(sweep(self.shared.clone()))],
            Backend::Etcd(etcd) => replica::spawn(&self.shared, etcd),
        };
        let stopping = self.shared.stopping.clone();
        let router = self.router();
        let listener = guard::Guarded::new(listener, self.shared.clone());
        let result = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<guard::Peer>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.send_replace(true);
        })
        .await;
        self.shared.stopping.send_replace(true);
        for task in tasks {
            task.abort();
        }
        result.map_err(ServerError::from)
    }
}

async fn save(store: &Arc<dyn Store>, registry: &Registry) -> Result<(), StoreError> {
    let stored = registry.to_stored();
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.save(&stored))
        .await
        .map_err(|e| StoreError::Other(e.to_string()))?
}

/// Marks lapsed leases down. Runs often enough that a node is withdrawn within a tenth of the
/// lease TTL (at most a second) after it lapsed.
async fn sweep(shared: Arc<Shared>) {
    let period =
        (shared.config.lease_ttl / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut stopping = shared.stopping.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        let mut core = shared.core.lock().await;
        let mut next = core.registry.clone();
        let (events, changed) = next.expire(shared.clock.now_ms());
        if !changed {
            continue;
        }
        for ev in &events {
            tracing::info!(node = %ev.node.name, underlay_ip = %ev.node.underlay_ip, revision = ev.revision,
                "lease lapsed, node withdrawn");
        }
        let lapsed = events.len() as u64;
        if let Err(e) = commit(&shared, &mut core, next, true, events).await {
            // Not committed: the next sweep tries again.
            shared.metrics.store_errors.inc();
            tracing::error!("{e}");
            continue;
        }
        shared.metrics.lapsed.inc_by(lapsed);
    }
}

/// Makes `next` the registry of record, then records and announces `events`. With `persist`
/// `next` is saved first, so nothing is acknowledged or announced that a crash could lose;
/// plain lease renewals skip the write (leases restart on load anyway).
async fn commit(
    shared: &Shared,
    core: &mut Core,
    next: Registry,
    persist: bool,
    events: impl IntoIterator<Item = WatchEvent>,
) -> Result<(), StoreError> {
    if persist {
        let Backend::File(store) = &shared.backend else {
            unreachable!("replicas over etcd write through replica.rs, never commit()");
        };
        save(store, &next).await?;
    }
    core.registry = next;
    for ev in events {
        core.history.push(ev.clone());
        // No receivers is fine: nobody is watching.
        let _ = shared.events.send(ev);
    }
    Ok(())
}

/// Status and short kind of a refused registration.
pub(crate) fn refusal(e: &RegisterError) -> (StatusCode, &'static str) {
    match e {
        RegisterError::BadName { .. }
        | RegisterError::BadVtepMac(_)
        | RegisterError::BadUnderlay(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        RegisterError::NameTaken { .. } | RegisterError::UnderlayTaken { .. } => {
            (StatusCode::CONFLICT, "conflict")
        }
        RegisterError::Exhausted { .. } => (StatusCode::INSUFFICIENT_STORAGE, "exhausted"),
    }
}

/// An error answer: status plus `{error, detail}`.
pub(crate) fn error(status: StatusCode, kind: &str, detail: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: kind.to_string(),
        detail: Some(detail.into()),
    };
    (status, Json(body)).into_response()
}

fn bad_request(detail: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", detail)
}

fn store_failed(shared: &Shared, e: StoreError) -> Response {
    shared.metrics.store_errors.inc();
    tracing::error!("{e}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "store_failed",
        format!("the change was not saved and not applied: {e}"),
    )
}

async fn authenticate(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token_ok = match (&shared.config.token, presented) {
        (Some(token), Some(p)) => constant_time_eq(p.trim().as_bytes(), token.as_bytes()),
        _ => false,
    };
    if shared.config.tls.is_some() {
        let peer = req
            .extensions()
            .get::<ConnectInfo<guard::Peer>>()
            .map(|c| c.0.clone());
        let identity = peer.as_ref().and_then(|p| p.identity.clone());
        return match mtls_refusal(&req, identity.as_deref(), token_ok) {
            None => next.run(req).await,
            Some(refusal) => {
                if let Some(p) = peer {
                    tracing::warn!(client = %p.addr, identity = ?identity.as_deref().map(|i| i.to_string()),
                        method = %req.method(), path = req.uri().path(), status = refusal.status().as_u16(),
                        "request refused");
                }
                refusal
            }
        };
    }
    let Some(_) = &shared.config.token else {
        return next.run(req).await;
    };
    let detail = match presented {
        Some(_) if token_ok => return next.run(req).await,
        Some(_) => "wrong bearer token; use the token in the server's --token-file",
        None => {
            "missing bearer token; send `Authorization: Bearer <token>` (clients: --token-file)"
        }
    };
    unauthorized(detail)
}

fn unauthorized(detail: &str) -> Response {
    let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", detail);
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Under mTLS: any certificate of the cluster CA (or the bearer token) may read; a node may
/// write only its own record; an operator may write any. `None`: allowed.
fn mtls_refusal(req: &Request, identity: Option<&Identity>, token_ok: bool) -> Option<Response> {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let Some(id) = identity else {
        if token_ok && !write {
            return None;
        }
        return Some(unauthorized(
            "no client certificate: this service uses mTLS. Agents take --tls-ca, --tls-cert and \
             --tls-key (`podnet-control ca issue --node NAME` makes a node's); a bearer token \
             (--token-file) allows reads only",
        ));
    };
    if !write || id.role == Role::Operator {
        return None;
    }
    let target = req
        .uri()
        .path()
        .strip_prefix("/v1/nodes/")
        .unwrap_or_default();
    if id.role == Role::Node && id.name == target {
        return None;
    }
    let what = match *req.method() {
        Method::DELETE => "delete",
        _ => "register or renew",
    };
    Some(error(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "the client certificate is for {id}, which may not {what} node {target:?}: a node \
             speaks only for the name in its certificate (an operator certificate, `ca issue \
             --operator`, may change any node)"
        ),
    ))
}

/// Compares without an early exit, so response time does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        // black_box keeps the optimizer from turning the loop into an early-exit compare.
        diff = std::hint::black_box(diff | u64::from(x ^ y));
    }
    diff == 0
}

async fn count_requests(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let code = resp.status().as_u16();
    shared
        .metrics
        .requests
        .get_or_create(&[("code", code)])
        .inc();
    resp
}

/// Refuses a body whose declared length is over the limit before reading any of it (the body
/// limit alone would wait for the client to send `max_body_bytes` first).
async fn refuse_declared_oversize(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.config.max_body_bytes as u64) {
        let mut resp = StatusCode::PAYLOAD_TOO_LARGE.into_response();
        // The unread body makes the connection unusable for another request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    next.run(req).await
}

/// Turns every error answer that is not JSON yet (axum's own rejections: body too large, bad
/// path encoding, wrong method) into the `{error, detail}` body all other errors use.
async fn json_errors(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Rejection texts are short; a longer body is cut rather than buffered.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (kind, detail) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            format!(
                "request body is larger than the {} byte limit",
                shared.config.max_body_bytes
            ),
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this route does not take that method; see the Allow header".to_string(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", text),
        s if s.is_server_error() => ("internal", text),
        _ => ("bad_request", text),
    };
    let mut fixed = error(status, kind, detail);
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in parts.headers.drain().filter_map(|(n, v)| Some((n?, v))) {
        fixed.headers_mut().insert(name, value);
    }
    fixed
}

/// Reads a registration body field by field so a 400 names the field and the reason.
pub fn parse_register(body: &[u8]) -> Result<RegisterRequest, String> {
    const EXAMPLE: &str = r#"{"underlay_ip": "198.18.0.1", "encap": "vxlan"}"#;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(format!(
            "request body is empty; send a JSON object like {EXAMPLE}"
        ));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err(format!("request body must be a JSON object like {EXAMPLE}"));
    };
    if let Some(unknown) = fields.keys().find(|k| {
        !matches!(
            k.as_str(),
            "underlay_ip" | "encap" | "vtep_mac" | "wireguard_public_key"
        )
    }) {
        return Err(format!(
            "field `{unknown}`: unknown field; expected underlay_ip, encap and optionally vtep_mac and wireguard_public_key"
        ));
    }
    let underlay_ip = match fields.get("underlay_ip") {
        None => {
            return Err(
                "field `underlay_ip`: missing; the node's IPv4 address on the underlay".into(),
            )
        }
        Some(Value::String(s)) => s.parse::<Ipv4Addr>().map_err(|_| {
            format!("field `underlay_ip`: {s:?} is not an IPv4 address like \"198.18.0.1\"")
        })?,
        Some(other) => {
            return Err(format!(
                "field `underlay_ip`: expected a string like \"198.18.0.1\", got {other}"
            ))
        }
    };
    let encap = match fields.get("encap") {
        None => return Err("field `encap`: missing; \"ipip\" or \"vxlan\"".into()),
        Some(Value::String(s)) => s
            .parse::<Encap>()
            .map_err(|e| format!("field `encap`: {e}"))?,
        Some(other) => {
            return Err(format!(
                "field `encap`: expected \"ipip\" or \"vxlan\", got {other}"
            ))
        }
    };
    let vtep_mac = match fields.get("vtep_mac") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.parse().map_err(|e| format!("field `vtep_mac`: {e}"))?),
        Some(other) => {
            return Err(format!(
                "field `vtep_mac`: expected a string like \"02:00:c6:12:00:01\", got {other}"
            ))
        }
    };
    let wireguard_public_key = match fields.get("wireguard_public_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse::<WgKey>()
                .map_err(|e| format!("field `wireguard_public_key`: {e}"))?,
        ),
        Some(other) => {
            return Err(format!(
                "field `wireguard_public_key`: expected a base64 string of 32 bytes, got {other}"
            ))
        }
    };
    match (encap, wireguard_public_key) {
        (Encap::Wireguard, None) => {
            return Err("field `wireguard_public_key`: missing; a node with encap \"wireguard\" must give its public key (base64, as `wg pubkey` prints it)".into())
        }
        (Encap::Wireguard, Some(_)) | (_, None) => {}
        (other, Some(_)) => {
            return Err(format!(
                "field `wireguard_public_key`: only a node with encap \"wireguard\" has one, this one registers encap \"{other}\""
            ))
        }
    }
    Ok(RegisterRequest {
        underlay_ip,
        encap,
        vtep_mac,
        wireguard_public_key,
    })
}

/// Why a node name in the URL is unusable (the 400 detail).
fn check_name(name: &str) -> Result<(), String> {
    validate_node_name(name).map_err(|e| format!("node name {name:?} in the URL: {e}"))
}

async fn put_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(detail) = check_name(&name) {
        return bad_request(detail);
    }
    let req = match parse_register(&body) {
        Ok(req) => req,
        Err(detail) => return bad_request(detail),
    };
    if let Backend::Etcd(etcd) = &shared.backend {
        return replica::put_node(&shared, etcd, &name, &req).await;
    }
    let mut core = shared.core.lock().await;
    // A heartbeat that changes nothing: renewed in place, without copying the registry.
    if core.registry.is_renewal(&name, &req) {
        if let Some(node) = core.registry.renew(&name, shared.clock.now_ms()) {
            let node = node.clone();
            drop(core);
            return register_answer(&shared, &node, "renewed");
        }
    }
    let mut next = core.registry.clone();
    let done = match next.register(&name, &req, shared.clock.now_ms()) {
        Ok(done) => done,
        Err(e) => {
            let (status, kind) = refusal(&e);
            tracing::warn!(node = %name, "registration refused: {e}");
            return error(status, kind, e.to_string());
        }
    };
    if let Err(e) = commit(&shared, &mut core, next, done.changed(), done.event.clone()).await {
        return store_failed(&shared, e);
    }
    let result = match &done.event {
        None => "renewed",
        Some(ev) => {
            tracing::info!(node = %name, underlay_ip = %ev.node.underlay_ip, pod_cidr = %ev.node.pod_cidr,
                revision = ev.revision, "node {}", ev.kind);
            match ev.kind {
                EventType::Added => "added",
                _ => "modified",
            }
        }
    };
    register_answer(&shared, &done.node, result)
}

/// The answer to an accepted registration; `result` is "added", "modified" or "renewed".
pub(crate) fn register_answer(shared: &Shared, node: &Node, result: &'static str) -> Response {
    shared
        .metrics
        .registrations
        .get_or_create(&[("result", result)])
        .inc();
    let ttl = shared.config.lease_ttl.as_millis() as u64;
    Json(RegisterResponse {
        node: node.name.clone(),
        pod_cidr: node.pod_cidr,
        cluster_cidr: shared.config.cluster_cidr,
        lease_ttl_s: ttl.div_ceil(1000),
        lease_ttl_ms: ttl,
        revision: node.revision,
        server_time_ms: Some(shared.clock.now_ms()),
    })
    .into_response()
}

async fn get_node(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if let Err(detail) = check_name(&name) {
        return bad_request(detail);
    }
    let core = shared.core.lock().await;
    match core.registry.node(&name) {
        Some(node) => Json(node.clone()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no node named {name:?}"),
        ),
    }
}

async fn delete_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Err(detail) = check_name(&name) {
        return bad_request(detail);
    }
    let purge = match parse_bool(&params, "purge") {
        Ok(p) => p,
        Err(detail) => return bad_request(detail),
    };
    if let Backend::Etcd(etcd) = &shared.backend {
        return replica::delete_node(&shared, etcd, &name, purge).await;
    }
    let mut core = shared.core.lock().await;
    let mut next = core.registry.clone();
    let Some(event) = next.remove(&name, purge) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no node named {name:?}"),
        );
    };
    // Saved even without an event: a purge of a down node changes the store.
    if let Err(e) = commit(&shared, &mut core, next, true, event).await {
        return store_failed(&shared, e);
    }
    tracing::info!(node = %name, purge, "node left");
    StatusCode::NO_CONTENT.into_response()
}

fn parse_bool(params: &HashMap<String, String>, key: &str) -> Result<bool, String> {
    match params.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(format!(
            "query parameter `{key}`: expected true or false, got {other:?}"
        )),
    }
}

async fn list_or_watch(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let watch = match parse_bool(&params, "watch") {
        Ok(w) => w,
        Err(detail) => return bad_request(detail),
    };
    let since = match params.get("since").map(|s| s.parse::<u64>()) {
        None => None,
        Some(Ok(rev)) => Some(rev),
        Some(Err(_)) => {
            return bad_request(format!(
                "query parameter `since`: expected a revision number, got {:?}",
                params["since"]
            ))
        }
    };
    if !watch {
        let core = shared.core.lock().await;
        let list = NodeList {
            server_time_ms: Some(shared.clock.now_ms()),
            ..core.registry.list()
        };
        return Json(list).into_response();
    }

    let Ok(slot) = shared.watch_slots.clone().try_acquire_owned() else {
        let refused = shared.metrics.watchers_refused.inc() + 1;
        if refused.is_power_of_two() {
            tracing::warn!(
                refused,
                limit = shared.config.max_watchers,
                "watch refused: the watcher limit is reached; every agent needs one watch, \
                 so a bigger cluster needs a higher --max-watchers"
            );
        }
        let mut resp = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_watchers",
            format!(
                "{} watch streams are open, the most this server keeps; retry later \
                 (plain lists without watch=true still work)",
                shared.config.max_watchers
            ),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return resp;
    };
    // Subscribe while holding the lock, so no event falls between the backlog and the feed.
    let (backlog, feed) = {
        let core = shared.core.lock().await;
        let backlog = match since {
            Some(rev) => match core.history.since(rev) {
                Ok(events) => events,
                Err(gone) => return gone_response(gone),
            },
            // No revision: the current live nodes as `added`, then changes (Kubernetes style).
            None => core
                .registry
                .live()
                .map(|node| WatchEvent {
                    kind: EventType::Added,
                    revision: core.registry.revision(),
                    node: node.clone(),
                })
                .collect(),
        };
        (backlog, shared.events.subscribe())
    };
    let start = since.unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(feed_watch(shared.clone(), backlog, feed, start, tx, slot));
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    }));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .expect("static headers are valid")
}

fn gone_response(gone: Gone) -> Response {
    error(StatusCode::GONE, "gone", gone.to_string())
}

fn ndjson(event: &WatchEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).expect("watch events always serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// Writes one watch stream: the backlog, then live events, with keepalive lines when idle.
/// Ends when the client goes away, falls too far behind, or the server stops.
async fn feed_watch(
    shared: Arc<Shared>,
    backlog: Vec<WatchEvent>,
    mut feed: broadcast::Receiver<WatchEvent>,
    mut last: u64,
    tx: mpsc::Sender<Bytes>,
    _slot: OwnedSemaphorePermit,
) {
    shared.metrics.watchers.inc();
    let _gauge = Decrement(&shared.metrics.watchers);
    for ev in backlog {
        last = last.max(ev.revision);
        if tx.send(ndjson(&ev)).await.is_err() {
            return;
        }
    }
    let mut stopping = shared.stopping.subscribe();
    let mut keepalive = tokio::time::interval(shared.config.watch_keepalive);
    keepalive.reset();
    loop {
        let line = tokio::select! {
            received = feed.recv() => match received {
                // Older than what was sent. Equal is new: with the etcd store one revision can
                // carry several events (a compaction's re-read), published together.
                Ok(ev) if ev.revision < last => continue,
                Ok(ev) => {
                    last = ev.revision;
                    ndjson(&ev)
                }
                // Too slow to keep up (or shutting down): the client resumes from `last`.
                Err(_) => return,
            },
            _ = keepalive.tick() => Bytes::from_static(b"\n"),
            _ = stopping.wait_for(|s| *s) => return,
            _ = tx.closed() => return,
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

struct Decrement<'a>(&'a Gauge);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let m = &shared.metrics;
    {
        let core = shared.core.lock().await;
        let (up, down) = core.registry.counts();
        m.nodes.get_or_create(&[("state", "up")]).set(up as i64);
        m.nodes.get_or_create(&[("state", "down")]).set(down as i64);
        m.revision.set(core.registry.revision() as i64);
        m.capacity
            .set(i64::try_from(core.registry.ipam().capacity()).unwrap_or(i64::MAX));
    }
    let available = shared
        .etcd_down
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_none();
    m.store_available.set(i64::from(available));
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&m.registry),
    )
        .into_response()
}

/// `ok`; with the etcd store, `degraded` while etcd cannot take writes (reads and watches are
/// still served from the last state, so the status stays 200).
async fn healthz(State(shared): State<Arc<Shared>>) -> String {
    match &*shared.etcd_down.lock().unwrap_or_else(|e| e.into_inner()) {
        None => "ok\n".to_string(),
        Some(why) => format!(
            "degraded: serving reads and watches from the last state; writes fail until etcd is \
             back: {why}\n"
        ),
    }
}

/// Connection limits below HTTP, which `axum::serve` has no settings for: a cap on open
/// connections, a deadline for each request's headers, an idle timeout, and a write-stall
/// timeout. Slow or silent clients lose their connection; everyone else keeps being served.
mod guard {
    use std::future::Future;
    use std::io;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use axum::extract::connect_info::Connected;
    use axum::serve::IncomingStream;
    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
    use tokio::time::{sleep, Instant, Sleep};

    use super::Shared;
    use crate::tls::Identity;

    /// End of an HTTP/1 header block.
    const HEADERS_END: &[u8; 4] = b"\r\n\r\n";

    /// What is sent to a connection over the limit before closing it.
    pub(super) const FULL: &[u8] =
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 5\r\ncontent-length: 88\r\n\r\n\
{\"error\":\"too_many_connections\",\"detail\":\"the server has reached its connection limit\"}\n";

    /// A connection as the router sees it: the client's address and, under mTLS, who its
    /// certificate names.
    #[derive(Clone, Debug)]
    pub(super) struct Peer {
        pub(super) addr: SocketAddr,
        pub(super) identity: Option<Arc<Identity>>,
    }

    impl Connected<IncomingStream<'_, Guarded>> for Peer {
        fn connect_info(stream: IncomingStream<'_, Guarded>) -> Peer {
            stream.remote_addr().clone()
        }
    }

    /// Connections ready for HTTP: counted against the limit and, under TLS, past their
    /// handshake. Accepting and handshaking run in tasks of their own, so a slow handshake
    /// never holds up the next client.
    pub(super) struct Guarded {
        ready: mpsc::Receiver<(GuardedStream, Peer)>,
        local: SocketAddr,
        acceptor: tokio::task::JoinHandle<()>,
    }

    impl Guarded {
        pub(super) fn new(inner: TcpListener, shared: Arc<Shared>) -> Guarded {
            let local = inner
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            let (tx, ready) = mpsc::channel(64);
            let slots = Arc::new(Semaphore::new(shared.config.max_connections));
            let acceptor = tokio::spawn(accept_loop(inner, slots, shared, tx));
            Guarded {
                ready,
                local,
                acceptor,
            }
        }
    }

    impl Drop for Guarded {
        fn drop(&mut self) {
            self.acceptor.abort();
        }
    }

    async fn accept_loop(
        inner: TcpListener,
        slots: Arc<Semaphore>,
        shared: Arc<Shared>,
        ready: mpsc::Sender<(GuardedStream, Peer)>,
    ) {
        loop {
            let (stream, addr) = match inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the kernel keeps
                    // the backlog meanwhile.
                    tracing::warn!("accept failed: {e}");
                    sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let metrics = &shared.metrics;
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let refused = metrics
                    .connections_closed
                    .get_or_create(&[("reason", "limit")])
                    .inc()
                    + 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        refused,
                        limit = shared.config.max_connections,
                        "connection refused: the connection limit is reached; raise \
                         --max-connections if these are agents"
                    );
                }
                tokio::spawn(answer_and_close(stream, FULL));
                continue;
            };
            metrics.connections.inc();
            let shared = shared.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let Some((io, identity)) = handshake(stream, addr, &shared).await else {
                    shared.metrics.connections.dec();
                    return;
                };
                let conn = GuardedStream::new(io, permit, shared);
                let _ = ready.send((conn, Peer { addr, identity })).await;
            });
        }
    }

    /// Writes a whole answer to a connection that will not be served, and closes it.
    async fn answer_and_close(mut stream: TcpStream, answer: &'static [u8]) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(answer).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }

    /// The TLS handshake, if the service speaks TLS, within the header timeout. A client that
    /// speaks plain HTTP to it gets a plain-HTTP answer that says to use https.
    async fn handshake(
        stream: TcpStream,
        addr: SocketAddr,
        shared: &Shared,
    ) -> Option<(Conn, Option<Arc<Identity>>)> {
        let Some(config) = &shared.config.tls else {
            return Some((Conn::Plain(stream), None));
        };
        let deadline = shared.config.header_timeout;
        let mut first = [0u8; 1];
        match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
            Ok(Ok(1)) => {
                tracing::debug!(%addr, "plain HTTP on the TLS port: answered 400");
                answer_and_close(stream, PLAIN_ON_TLS).await;
                return None;
            }
            _ => return None,
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
        let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let e = e.to_string();
                let advice = crate::tls::advice(&e).unwrap_or("");
                tracing::warn!(%addr, "TLS handshake refused: {e}. {advice}");
                return None;
            }
            Err(_) => return None,
        };
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(crate::tls::identity)
            .map(Arc::new);
        Some((Conn::Tls(Box::new(tls)), identity))
    }

    /// First byte of a TLS handshake record.
    const TLS_HANDSHAKE: u8 = 0x16;

    /// What a plain-HTTP client on the TLS port is told.
    const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 114\r\n\r\n\
{\"error\":\"tls_required\",\"detail\":\"this service speaks HTTPS with client certificates: use https:// and --tls-ca\"}\n";

    impl axum::serve::Listener for Guarded {
        type Io = GuardedStream;
        type Addr = Peer;

        async fn accept(&mut self) -> (GuardedStream, Peer) {
            match self.ready.recv().await {
                Some(conn) => conn,
                // The accept task only ends with the listener.
                None => std::future::pending().await,
            }
        }

        fn local_addr(&self) -> io::Result<Peer> {
            Ok(Peer {
                addr: self.local,
                identity: None,
            })
        }
    }

    /// The bytes under HTTP: plain TCP, or TLS over it.
    pub(super) enum Conn {
        Plain(TcpStream),
        Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    }

    impl AsyncRead for Conn {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
                Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.get_mut() {
                Conn::Plain(s) => Pin::new(s).poll_write(cx, data),
                Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
            }
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Conn::Plain(s) => Pin::new(s).poll_flush(cx),
                Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            }
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
                Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            }
        }
    }

    /// Where a connection is in its request/response cycle, as far as the bytes tell.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Phase {
        /// Waiting for the end of a header block; `matched` bytes of `\r\n\r\n` seen.
        Headers { matched: usize },
        /// Headers done: reading a body or answering. `responded` once the server wrote,
        /// so the next bytes from the client start a new request.
        Request { responded: bool },
    }

    pub(super) struct GuardedStream {
        io: Conn,
        _permit: OwnedSemaphorePermit,
        shared: Arc<Shared>,
        phase: Phase,
        /// Header deadline in `Headers`, idle deadline in `Request`.
        deadline: Pin<Box<Sleep>>,
        /// Running while a write is pending.
        stall: Option<Pin<Box<Sleep>>>,
    }

    impl GuardedStream {
        fn new(io: Conn, permit: OwnedSemaphorePermit, shared: Arc<Shared>) -> Self {
            let deadline = Box::pin(sleep(shared.config.header_timeout));
            GuardedStream {
                io,
                _permit: permit,
                shared,
                phase: Phase::Headers { matched: 0 },
                deadline,
                stall: None,
            }
        }

        fn rearm(&mut self, after: Duration) {
            self.deadline.as_mut().reset(Instant::now() + after);
        }

        fn timed_out(&self, what: &str) -> io::Error {
            self.shared
                .metrics
                .connections_closed
                .get_or_create(&[("reason", "timeout")])
                .inc();
            tracing::debug!("closing connection: {what}");
            io::Error::new(io::ErrorKind::TimedOut, what.to_string())
        }

        /// Follows the request cycle through bytes the client sent.
        fn saw(&mut self, bytes: &[u8]) {
            let shared = self.shared.clone();
            let config = &shared.config;
            let mut rest = bytes;
            while !rest.is_empty() {
                match self.phase {
                    Phase::Request { responded: false } => return,
                    Phase::Request { responded: true } => {
                        self.phase = Phase::Headers { matched: 0 };
                        let timeout = config.header_timeout;
                        self.rearm(timeout);
                    }
                    Phase::Headers { matched } => {
                        let mut m = matched;
                        let mut done = None;
                        for (i, &b) in rest.iter().enumerate() {
                            m = if b == HEADERS_END[m] {
                                m + 1
                            } else if b == HEADERS_END[0] {
                                1
                            } else {
                                0
                            };
                            if m == HEADERS_END.len() {
                                done = Some(i + 1);
                                break;
                            }
                        }
                        match done {
                            Some(n) => {
                                self.phase = Phase::Request { responded: false };
                                let timeout = config.idle_timeout;
                                self.rearm(timeout);
                                rest = &rest[n..];
                            }
                            None => {
                                self.phase = Phase::Headers { matched: m };
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    impl AsyncRead for GuardedStream {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            if this.deadline.as_mut().poll(cx).is_ready() {
                let what = match this.phase {
                    Phase::Headers { .. } => "request headers not received in time",
                    Phase::Request { .. } => "connection idle",
                };
                return Poll::Ready(Err(this.timed_out(what)));
            }
            let before = buf.filled().len();
            let result = Pin::new(&mut this.io).poll_read(cx, buf);
            if let Poll::Ready(Ok(())) = result {
                let new = buf.filled()[before..].to_vec();
                this.saw(&new);
            }
            result
        }
    }

    impl AsyncWrite for GuardedStream {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            match Pin::new(&mut this.io).poll_write(cx, data) {
                Poll::Pending => {
                    let timeout = this.shared.config.write_stall_timeout;
                    let stall = this.stall.get_or_insert_with(|| Box::pin(sleep(timeout)));
                    if stall.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(this.timed_out("client stopped reading")));
                    }
                    Poll::Pending
                }
                Poll::Ready(Ok(n)) => {
                    this.stall = None;
                    if n > 0 {
                        if let Phase::Request { .. } = this.phase {
                            this.phase = Phase::Request { responded: true };
                            let timeout = this.shared.config.idle_timeout;
                            this.rearm(timeout);
                        }
                    }
                    Poll::Ready(Ok(n))
                }
                other => other,
            }
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    impl Drop for GuardedStream {
        fn drop(&mut self) {
            self.shared.metrics.connections.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use podnet_proto::api::NodeState;

    /// Leases lapse on the service's monotonic lease clock. Tokio's paused clock stands in for
    /// the monotonic one here: it moves only when the test advances it, while the wall clock
    /// runs on regardless (a service reading the wall clock would see the 21 s never pass).
    #[tokio::test(start_paused = true)]
    async fn leases_lapse_on_the_monotonic_clock_not_the_wall_clock() {
        let config = ServerConfig {
            lease_ttl: Duration::from_secs(20),
            ..ServerConfig::default()
        };
        let server = Server::open(config, Arc::new(MemoryStore::default()))
            .await
            .unwrap();
        let shared = server.shared.clone();
        let state = |shared: &Arc<Shared>| {
            let core = shared.core.try_lock().expect("no request in flight");
            core.registry
                .node("n1")
                .map(|n| (n.state, n.last_heartbeat))
        };
        let body = Bytes::from_static(br#"{"underlay_ip":"198.18.0.1","encap":"vxlan"}"#);
        let answer = put_node(State(shared.clone()), Path("n1".into()), body).await;
        assert_eq!(answer.status(), StatusCode::OK);
        let (_, registered) = state(&shared).unwrap();
        assert!(
            registered.abs_diff(now_ms()) < 5_000,
            "anchored on the wall clock"
        );
        let sweeper = tokio::spawn(sweep(shared.clone()));
        tokio::time::sleep(Duration::from_secs(19)).await;
        assert_eq!(
            state(&shared).unwrap().0,
            NodeState::Up,
            "lease still running"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            state(&shared).unwrap(),
            (NodeState::Down, registered),
            "lapsed 20 s after the heartbeat, on the lease clock"
        );
        sweeper.abort();
    }

    #[test]
    fn connection_limit_answer_is_well_formed_json() {
        let text = std::str::from_utf8(guard::FULL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), len);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "too_many_connections");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn register_bodies_name_the_bad_field() {
        let ok = parse_register(br#"{"underlay_ip":"198.18.0.1","encap":"vxlan","vtep_mac":null}"#)
            .unwrap();
        assert_eq!(ok.underlay_ip, Ipv4Addr::new(198, 18, 0, 1));
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"{", "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"encap":"vxlan"}"#, "field `underlay_ip`: missing"),
            (
                br#"{"underlay_ip":"198.18.0.300","encap":"vxlan"}"#,
                "field `underlay_ip`",
            ),
            (
                br#"{"underlay_ip":7,"encap":"vxlan"}"#,
                "field `underlay_ip`",
            ),
            (br#"{"underlay_ip":"198.18.0.1"}"#, "field `encap`: missing"),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"gre"}"#,
                "field `encap`",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"ipip","vtep_mac":5}"#,
                "field `vtep_mac`",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"ipip","vtep_mac":"02:00"}"#,
                "field `vtep_mac`",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"ipip","underlay":"x"}"#,
                "field `underlay`",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"wireguard"}"#,
                "field `wireguard_public_key`: missing",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"wireguard","wireguard_public_key":"AAAA"}"#,
                "decodes to 3 bytes",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"wireguard","wireguard_public_key":"not base64!"}"#,
                "not a WireGuard key",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"vxlan","wireguard_public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#,
                "only a node with encap \"wireguard\"",
            ),
        ];
        let wg = parse_register(
            br#"{"underlay_ip":"198.18.0.1","encap":"wireguard","wireguard_public_key":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}"#,
        )
        .unwrap();
        let key = wg.wireguard_public_key.unwrap();
        assert_eq!(key.0[0], 1);
        assert_eq!(key.0[31], 32);
        assert_eq!(key.short(), "AQIDBAUG");
        for (body, expect) in cases {
            let err = parse_register(body).unwrap_err();
            assert!(
                err.contains(expect),
                "{:?}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
