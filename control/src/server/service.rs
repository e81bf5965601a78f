//! The service as a whole: loading the state from a store, the routes and their layers, and
//! serving until shutdown.

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{delete, get, patch, post, put};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch, Semaphore};

use super::answer::error;
use super::auth::authenticate;
use super::config::{check, ServerConfig, ServerError};
use super::file::{save, whole, File};
use super::guard;
use super::handlers::{delete_node, get_node, healthz, metrics, put_node};
use super::layers::{count_requests, json_errors, refuse_declared_oversize};
use super::metrics::Metrics;
use super::policy::{
    apply_policies, delete_pod, delete_policy, get_policy, label_namespace, label_pod, put_pod,
};
use super::replica::Replica;
use super::shared::{Backend, Core, Shared};
use super::watch::list_or_watch;
use crate::clock::{now_ms, LeaseClock};
use crate::etcd::{Etcd, Mirror};
use crate::policy::PolicyBook;
use crate::state::{History, Registry};
use crate::store::{Store, StoreError};

/// A loaded control service, ready to serve.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
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
        let (registry, book) = match stored {
            Some(mut stored) => {
                let book = PolicyBook::restore(std::mem::take(&mut stored.policy))?;
                let registry = Registry::restore(ipam, timing, stored, clock.now_ms())?;
                let (up, down) = registry.counts();
                let state = book.state();
                tracing::info!(
                    revision = registry.revision(),
                    up,
                    down,
                    pods = state.pods.len(),
                    policies = state.policies.len(),
                    "state loaded"
                );
                (registry, book)
            }
            None => {
                let (registry, book) = (Registry::new(ipam, timing), PolicyBook::default());
                save(&store, whole(&registry, &book)).await?;
                tracing::info!("no saved state, starting with an empty node table");
                (registry, book)
            }
        };
        Ok(Server::build(
            config,
            registry,
            book,
            Mirror::default(),
            Box::new(File { store }),
            clock,
        ))
    }

    /// A replica over etcd: stores the cluster layout or checks it against the stored one,
    /// then reads every node into its mirror. Fails when etcd cannot be read.
    pub async fn open_etcd(config: ServerConfig, etcd: Etcd) -> Result<Server, ServerError> {
        let (ipam, timing) = check(&config)?;
        let clock = LeaseClock::starting_at(now_ms());
        let loaded = etcd
            .load(ipam, timing, clock.now_ms() + timing.lease_ttl_ms)
            .await?;
        let (up, down) = loaded.registry.counts();
        let state = loaded.book.state();
        tracing::info!(
            revision = loaded.revision,
            up,
            down,
            pods = state.pods.len(),
            policies = state.policies.len(),
            endpoints = etcd.endpoints(),
            "etcd state loaded"
        );
        let replica = Replica::new(etcd, loaded.registry.revision());
        Ok(Server::build(
            config,
            loaded.registry,
            loaded.book,
            loaded.mirror,
            Box::new(replica),
            clock,
        ))
    }

    fn build(
        config: ServerConfig,
        registry: Registry,
        book: PolicyBook,
        mirror: Mirror,
        backend: Box<dyn Backend>,
        clock: LeaseClock,
    ) -> Server {
        let history = History::new(registry.revision(), config.history_len);
        let (events, _) = broadcast::channel(config.history_len.max(16));
        let (stopping, _) = watch::channel(false);
        let watch_slots = Arc::new(Semaphore::new(config.max_watchers));
        let (policy_revision, _) = watch::channel(book.revision());
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
                    book,
                }),
                events,
                backend,
                metrics,
                stopping,
                policy_revision,
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
            .route("/v1/policy", get(get_policy))
            .route(
                "/v1/pods/{namespace}/{name}",
                put(put_pod).delete(delete_pod).patch(label_pod),
            )
            .route("/v1/namespaces/{namespace}", patch(label_namespace))
            .route(
                "/v1/policies",
                post(apply_policies)
                    .layer(DefaultBodyLimit::max(shared.config.max_policy_body_bytes)),
            )
            .route("/v1/policies/{namespace}/{name}", delete(delete_policy))
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
        let tasks = self.shared.backend.spawn(&self.shared);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::now_ms;
    use crate::server::file::sweep;
    use crate::server::handlers::put_node;
    use crate::store::MemoryStore;
    use axum::body::Bytes;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use podnet_proto::api::NodeState;
    use std::time::Duration;

    /// Leases lapse on the service's monotonic lease clock. Tokio's paused clock stands in for
    /// the monotonic one here: it moves only when the test advances it, while the wall clock
    /// runs on regardless (a service reading the wall clock would see the 21 s never pass).
    #[tokio::test(start_paused = true)]
    async fn leases_lapse_on_the_monotonic_clock_not_the_wall_clock() {
        let config = ServerConfig {
            lease_ttl: Duration::from_secs(20),
            ..ServerConfig::default()
        };
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let server = Server::open(config, store.clone()).await.unwrap();
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
        let sweeper = tokio::spawn(sweep(store.clone(), shared.clone()));
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
}
