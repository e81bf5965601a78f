//! A replica over etcd: the writes, the mirror that follows etcd, the sweep and the health
//! probe (the key layout and transactions are in `etcd`).
//!
//! Nothing here holds the core lock across an etcd call: the mirror task needs that lock to
//! apply what etcd says, and a write waits for the mirror to catch up before it answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use podnet_control_client::Backoff;
use podnet_proto::api::{EventType, RegisterRequest, WatchEvent};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::answer::{error, refusal, register_answer};
use super::policy::refused;
use super::shared::{Backend, Core, Shared};
use crate::etcd::{self, Etcd, EtcdError, Outcome, Plan, SWEEP_BATCH};
use crate::policy::PolicyChange;
use crate::state::{History, Registry};

/// A write planned on a stale mirror is planned again this often before the client is told
/// to retry.
const ATTEMPTS: usize = 8;
/// How long a write waits for the mirror to show it before answering anyway.
const CATCH_UP: Duration = Duration::from_secs(3);
/// How often etcd is probed for a quorum.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// This replica's connection to etcd and what it knows of etcd's state. Cloned into each of
/// its tasks.
#[derive(Clone)]
pub(crate) struct Replica {
    etcd: Etcd,
    /// The revision the mirror has caught up with.
    mirror_revision: Arc<watch::Sender<u64>>,
    /// Why etcd cannot take writes right now (`None` while it can).
    down: Arc<Mutex<Option<String>>>,
    /// Wakes the sweep when the mirror saw a lease lapse.
    sweep_now: Arc<Notify>,
}

impl Replica {
    /// A replica whose mirror was loaded at `revision`.
    pub(crate) fn new(etcd: Etcd, revision: u64) -> Replica {
        Replica {
            etcd,
            mirror_revision: Arc::new(watch::channel(revision).0),
            down: Arc::new(Mutex::new(None)),
            sweep_now: Arc::new(Notify::new()),
        }
    }
}

impl Backend for Replica {
    fn put_node<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        name: &'a str,
        req: &'a RegisterRequest,
    ) -> BoxFuture<'a, Response> {
        put_node(shared, self, name, req).boxed()
    }

    fn delete_node<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        name: &'a str,
        purge: bool,
    ) -> BoxFuture<'a, Response> {
        delete_node(shared, self, name, purge).boxed()
    }

    fn change_policy<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        change: PolicyChange,
    ) -> BoxFuture<'a, Response> {
        change_policy(shared, self, change).boxed()
    }

    /// Starts the mirror, the sweep and the health probe.
    fn spawn(&self, shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(follow(shared.clone(), self.clone())),
            tokio::spawn(sweep(shared.clone(), self.clone())),
            tokio::spawn(probe(self.clone())),
        ]
    }

    fn unavailable(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn set_health(r: &Replica, down: Option<String>) {
    let mut cur = r.down.lock().unwrap_or_else(|e| e.into_inner());
    match (&*cur, &down) {
        (None, Some(why)) => tracing::warn!("etcd unavailable, serving the last state: {why}"),
        (Some(_), None) => tracing::info!("etcd available again"),
        _ => {}
    }
    *cur = down;
}

/// A write etcd could not take: 503 naming the endpoints and the error.
fn unavailable(shared: &Shared, r: &Replica, e: EtcdError) -> Response {
    shared.metrics.store_errors.inc();
    let detail = format!(
        "the change was not saved: {e}. Reads and watches are served from the last state; \
         retry when etcd has a quorum again"
    );
    set_health(r, Some(e.to_string()));
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "etcd_unavailable", detail);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

fn busy() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "conflict_retry",
        format!("other replicas changed the same keys {ATTEMPTS} times in a row; retry"),
    )
}

/// Waits until the mirror has applied `revision` (or [`CATCH_UP`] passed).
async fn catch_up(r: &Replica, revision: u64) {
    let mut seen = r.mirror_revision.subscribe();
    let _ = tokio::time::timeout(CATCH_UP, seen.wait_for(|r| *r >= revision)).await;
}

