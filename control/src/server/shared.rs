//! What every request and background task of the service shares, and the one interface
//! through which they change the node table whatever the store.

use std::sync::Arc;

use axum::response::Response;
use futures_util::future::BoxFuture;
use podnet_proto::api::{RegisterRequest, WatchEvent};
use tokio::sync::{broadcast, watch, Semaphore};
use tokio::task::JoinHandle;

use super::config::ServerConfig;
use super::metrics::Metrics;
use crate::clock::LeaseClock;
use crate::etcd::Mirror;
use crate::policy::{PolicyBook, PolicyChange};
use crate::state::{History, Registry};

/// The node table and what follows it, behind the one lock that orders changes.
pub(crate) struct Core {
    pub(crate) registry: Registry,
    pub(crate) history: History,
    /// With the etcd store: the key revisions and leases behind `registry`.
    pub(crate) mirror: Mirror,
    /// Pods, namespace labels and network policies.
    pub(crate) book: PolicyBook,
}

/// The service's state, one per process, shared by every handler and background task.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) core: tokio::sync::Mutex<Core>,
    pub(crate) events: broadcast::Sender<WatchEvent>,
    /// The store, and the background work that keeps it and the core in step.
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) metrics: Metrics,
    /// Flips to true on shutdown so watch streams end and the server can drain.
    pub(crate) stopping: watch::Sender<bool>,
    /// The revision of the policy records, for agents waiting for a change.
    pub(crate) policy_revision: watch::Sender<u64>,
    /// One permit per open watch stream.
    pub(crate) watch_slots: Arc<Semaphore>,
    pub(crate) clock: LeaseClock,
}

/// Where changes are written: the one embedded file store (`file`), or etcd shared by
/// replicas (`replica`). The handlers go through this and name neither.
pub(crate) trait Backend: Send + Sync {
    /// Joins a node or renews its lease; the answer to `PUT /v1/nodes/{name}`.
    fn put_node<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        name: &'a str,
        req: &'a RegisterRequest,
    ) -> BoxFuture<'a, Response>;

    /// A graceful leave, or with `purge` forgetting the node and its block; the answer to
    /// `DELETE /v1/nodes/{name}`.
    fn delete_node<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        name: &'a str,
        purge: bool,
    ) -> BoxFuture<'a, Response>;

    /// Checks and applies a change to the policy records, saves it, and answers the request.
    fn change_policy<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        change: PolicyChange,
    ) -> BoxFuture<'a, Response>;

    /// Starts the background work: the lease sweep, and with etcd the mirror and its probe.
    fn spawn(&self, shared: &Arc<Shared>) -> Vec<JoinHandle<()>>;

    /// Why the store cannot take writes right now; `None` while it can.
    fn unavailable(&self) -> Option<String>;
}
