//! `GET /v1/nodes`: the list, or with `watch=true` an NDJSON stream of changes, resumable
//! from a revision while the history still holds it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use podnet_proto::api::{EventType, NodeList, WatchEvent};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit};

use super::answer::{bad_request, error, gone_response};
use super::handlers::parse_bool;
use super::shared::Shared;

pub(super) async fn list_or_watch(
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
