//! The answers every part of the service gives: errors as `{error, detail}` JSON, and the
//! answer to an accepted registration.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use podnet_proto::api::{ErrorBody, Node, RegisterResponse};

use super::shared::Shared;
use crate::state::{Gone, RegisterError};
use crate::store::StoreError;

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

pub(crate) fn bad_request(detail: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", detail)
}

pub(crate) fn store_failed(shared: &Shared, e: StoreError) -> Response {
    shared.metrics.store_errors.inc();
    tracing::error!("{e}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "store_failed",
        format!("the change was not saved and not applied: {e}"),
    )
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
        pod_cidr_v6: node.pod_cidr_v6,
        cluster_cidr_v6: node.pod_cidr_v6.and(shared.config.cluster_cidr_v6),
        lease_ttl_s: ttl.div_ceil(1000),
        lease_ttl_ms: ttl,
        revision: node.revision,
        server_time_ms: Some(shared.clock.now_ms()),
    })
    .into_response()
}

pub(crate) fn gone_response(gone: Gone) -> Response {
    error(StatusCode::GONE, "gone", gone.to_string())
}
