//! The embedded store: one process owns the node table and writes every change to the
//! [`Store`] before it is applied, announced or acknowledged.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use podnet_proto::api::{EventType, RegisterRequest, WatchEvent};
use tokio::task::JoinHandle;

use super::answer::{error, refusal, register_answer, store_failed};
use super::policy::refused;
use super::shared::{Backend, Core, Shared};
use crate::policy::{PolicyBook, PolicyChange};
use crate::state::Registry;
use crate::store::{Change, Store, StoreError};

/// The file store (or memory, in tests) behind one process.
pub(crate) struct File {
    pub(crate) store: Arc<dyn Store>,
}

impl File {
    async fn put(&self, shared: &Arc<Shared>, name: &str, req: &RegisterRequest) -> Response {
        let mut core = shared.core.lock().await;
        // A heartbeat that changes nothing: renewed in place, without copying the registry.
        if core.registry.is_renewal(name, req) {
            if let Some(node) = core.registry.renew(name, shared.clock.now_ms()) {
                let node = node.clone();
                drop(core);
                return register_answer(shared, &node, "renewed");
            }
        }
        // In place, undone if the store does not take it: copying the registry per
        // registration would make a cold start grow with the square of the nodes.
        let (done, undo) = match core
            .registry
            .register_in_place(name, req, shared.clock.now_ms())
        {
            Ok(done) => done,
            Err(e) => {
                let (status, kind) = refusal(&e);
                tracing::warn!(node = %name, "registration refused: {e}");
                return error(status, kind, e.to_string());
            }
        };
        if let Some(event) = &done.event {
            let delta = undo.delta(&core.registry, &done);
            if let Err(e) = save(&self.store, Change::Nodes(delta)).await {
                core.registry.undo(undo);
                return store_failed(shared, e);
            }
            announce(shared, &mut core, [event.clone()]);
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
        register_answer(shared, &done.node, result)
    }

    async fn delete(&self, shared: &Arc<Shared>, name: &str, purge: bool) -> Response {
        let mut core = shared.core.lock().await;
        let mut next = core.registry.clone();
        let Some(event) = next.remove(name, purge) else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no node named {name:?}"),
            );
        };
        // Saved even without an event: a purge of a down node changes the store.
        if let Err(e) = commit(&self.store, shared, &mut core, next, true, event).await {
            return store_failed(shared, e);
        }
        tracing::info!(node = %name, purge, "node left");
        StatusCode::NO_CONTENT.into_response()
    }
}

impl File {
    async fn change_policy(&self, shared: &Arc<Shared>, change: PolicyChange) -> Response {
        let mut core = shared.core.lock().await;
        let mut next = core.book.clone();
        let mut answer = match change.apply(&mut next) {
            Ok(answer) => answer,
            Err(e) => return refused(e),
        };
        if next.revision() != core.book.revision() {
            if let Err(e) = save(&self.store, Change::Policy(next.state().clone())).await {
                return store_failed(shared, e);
            }
            core.book = next;
            shared.policy_revision.send_replace(core.book.revision());
        }
        answer["revision"] = core.book.revision().into();
        Json(answer).into_response()
    }
}

impl Backend for File {
    fn put_node<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        name: &'a str,
        req: &'a RegisterRequest,
    ) -> BoxFuture<'a, Response> {
        self.put(shared, name, req).boxed()
    }

    fn delete_node<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        name: &'a str,
        purge: bool,
    ) -> BoxFuture<'a, Response> {
        self.delete(shared, name, purge).boxed()
    }

    fn change_policy<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        change: PolicyChange,
    ) -> BoxFuture<'a, Response> {
        File::change_policy(self, shared, change).boxed()
    }

    fn spawn(&self, shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
        vec![tokio::spawn(sweep(self.store.clone(), shared.clone()))]
    }

    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// Saves `change` off the async threads (a file store fsyncs).
pub(super) async fn save(store: &Arc<dyn Store>, change: Change) -> Result<(), StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.save(&change))
        .await
        .map_err(|e| StoreError::Other(e.to_string()))?
}

/// Everything, for a fresh store: the node table and the policy records.
pub(super) fn whole(registry: &Registry, book: &PolicyBook) -> Change {
    let mut stored = registry.to_stored();
    stored.policy = book.state().clone();
    Change::Whole(stored)
}

/// Marks lapsed leases down. Runs often enough that a node is withdrawn within a tenth of the
/// lease TTL (at most a second) after it lapsed.
pub(super) async fn sweep(store: Arc<dyn Store>, shared: Arc<Shared>) {
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
        if let Err(e) = commit(&store, &shared, &mut core, next, true, events).await {
            // Not committed: the next sweep tries again.
            shared.metrics.store_errors.inc();
            tracing::error!("{e}");
            continue;
        }
        shared.metrics.lapsed.inc_by(lapsed);
    }
}

/// Makes `next` the registry of record, then records and announces `events`. With `persist`
/// what `next` changed is saved first, so nothing is acknowledged or announced that a crash
/// could lose; plain lease renewals skip the write (leases restart on load anyway).
async fn commit(
    store: &Arc<dyn Store>,
    shared: &Shared,
    core: &mut Core,
    next: Registry,
    persist: bool,
    events: impl IntoIterator<Item = WatchEvent>,
) -> Result<(), StoreError> {
    if persist {
        save(store, Change::Nodes(core.registry.delta(&next))).await?;
    }
    core.registry = next;
    announce(shared, core, events);
    Ok(())
}

/// Records `events` in the history and sends them to the watchers.
fn announce(shared: &Shared, core: &mut Core, events: impl IntoIterator<Item = WatchEvent>) {
    for ev in events {
        core.history.push(ev.clone());
        // No receivers is fine: nobody is watching.
        let _ = shared.events.send(ev);
    }
}
