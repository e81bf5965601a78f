//! Client library for the control API, used by `podnet-agent` and `podnet-control nodes`.
//!
//! [`Client`] makes single calls. Two long-running loops build on it:
//! [`Client::keep_registered`] renews the node's lease at a third of its TTL, and
//! [`Client::watch`] keeps a [`NodeTable`] current through a `tokio::sync::watch` channel:
//! list once, then follow the NDJSON watch; on a broken connection reconnect with exponential
//! backoff and jitter and resume from the last revision, listing again only when the server
//! answers 410 Gone. While the server is away the channel simply keeps its last table, so the
//! agent keeps forwarding with it.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use podnet_proto::api::{
    validate_node_name, ErrorBody, Node, NodeList, NodeTable, RegisterRequest, RegisterResponse,
    WatchEvent,
};
use reqwest::StatusCode;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::tls::ClientFiles;

/// How long a single call may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A watch stream silent for this long is presumed dead (the server sends a keepalive line
/// every 10 s by default).
const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(35);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid control service URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid node name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("control-plane TLS: {0}")]
    Tls(String),
    #[error("cannot read token file {path}: {reason}")]
    TokenFile { path: String, reason: String },
    #[error("cannot reach the control service at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("control service answered {status} for {url}: {body}")]
    Status {
        url: String,
        status: u16,
        body: ErrorBody,
    },
    #[error("unexpected answer from the control service at {url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error(
        "the control service now assigns pod CIDR {new} to this node instead of {old}; \
         restart the agent to move its pods"
    )]
    CidrChanged { old: Ipv4Net, new: Ipv4Net },
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether trying again later can help (network trouble, server overloaded or restarting),
    /// as opposed to a refusal the user must act on (400, 401, 409, 507, ...).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Protocol { .. } => true,
            ClientError::Status { status, .. } => {
                matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
            }
            _ => false,
        }
    }
}

/// Counters of what the client did, for the agent's status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Full lists fetched by [`Client::watch`] (the first one included).
    pub relists: u64,
    /// Watch connections (re)opened by [`Client::watch`].
    pub watch_connects: u64,
    /// Watch events applied to the table.
    pub events: u64,
    /// Successful lease renewals by [`Client::keep_registered`].
    pub renewals: u64,
    /// Failed renewal attempts (retried).
    pub renew_failures: u64,
    /// A watch stream is open right now.
    pub watching: bool,
}

#[derive(Default)]
struct Counters {
    relists: AtomicU64,
    watch_connects: AtomicU64,
    events: AtomicU64,
    renewals: AtomicU64,
    renew_failures: AtomicU64,
    watching: std::sync::atomic::AtomicBool,
}

struct Inner {
    /// The replicas' base URLs; calls go to `bases[current]` until it fails.
    bases: Vec<String>,
    current: AtomicUsize,
    token: Option<String>,
    http: reqwest::Client,
    counters: Counters,
    /// How far the service's clock is ahead of ours in milliseconds, measured at the last
    /// registration or renewal; `UNKNOWN_OFFSET` until one has answered with its time.
    server_offset_ms: AtomicI64,
}

const UNKNOWN_OFFSET: i64 = i64::MIN;

/// A handle on the control service (one URL, or several replicas to fail over between);
/// cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Reads a bearer token file (surrounding whitespace ignored; an empty file is an error).
pub fn read_token_file(path: &Path) -> Result<String, ClientError> {
    let err = |reason: String| ClientError::TokenFile {
        path: path.display().to_string(),
        reason,
    };
    let token = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(token.to_string())
}