/// The writes that take the mirror to `next` for a change that is not a registration (a
/// leave, a lapse, a reservation running out): no node goes up, so no lease is needed.
fn plan_change(etcd: &Etcd, core: &Core, next: &Registry, now: u64) -> Plan {
    etcd::plan(
        etcd.keys(),
        &core.registry,
        &core.mirror,
        next,
        None,
        None,
        now,
    )
}

/// etcd's default `--max-txn-ops`: one change may write at most this many records.
const MAX_TXN_OPS: usize = 128;

/// Applies a change to the policy records: planned on the mirror, written as one transaction
/// that compares every record it changes, planned again if another replica got there first.
async fn change_policy(shared: &Arc<Shared>, r: &Replica, change: PolicyChange) -> Response {
    let etcd = &r.etcd;
    for _ in 0..ATTEMPTS {
        let (mut answer, plan) = {
            let core = shared.core.lock().await;
            let mut next = core.book.clone();
            let answer = match change.apply(&mut next) {
                Ok(answer) => answer,
                Err(e) => return refused(e),
            };
            let plan =
                etcd::plan_records(etcd.keys(), &core.mirror, core.book.state(), next.state());
            (answer, plan)
        };
        if plan.is_empty() {
            answer["revision"] = shared.core.lock().await.book.revision().into();
            return Json(answer).into_response();
        }
        if plan.puts.len() + plan.deletes.len() > MAX_TXN_OPS {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_records",
                format!(
                    "this change writes {} records; with --store etcd one change may write at                      most {MAX_TXN_OPS} (etcd's --max-txn-ops): apply the policies in smaller files",
                    plan.puts.len() + plan.deletes.len()
                ),
            );
        }
        match etcd.commit(&plan).await {
            Ok(Outcome::Applied(revision)) => {
                catch_up(r, revision).await;
                answer["revision"] = revision.into();
                return Json(answer).into_response();
            }
            Ok(Outcome::Conflict(revision)) => catch_up(r, revision).await,
            Err(e) => return unavailable(shared, r, e),
        }
    }
    busy()
}

/// Joins a node or renews its lease.
async fn put_node(
    shared: &Arc<Shared>,
    r: &Replica,
    name: &str,
    req: &RegisterRequest,
) -> Response {
    let etcd = &r.etcd;
    let mut dead_lease = None;
    for _ in 0..ATTEMPTS {
        let renewal = {
            let core = shared.core.lock().await;
            core.mirror
                .lease(name)
                .filter(|&l| Some(l) != dead_lease && core.registry.is_renewal(name, req))
                .map(|l| (l, core.registry.node(name).cloned()))
        };
        if let Some((lease, Some(node))) = renewal {
            match etcd.keep_alive(lease).await {
                Ok(true) => return register_answer(shared, &node, "renewed"),
                // Lapsed just now: written again below with a fresh lease.
                Ok(false) => dead_lease = Some(lease),
                Err(e) => return unavailable(shared, r, e),
            }
        }
        let now = shared.clock.now_ms();
        let (plan, done, claim) = {
            let mut core = shared.core.lock().await;
            let mut next = core.registry.clone();
            let done = match next.register(name, req, now) {
                Ok(done) => done,
                Err(e) => {
                    let (status, kind) = refusal(&e);
                    tracing::warn!(node = %name, "registration refused: {e}");
                    return error(status, kind, e.to_string());
                }
            };
            let plan = etcd::plan(
                etcd.keys(),
                &core.registry,
                &core.mirror,
                &next,
                Some(name),
                dead_lease,
                now,
            );
            // A new block is held until the write ends, so this replica's other
            // registrations in flight pick other blocks.
            let claim = (core.registry.node(name).map(|n| n.pod_cidr) != Some(done.node.pod_cidr))
                .then_some(done.node.pod_cidr);
            if let Some(net) = claim {
                core.registry.hold(net);
            }
            (plan, done, claim)
        };
        let outcome = etcd.commit(&plan).await;
        // Released once the mirror shows the claim (or shows who won the block).
        if let Ok(Outcome::Applied(revision) | Outcome::Conflict(revision)) = outcome {
            catch_up(r, revision).await;
        }
        if let Some(net) = claim {
            shared.core.lock().await.registry.release(net);
        }
        match outcome {
            Ok(Outcome::Applied(revision)) => {
                set_health(r, None);
                let mut node = done.node.clone();
                node.revision = revision;
                let result = match done.event.as_ref().map(|e| e.kind) {
                    Some(EventType::Added) => "added",
                    Some(_) => "modified",
                    None => "renewed",
                };
                if result != "renewed" {
                    tracing::info!(node = %name, underlay_ip = %node.underlay_ip, pod_cidr = %node.pod_cidr,
                        revision, "node {result}");
                }
                return register_answer(shared, &node, result);
            }
            Ok(Outcome::Conflict(revision)) => {
                tracing::debug!(node = %name, revision, "another replica wrote first, planning again");
            }
            Err(e) => return unavailable(shared, r, e),
        }
    }
    busy()
}

