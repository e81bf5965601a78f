//! The layers around every route: request counting, the body limit before the body is read,
//! and JSON bodies for axum's own rejections.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::answer::error;
use super::shared::Shared;

pub(super) async fn count_requests(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
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
pub(super) async fn refuse_declared_oversize(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = shared.config.body_limit(req.uri().path());
    if declared.is_some_and(|n| n > limit as u64) {
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
pub(super) async fn json_errors(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let limit = shared.config.body_limit(req.uri().path());
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
            format!("request body is larger than the {limit} byte limit"),
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