impl Client {
    /// A plain-HTTP client; `server` is a base URL such as `http://198.18.0.1:7800`.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        Client::with_tls(server, token, None)
    }

    /// A client of `https://HOST:PORT` with `tls` (the CA it trusts, and the certificate it
    /// presents, reread at each new connection after it changed on disk), or of
    /// `http://HOST:PORT` without. `servers` may list several replicas, comma-separated: a
    /// call that cannot reach one (or that it answers 502, 503 or 504) moves the client on to
    /// the next, and retries back off as with one.
    pub fn with_tls(
        servers: &str,
        token: Option<String>,
        tls: Option<&ClientFiles>,
    ) -> Result<Client, ClientError> {
        let bases = servers
            .split(',')
            .map(|url| check_base(url.trim(), tls.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if let Some(files) = tls {
            let config =
                crate::tls::client_config(files).map_err(|e| ClientError::Tls(e.to_string()))?;
            builder = builder.use_preconfigured_tls(config);
        }
        let http = builder.build().map_err(|e| ClientError::BadUrl {
            url: servers.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Client {
            inner: Arc::new(Inner {
                bases,
                current: AtomicUsize::new(0),
                token,
                http,
                counters: Counters::default(),
                server_offset_ms: AtomicI64::new(UNKNOWN_OFFSET),
            }),
        })
    }

    /// The replica calls go to now.
    pub fn server(&self) -> &str {
        let i = self.inner.current.load(Ordering::Relaxed);
        &self.inner.bases[i % self.inner.bases.len()]
    }

    /// Every replica the client knows.
    pub fn servers(&self) -> &[String] {
        &self.inner.bases
    }

    /// Moves on to the next replica after a call to `failed_url` failed, unless another
    /// call already did.
    fn fail_over(&self, failed_url: &str, why: &str) {
        let bases = &self.inner.bases;
        if bases.len() < 2 {
            return;
        }
        let i = self.inner.current.load(Ordering::Relaxed) % bases.len();
        if !failed_url.starts_with(&bases[i]) {
            return;
        }
        let next = (i + 1) % bases.len();
        if self
            .inner
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(from = %bases[i], to = %bases[next], "control replica failed ({why}), failing over");
        }
    }
}

/// Checks one base URL: a scheme that fits the TLS settings, a host and port, no path.
fn check_base(server: &str, tls: bool) -> Result<String, ClientError> {
    {
        let bad = |reason: &str| ClientError::BadUrl {
            url: server.to_string(),
            reason: reason.to_string(),
        };
        let base = server.trim_end_matches('/');
        let rest = match (base.split_once("://"), tls) {
            (Some(("http", rest)), false) | (Some(("https", rest)), true) => rest,
            (Some(("https", _)), false) => {
                return Err(bad(
                    "https:// needs --tls-ca (the cluster CA) and, for mTLS, --tls-cert and \
                     --tls-key",
                ))
            }
            (Some(("http", _)), true) => {
                return Err(bad(
                    "TLS files were given for a plain http:// URL: use https://",
                ))
            }
            _ => return Err(bad("expected https://HOST:PORT or http://HOST:PORT")),
        };
        if rest.is_empty() || rest.contains('/') {
            return Err(bad("expected a URL without a path"));
        }
        Ok(base.to_string())
    }
}

impl Client {
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            relists: load(&c.relists),
            watch_connects: load(&c.watch_connects),
            events: load(&c.events),
            renewals: load(&c.renewals),
            renew_failures: load(&c.renew_failures),
            watching: c.watching.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.server(), path)
    }

    fn node_url(&self, name: &str) -> Result<String, ClientError> {
        validate_node_name(name).map_err(|e| ClientError::BadName {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        Ok(self.url(&format!("/v1/nodes/{name}")))
    }

    pub(crate) fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let builder = self.inner.http.request(method, url);
        match &self.inner.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends a request and turns transport failures and error statuses into [`ClientError`].
    pub(crate) async fn send(
        &self,
        url: &str,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = builder.send().await.map_err(|e| {
            let reason = error_chain(&e);
            self.fail_over(url, &reason);
            ClientError::Unreachable {
                url: url.to_string(),
                reason,
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if matches!(status.as_u16(), 502..=504) {
            self.fail_over(url, status.as_str());
        }
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or_else(|_| ErrorBody {
            error: status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase(),
            detail: (!text.trim().is_empty()).then(|| text.trim().to_string()),
        });
        Err(ClientError::Status {
            url: url.to_string(),
            status: status.as_u16(),
            body,
        })
    }

    pub(crate) async fn json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        resp: reqwest::Response,
    ) -> Result<T, ClientError> {
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: url.to_string(),
            reason: error_chain(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            url: url.to_string(),
            reason: e.to_string(),
        })
    }

    /// Joins the cluster or renews the lease: `PUT /v1/nodes/{name}`.
    pub async fn register(
        &self,
        name: &str,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, ClientError> {
        let url = self.node_url(name)?;
        let builder = self
            .request(reqwest::Method::PUT, &url)
            .json(req)
            .timeout(CALL_TIMEOUT);
        let sent = now_ms();
        let resp = self.send(&url, builder).await?;
        let answer: RegisterResponse = self.json(&url, resp).await?;
        if let Some(server) = answer.server_time_ms {
            // The service read its clock somewhere within the call: take the middle.
            let back = now_ms();
            let middle = sent + back.saturating_sub(sent) / 2;
            let offset = server as i64 - middle as i64;
            self.inner.server_offset_ms.store(offset, Ordering::Relaxed);
        }
        Ok(answer)
    }

    /// The control service's clock now (Unix milliseconds, the clock node heartbeat times are
    /// on): ours plus the offset measured at the last registration or renewal, to within half
    /// that call's round trip, whatever the two hosts' clocks say. `None` until a registration
    /// has answered, or with a service too old to send its time.
    pub fn server_time_ms(&self) -> Option<u64> {
        match self.inner.server_offset_ms.load(Ordering::Relaxed) {
            UNKNOWN_OFFSET => None,
            offset => Some((now_ms() as i64).saturating_add(offset).max(0) as u64),
        }
    }

    /// [`Client::register`], retried with backoff while the service is unreachable or
    /// overloaded; refusals (400, 401, 409, 507, ...) are returned at once.
    pub async fn register_with_retry(
        &self,
        name: &str,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, ClientError> {
        let mut backoff = Backoff::default();
        loop {
            match self.register(name, req).await {
                Err(e) if e.is_retryable() => {
                    let delay = backoff.next_delay();
                    tracing::warn!("registration failed, retrying in {delay:?}: {e}");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// All nodes, live and down: `GET /v1/nodes`.
    pub async fn list(&self) -> Result<NodeList, ClientError> {
        let url = self.url("/v1/nodes");
        let builder = self
            .request(reqwest::Method::GET, &url)
            .timeout(CALL_TIMEOUT);
        let resp = self.send(&url, builder).await?;
        self.json(&url, resp).await
    }

    /// One node: `GET /v1/nodes/{name}`.
    pub async fn node(&self, name: &str) -> Result<Node, ClientError> {
        let url = self.node_url(name)?;
        let builder = self
            .request(reqwest::Method::GET, &url)
            .timeout(CALL_TIMEOUT);
        let resp = self.send(&url, builder).await?;
        self.json(&url, resp).await
    }

    /// Graceful leave: `DELETE /v1/nodes/{name}`. The pod CIDR stays reserved for the name
    /// unless `purge` releases it.
    pub async fn delete(&self, name: &str, purge: bool) -> Result<(), ClientError> {
        let mut url = self.node_url(name)?;
        if purge {
            url.push_str("?purge=true");
        }
        let builder = self
            .request(reqwest::Method::DELETE, &url)
            .timeout(CALL_TIMEOUT);
        self.send(&url, builder).await.map(drop)
    }

    /// Opens one watch stream: events after `since`, or every live node as `added` first when
    /// `since` is `None`. A 410 answer (status 410) means: list again.
    pub async fn watch_stream(&self, since: Option<u64>) -> Result<EventStream, ClientError> {
        let url = match since {
            Some(rev) => self.url(&format!("/v1/nodes?watch=true&since={rev}")),
            None => self.url("/v1/nodes?watch=true"),
        };
        // No overall timeout: the stream is meant to stay open. Idleness is checked per read.
        let builder = self.request(reqwest::Method::GET, &url);
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.send(&url, builder))
            .await
            .map_err(|_| {
                let reason = format!("no answer within {CALL_TIMEOUT:?}");
                self.fail_over(&url, &reason);
                ClientError::Unreachable {
                    url: url.clone(),
                    reason,
                }
            })??;
        Ok(EventStream {
            url,
            resp,
            buf: Vec::new(),
        })
    }

    /// Renews the lease at a third of its TTL for as long as it runs. Failed renewals are
    /// retried with backoff (never waiting longer than the renewal period). Returns only on a
    /// refusal the agent must act on, e.g. 409 or [`ClientError::CidrChanged`].
    pub async fn keep_registered(
        &self,
        name: &str,
        req: &RegisterRequest,
        lease: &RegisterResponse,
    ) -> ClientError {
        let period = Duration::from_millis((lease.lease_ttl_ms / 3).max(10));
        let mut backoff = Backoff::new(Duration::from_millis(100), period);
        let mut wait = period;
        loop {
            tokio::time::sleep(wait).await;
            match self.register(name, req).await {
                Ok(now) if now.pod_cidr != lease.pod_cidr => {
                    return ClientError::CidrChanged {
                        old: lease.pod_cidr,
                        new: now.pod_cidr,
                    };
                }
                Ok(_) => {
                    self.inner.counters.renewals.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    wait = period;
                }
                Err(e) if e.is_retryable() => {
                    self.inner
                        .counters
                        .renew_failures
                        .fetch_add(1, Ordering::Relaxed);
                    wait = backoff.next_delay();
                    tracing::warn!("lease renewal failed, retrying in {wait:?}: {e}");
                }
                Err(e) => return e,
            }
        }
    }

    /// Keeps `updates` holding the current table of live nodes until every receiver is gone.
    ///
    /// Starts from `start` (e.g. the table the agent persisted) by resuming the watch from its
    /// revision, or lists first when there is none. Connection trouble is logged and retried
    /// with backoff forever; meanwhile `updates` keeps its last table. A new value is published
    /// only when the table actually changed.
    pub async fn watch(&self, start: Option<NodeTable>, updates: watch::Sender<NodeTable>) {
        tokio::select! {
            never = self.follow(start, &updates) => match never {},
            () = updates.closed() => {}
        }
    }

    async fn follow(
        &self,
        start: Option<NodeTable>,
        updates: &watch::Sender<NodeTable>,
    ) -> Infallible {
        let counters = &self.inner.counters;
        let mut backoff = Backoff::default();
        let mut table = start;
        if let Some(table) = &table {
            publish(updates, table);
        }
        loop {
            let current = match table.take() {
                Some(t) => t,
                None => match self.list().await {
                    Ok(list) => {
                        counters.relists.fetch_add(1, Ordering::Relaxed);
                        let t = NodeTable::from_list(list);
                        publish(updates, &t);
                        t
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!("listing nodes failed, retrying in {delay:?}: {e}");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                },
            };
            let mut current = current;
            match self.watch_stream(Some(current.revision)).await {
                Ok(mut stream) => {
                    counters.watch_connects.fetch_add(1, Ordering::Relaxed);
                    counters.watching.store(true, Ordering::Relaxed);
                    backoff.reset();
                    tracing::debug!(since = current.revision, "watching nodes");
                    loop {
                        match stream.next_event().await {
                            Ok(Some(event)) => {
                                if current.apply(&event) {
                                    counters.events.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(node = %event.node.name, revision = event.revision, "node {}", event.kind);
                                    publish(updates, &current);
                                }
                            }
                            Ok(None) => {
                                tracing::info!("control service closed the watch, reconnecting");
                                self.fail_over(&stream.url, "watch closed");
                                break;
                            }
                            Err(e) => {
                                tracing::debug!("watch interrupted: {e}");
                                self.fail_over(&stream.url, "watch interrupted");
                                break;
                            }
                        }
                    }
                    counters.watching.store(false, Ordering::Relaxed);
                    table = Some(current);
                }
                Err(e) if e.status() == Some(StatusCode::GONE.as_u16()) => {
                    // Our revision fell out of the server's history: list afresh (table stays
                    // None). Until the list arrives, `updates` still holds the old table.
                    tracing::info!(
                        since = current.revision,
                        "watch revision too old, listing again"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::debug!("cannot watch nodes: {e}");
                    table = Some(current);
                }
            }
            let delay = backoff.next_delay();
            tokio::time::sleep(delay).await;
        }
    }
}

fn publish(updates: &watch::Sender<NodeTable>, table: &NodeTable) {
    updates.send_if_modified(|cur| {
        if cur == table {
            return false;
        }
        cur.clone_from(table);
        true
    });
}

/// One open watch connection, read event by event.
pub struct EventStream {
    url: String,
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event; `Ok(None)` when the server ended the stream. Keepalive lines are
    /// skipped; a stream silent for longer than the idle timeout is an error.
    pub async fn next_event(&mut self) -> Result<Option<WatchEvent>, ClientError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = &line[..end];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map(Some)
                    .map_err(|e| ClientError::Protocol {
                        url: self.url.clone(),
                        reason: format!("bad watch event: {e}"),
                    });
            }
            let chunk = tokio::time::timeout(WATCH_IDLE_TIMEOUT, self.resp.chunk())
                .await
                .map_err(|_| ClientError::Unreachable {
                    url: self.url.clone(),
                    reason: format!("watch stream silent for {WATCH_IDLE_TIMEOUT:?}"),
                })?
                .map_err(|e| ClientError::Unreachable {
                    url: self.url.clone(),
                    reason: error_chain(&e),
                })?;
            match chunk {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => return Ok(None),
            }
        }
    }
}

/// An error with its causes, and what to do when a TLS check failed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = crate::tls::causes(e);
    if let Some(advice) = crate::tls::advice(&out) {
        out.push_str(". ");
        out.push_str(advice);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_proto::api::Encap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot stand-in for the service on a loopback port: answers one registration,
    /// with its clock (ours moved by `skew_ms`) if `sends_clock`.
    async fn fake_service(skew_ms: i64, sends_clock: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then as much body as they declare.
            let body_len = loop {
                let n = conn.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client hung up mid-request");
                req.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&req).to_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let declared = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if req.len() >= end + 4 + declared {
                        break declared;
                    }
                }
            };
            assert!(body_len > 0, "a registration has a body");
            let clock = (now_ms() as i64 + skew_ms) as u64;
            let json = answer(sends_clock.then_some(clock));
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{json}",
                json.len()
            );
            conn.write_all(answer.as_bytes()).await.unwrap();
            let _ = conn.shutdown().await;
        });
        url
    }

    fn answer(clock: Option<u64>) -> String {
        let mut v = serde_json::json!({
            "node": "n1", "pod_cidr": "10.244.1.0/24", "cluster_cidr": "10.244.0.0/16",
            "lease_ttl_s": 20, "lease_ttl_ms": 20000, "revision": 1,
        });
        if let Some(ms) = clock {
            v["server_time_ms"] = ms.into();
        }
        v.to_string()
    }

    fn request() -> RegisterRequest {
        RegisterRequest {
            wireguard_public_key: None,
            underlay_ip: "198.18.0.1".parse().unwrap(),
            encap: Encap::Vxlan,
            vtep_mac: None,
        }
    }

    /// Heartbeat times are on the service's clock; a client on a host whose clock is an hour
    /// off still reads that clock right, from the time the service sends with each answer.
    #[tokio::test]
    async fn the_service_clock_is_learnt_from_registrations_not_assumed() {
        const HOUR_BEHIND: i64 = -3_600_000;
        let url = fake_service(HOUR_BEHIND, true).await;
        let client = Client::new(&url, None).unwrap();
        assert_eq!(
            client.server_time_ms(),
            None,
            "nothing learnt before a registration"
        );
        let lease = client.register("n1", &request()).await.unwrap();
        assert!(lease.server_time_ms.is_some());
        let theirs = client.server_time_ms().unwrap() as i64;
        let want = now_ms() as i64 + HOUR_BEHIND;
        assert!((theirs - want).abs() < 1_000, "off by {} ms", theirs - want);

        // A service too old to send its time leaves the clock unknown, and callers fall back.
        let url = fake_service(0, false).await;
        let client = Client::new(&url, None).unwrap();
        let lease = client.register("n1", &request()).await.unwrap();
        assert_eq!(
            (lease.server_time_ms, client.server_time_ms()),
            (None, None)
        );
    }

    #[test]
    fn urls_are_checked() {
        assert!(Client::new("http://198.18.0.1:7800", None).is_ok());
        assert_eq!(
            Client::new("http://198.18.0.1:7800/", None)
                .unwrap()
                .server(),
            "http://198.18.0.1:7800"
        );
        assert!(matches!(
            Client::new("https://x:1", None),
            Err(ClientError::BadUrl { .. })
        ));
        assert!(Client::new("198.18.0.1:7800", None).is_err());
        assert!(Client::new("http://h:1/v1", None).is_err());
    }

    #[test]
    fn token_files_are_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "s3cret");
        std::fs::write(&path, " \n").unwrap();
        assert!(read_token_file(&path).is_err());
        assert!(read_token_file(&dir.path().join("missing")).is_err());
    }
}
