//! Who may call what: under mTLS any certificate of the cluster CA (or the bearer token) may
//! read, a node may write only its own record and the records of the pods it runs, and an
//! operator anything (labels and policies only an operator); without TLS, the bearer token if
//! one is set.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::answer::error;
use super::guard;
use super::shared::Shared;
use crate::tls::{Identity, Role};

pub(super) async fn authenticate(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token_ok = match (&shared.config.token, presented) {
        (Some(token), Some(p)) => constant_time_eq(p.trim().as_bytes(), token.as_bytes()),
        _ => false,
    };
    if shared.config.tls.is_some() {
        let peer = req
            .extensions()
            .get::<ConnectInfo<guard::Peer>>()
            .map(|c| c.0.clone());
        let identity = peer.as_ref().and_then(|p| p.identity.clone());
        return match mtls_refusal(&req, identity.as_deref(), token_ok) {
            None => next.run(req).await,
            Some(refusal) => {
                if let Some(p) = peer {
                    tracing::warn!(client = %p.addr, identity = ?identity.as_deref().map(|i| i.to_string()),
                        method = %req.method(), path = req.uri().path(), status = refusal.status().as_u16(),
                        "request refused");
                }
                refusal
            }
        };
    }
    let Some(_) = &shared.config.token else {
        return next.run(req).await;
    };
    let detail = match presented {
        Some(_) if token_ok => return next.run(req).await,
        Some(_) => "wrong bearer token; use the token in the server's --token-file",
        None => {
            "missing bearer token; send `Authorization: Bearer <token>` (clients: --token-file)"
        }
    };
    unauthorized(detail)
}

fn unauthorized(detail: &str) -> Response {
    let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", detail);
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Under mTLS: any certificate of the cluster CA (or the bearer token) may read; a node may
/// write only its own record; an operator may write any. `None`: allowed.
fn mtls_refusal(req: &Request, identity: Option<&Identity>, token_ok: bool) -> Option<Response> {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let Some(id) = identity else {
        if token_ok && !write {
            return None;
        }
        return Some(unauthorized(
            "no client certificate: this service uses mTLS. Agents take --tls-ca, --tls-cert and \
             --tls-key (`podnet-control ca issue --node NAME` makes a node's); a bearer token \
             (--token-file) allows reads only",
        ));
    };
    if !write || id.role == Role::Operator {
        return None;
    }
    let path = req.uri().path();
    if path.starts_with("/v1/pods/") && matches!(*req.method(), Method::PUT | Method::DELETE) {
        // A node registers and removes the pods it runs; the handler checks that the pod is
        // on the node the certificate names.
        if id.role == Role::Node {
            return None;
        }
        return Some(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the client certificate is for {id}, which may not write pods"),
        ));
    }
    if !path.starts_with("/v1/nodes/") {
        return Some(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the client certificate is for {id}: only an operator certificate (`ca issue                  --operator`) may change labels and policies"
            ),
        ));
    }
    let target = req
        .uri()
        .path()
        .strip_prefix("/v1/nodes/")
        .unwrap_or_default();
    if id.role == Role::Node && id.name == target {
        return None;
    }
    let what = match *req.method() {
        Method::DELETE => "delete",
        _ => "register or renew",
    };
    Some(error(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "the client certificate is for {id}, which may not {what} node {target:?}: a node \
             speaks only for the name in its certificate (an operator certificate, `ca issue \
             --operator`, may change any node)"
        ),
    ))
}

/// Compares without an early exit, so response time does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        // black_box keeps the optimizer from turning the loop into an early-exit compare.
        diff = std::hint::black_box(diff | u64::from(x ^ y));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(method: Method, path: &str, role: Role) -> Option<u16> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let id = Identity {
            name: "h1".into(),
            role,
        };
        mtls_refusal(&req, Some(&id), false).map(|r| r.status().as_u16())
    }

    #[test]
    fn a_node_writes_its_node_and_its_pods_an_operator_everything() {
        use Method as M;
        let node = |m, p| refused(m, p, Role::Node);
        assert_eq!(node(M::PUT, "/v1/nodes/h1"), None);
        assert_eq!(node(M::PUT, "/v1/nodes/h2"), Some(403));
        // Whose pod it is, the handler checks against the record.
        assert_eq!(node(M::PUT, "/v1/pods/x/a"), None);
        assert_eq!(node(M::DELETE, "/v1/pods/x/a"), None);
        assert_eq!(
            node(M::PATCH, "/v1/pods/x/a"),
            Some(403),
            "labels are the operator's"
        );
        assert_eq!(node(M::PATCH, "/v1/namespaces/x"), Some(403));
        assert_eq!(node(M::POST, "/v1/policies"), Some(403));
        assert_eq!(node(M::DELETE, "/v1/policies/x/p"), Some(403));
        assert_eq!(node(M::GET, "/v1/policy"), None);
        for (m, p) in [
            (M::POST, "/v1/policies"),
            (M::PATCH, "/v1/pods/x/a"),
            (M::PATCH, "/v1/namespaces/x"),
            (M::DELETE, "/v1/policies/x/p"),
        ] {
            assert_eq!(refused(m, p, Role::Operator), None);
        }
        assert_eq!(refused(M::PUT, "/v1/pods/x/a", Role::Other), Some(403));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