/// Graceful leave (and `purge`).
async fn delete_node(shared: &Arc<Shared>, r: &Replica, name: &str, purge: bool) -> Response {
    let etcd = &r.etcd;
    for _ in 0..ATTEMPTS {
        let plan = {
            let core = shared.core.lock().await;
            let mut next = core.registry.clone();
            if next.remove(name, purge).is_none() {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no node named {name:?}"),
                );
            }
            plan_change(etcd, &core, &next, shared.clock.now_ms())
        };
        if plan.is_empty() {
            return StatusCode::NO_CONTENT.into_response();
        }
        match etcd.commit(&plan).await {
            Ok(Outcome::Applied(revision)) => {
                catch_up(r, revision).await;
                tracing::info!(node = %name, purge, "node left");
                return StatusCode::NO_CONTENT.into_response();
            }
            Ok(Outcome::Conflict(revision)) => catch_up(r, revision).await,
            Err(e) => return unavailable(shared, r, e),
        }
    }
    busy()
}

/// Marks nodes whose lease etcd let lapse as down, and forgets down nodes whose reservation
/// ran out. Every replica sweeps; when two write the same change, one transaction fails its
/// compare and changes nothing.
///
/// A lapsed node is written in a transaction of its own, so every withdrawal has its own
/// revision and a watch resumed from any revision misses none. Forgetting down nodes sends
/// no event, so those go in batches.
async fn sweep(shared: Arc<Shared>, r: Replica) {
    let etcd = &r.etcd;
    let period =
        (shared.config.lease_ttl / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let reclaim_after = shared.config.reclaim_after.as_millis() as u64;
    let mut more = false;
    loop {
        if !more {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = r.sweep_now.notified() => {}
            }
        }
        more = false;
        let now = shared.clock.now_ms();
        let (plan, lapsed) = {
            let core = shared.core.lock().await;
            let lapsed: Vec<String> = core
                .mirror
                .lapsed(&core.registry, now)
                .take(1)
                .map(str::to_string)
                .collect();
            let expired: Vec<String> = core
                .registry
                .nodes()
                .filter(|n| {
                    lapsed.is_empty()
                        && n.state == podnet_proto::api::NodeState::Down
                        && now >= n.last_heartbeat.saturating_add(reclaim_after)
                })
                .take(SWEEP_BATCH)
                .map(|n| n.name.clone())
                .collect();
            if lapsed.is_empty() && expired.is_empty() {
                continue;
            }
            let mut next = core.registry.clone();
            for name in &lapsed {
                next.remove(name, false);
            }
            for name in &expired {
                next.remove(name, true);
            }
            (plan_change(etcd, &core, &next, now), lapsed)
        };
        match etcd.commit(&plan).await {
            Ok(Outcome::Applied(revision)) => {
                for name in &lapsed {
                    tracing::info!(node = %name, revision, "lease lapsed, node withdrawn");
                }
                shared.metrics.lapsed.inc_by(lapsed.len() as u64);
                catch_up(&r, revision).await;
                more = true;
            }
            // Another replica marked them first, or a node renewed meanwhile.
            Ok(Outcome::Conflict(revision)) => {
                catch_up(&r, revision).await;
                more = true;
            }
            Err(e) => {
                shared.metrics.store_errors.inc();
                tracing::debug!("sweep not written: {e}");
                tokio::time::sleep(PROBE_EVERY).await;
            }
        }
    }
}

