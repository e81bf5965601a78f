//! The network policy routes: pods (written by their node's agent), namespace labels and
//! policies (written by operators), and the snapshot agents enforce from, with a long poll for
//! the next change.
//!
//! A change is checked and applied to a copy of the records ([`PolicyChange::apply`]); the
//! backend saves it (the whole file, or the changed etcd keys) before it becomes the
//! record and waiting agents wake.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use podnet_proto::policy::{LabelChange, PodRecord};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::answer::{bad_request, error};
use super::guard;
use super::shared::Shared;
use crate::documents::policies_from_value;
use crate::policy::{BookError, PolicyChange};
use crate::tls::Role;

/// The longest a `GET /v1/policy?after=N` waits for a change before answering with the
/// records as they are (clients call again).
pub(crate) const LONG_POLL: Duration = Duration::from_secs(20);

/// The answer to a refused change.
pub(crate) fn refused(e: BookError) -> Response {
    let (status, kind) = match &e {
        BookError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        BookError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        BookError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        BookError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
    };
    error(status, kind, e.to_string())
}

/// The node a node certificate speaks for; `None` for an operator, or without mTLS.
fn writing_node(ext: &Extensions) -> Option<String> {
    let peer = ext.get::<ConnectInfo<guard::Peer>>()?;
    let id = peer.0.identity.as_ref()?;
    (id.role == Role::Node).then(|| id.name.clone())
}

/// Reads a JSON body into `T`, naming the field at fault.
fn body<T: DeserializeOwned>(bytes: &[u8], example: &str) -> Result<T, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("request body is empty; send JSON like {example}"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("field `{path}`: ")
        };
        format!("{at}{}; send JSON like {example}", e.inner())
    })
}

async fn change(shared: &Arc<Shared>, change: PolicyChange) -> Response {
    shared.backend.change_policy(shared, change).await
}

const POD_EXAMPLE: &str = r#"{"namespace": "default", "name": "web-1", "node": "h1", "ips": ["10.244.1.5"], "labels": {"app": "web"}, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "container_id": "..."}"#;
const LABELS_EXAMPLE: &str = r#"{"set": {"app": "web"}, "remove": ["tier"]}"#;

/// `PUT /v1/pods/{ns}/{name}`: the record of a pod this node runs.
pub(super) async fn put_pod(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    ext: Extensions,
    bytes: Bytes,
) -> Response {
    let pod: PodRecord = match body(&bytes, POD_EXAMPLE) {
        Ok(pod) => pod,
        Err(detail) => return bad_request(detail),
    };
    if (pod.namespace.as_str(), pod.name.as_str()) != (namespace.as_str(), name.as_str()) {
        return bad_request(format!(
            "the body is for pod {} but the URL names {namespace}/{name}",
            pod.key()
        ));
    }
    let by_node = writing_node(&ext);
    change(&shared, PolicyChange::PutPod { pod, by_node }).await
}

/// `DELETE /v1/pods/{ns}/{name}`: idempotent, as CNI DEL is.
pub(super) async fn delete_pod(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    ext: Extensions,
) -> Response {
    let by_node = writing_node(&ext);
    let c = PolicyChange::DeletePod {
        namespace,
        name,
        by_node,
    };
    change(&shared, c).await
}

/// `PATCH /v1/pods/{ns}/{name}`: an operator changes a pod's labels.
pub(super) async fn label_pod(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    bytes: Bytes,
) -> Response {
    match body::<LabelChange>(&bytes, LABELS_EXAMPLE) {
        Ok(c) => {
            let c = PolicyChange::LabelPod {
                namespace,
                name,
                change: c,
            };
            change(&shared, c).await
        }
        Err(detail) => bad_request(detail),
    }
}

/// `PATCH /v1/namespaces/{ns}`: an operator changes a namespace's labels.
pub(super) async fn label_namespace(
    State(shared): State<Arc<Shared>>,
    Path(namespace): Path<String>,
    bytes: Bytes,
) -> Response {
    match body::<LabelChange>(&bytes, LABELS_EXAMPLE) {
        Ok(c) => {
            let c = PolicyChange::LabelNamespace {
                namespace,
                change: c,
            };
            change(&shared, c).await
        }
        Err(detail) => bad_request(detail),
    }
}

/// `POST /v1/policies`: a NetworkPolicy, an array of them or a `List`, applied whole or not
/// at all.
pub(super) async fn apply_policies(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Response {
    let value: Value = match body(
        &bytes,
        r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {...}, "spec": {...}}"#,
    ) {
        Ok(v) => v,
        Err(detail) => return bad_request(detail),
    };
    match policies_from_value(value) {
        Ok(batch) => change(&shared, PolicyChange::Apply(batch)).await,
        Err(e) => bad_request(e),
    }
}

/// `DELETE /v1/policies/{ns}/{name}`.
pub(super) async fn delete_policy(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    change(&shared, PolicyChange::DeletePolicy { namespace, name }).await
}

/// `GET /v1/policy`: every record, at its revision. With `?after=N` the answer waits (up to
/// [`LONG_POLL`]) until the revision is past N, so agents learn of a change at once.
pub(super) async fn get_policy(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(after) = query.get("after") {
        let Ok(after) = after.parse::<u64>() else {
            return bad_request(format!(
                "after={after:?}: give the revision you have, a number"
            ));
        };
        let mut revision = shared.policy_revision.subscribe();
        let mut stopping = shared.stopping.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(LONG_POLL, revision.wait_for(|r| *r > after)) => {}
            _ = stopping.wait_for(|s| *s) => {}
        }
    }
    let core = shared.core.lock().await;
    Json(core.book.state()).into_response()
}
