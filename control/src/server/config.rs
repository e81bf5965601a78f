//! What `podnet-control serve` is told, and why it refuses to start.

use std::sync::Arc;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::etcd::EtcdError;
use crate::ipam::{Ipam, IpamError};
use crate::state::{RestoreError, Timing};
use crate::store::StoreError;

/// Settings of `podnet-control serve`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub cluster_cidr: Ipv4Net,
    pub node_prefix: u8,
    /// The IPv6 pod network of a dual-stack cluster (`--cluster-cidr-v6`): every node also gets
    /// a `/node_prefix_v6` block of it.
    pub cluster_cidr_v6: Option<Ipv6Net>,
    pub node_prefix_v6: u8,
    pub lease_ttl: Duration,
    pub reclaim_after: Duration,
    /// Bearer token required on every call but `/healthz`.
    pub token: Option<String>,
    /// Watch events kept for resuming watches.
    pub history_len: usize,
    pub max_body_bytes: usize,
    /// The body limit of `POST /v1/policies`, whose documents are larger than any other
    /// request (a hundred policies are about 50 KB).
    pub max_policy_body_bytes: usize,
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

impl ServerConfig {
    /// The body limit of a request to `path`.
    pub fn body_limit(&self, path: &str) -> usize {
        if path == "/v1/policies" {
            self.max_policy_body_bytes
        } else {
            self.max_body_bytes
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            cluster_cidr: "10.244.0.0/16".parse().expect("literal CIDR"),
            node_prefix: 24,
            cluster_cidr_v6: None,
            node_prefix_v6: 64,
            lease_ttl: Duration::from_secs(20),
            reclaim_after: Duration::from_secs(24 * 3600),
            token: None,
            history_len: 1024,
            max_body_bytes: 16 * 1024,
            max_policy_body_bytes: 1024 * 1024,
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
    #[error("invalid pod network layout (--cluster-cidr, --node-prefix and their -v6 forms): {0}")]
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

/// Checks the settings both stores share and makes the IPAM and lease timing from them.
pub(super) fn check(config: &ServerConfig) -> Result<(Ipam, Timing), ServerError> {
    if config.lease_ttl < Duration::from_millis(10) {
        return Err(ServerError::LeaseTtl);
    }
    if config.idle_timeout <= config.watch_keepalive {
        return Err(ServerError::IdleTimeout {
            idle: config.idle_timeout,
            keepalive: config.watch_keepalive,
        });
    }
    let mut ipam = Ipam::new(config.cluster_cidr, config.node_prefix)?;
    if let Some(v6) = config.cluster_cidr_v6 {
        ipam = ipam.with_v6(v6, config.node_prefix_v6)?;
    }
    let timing = Timing {
        lease_ttl_ms: config.lease_ttl.as_millis() as u64,
        reclaim_after_ms: config.reclaim_after.as_millis() as u64,
    };
    Ok((ipam, timing))
}