/// Tells "etcd can take writes" from "it cannot" once a second.
async fn probe(r: Replica) {
    loop {
        let health = r.etcd.probe().await.err().map(|e| e.to_string());
        set_health(&r, health);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Keeps the mirror equal to etcd: one watch on the prefix, resumed after the last revision
/// applied when it breaks; read afresh when etcd compacted that revision away.
async fn follow(shared: Arc<Shared>, r: Replica) {
    let etcd = &r.etcd;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let from = shared.core.lock().await.registry.revision() + 1;
        let mut stream = match etcd.watch(from).await {
            Ok(stream) => stream,
            Err(e) => {
                set_health(&r, Some(e.to_string()));
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("etcd watch broke: {e}");
                    break;
                }
            };
            backoff.reset();
            if resp.compact_revision() > 0 {
                tracing::info!(
                    from,
                    compacted = resp.compact_revision(),
                    "etcd compacted the revision the mirror was at, reading everything again"
                );
                reload(&shared, &r).await;
                break;
            }
            if resp.canceled() {
                tracing::debug!(reason = resp.cancel_reason(), "etcd ended the watch");
                break;
            }
            let changes = etcd::changes(&resp);
            if changes.is_empty() {
                continue;
            }
            let lease_ends = shared.clock.now_ms() + shared.config.lease_ttl.as_millis() as u64;
            let mut core = shared.core.lock().await;
            let core = &mut *core;
            let events = etcd::apply(
                etcd.keys(),
                &mut core.registry,
                &mut core.mirror,
                &changes,
                lease_ends,
            );
            publish(&shared, &mut core.history, events);
            if etcd::apply_records(etcd.keys(), &mut core.book, &mut core.mirror, &changes) {
                shared.policy_revision.send_replace(core.book.revision());
            }
            let revision = core.registry.revision();
            core.history.advance_to(revision);
            if core
                .mirror
                .lapsed(&core.registry, shared.clock.now_ms())
                .next()
                .is_some()
            {
                r.sweep_now.notify_one();
            }
            r.mirror_revision.send_replace(revision);
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn publish(shared: &Shared, history: &mut History, events: Vec<WatchEvent>) {
    for ev in events {
        history.push(ev.clone());
        // No receivers is fine: nobody is watching.
        let _ = shared.events.send(ev);
    }
}

/// Reads everything again after a compaction. Watchers get an event for every node that
/// changed meanwhile; resuming from an older revision is then answered 410, so agents list.
async fn reload(shared: &Shared, r: &Replica) {
    let etcd = &r.etcd;
    let (ipam, timing) = {
        let core = shared.core.lock().await;
        (*core.registry.ipam(), core.registry.timing())
    };
    let lease_ends = shared.clock.now_ms() + timing.lease_ttl_ms;
    let loaded = match etcd.load(ipam, timing, lease_ends).await {
        Ok(loaded) => loaded,
        Err(e) => {
            set_health(r, Some(e.to_string()));
            return;
        }
    };
    let revision = loaded.revision;
    let mut core = shared.core.lock().await;
    let events = etcd::differences(&core.registry, &loaded.registry, revision);
    core.registry = loaded.registry;
    core.mirror = loaded.mirror;
    core.book = loaded.book;
    shared.policy_revision.send_replace(core.book.revision());
    core.history = History::new(revision, shared.config.history_len);
    for ev in events {
        let _ = shared.events.send(ev);
    }
    r.mirror_revision.send_replace(revision);
}
