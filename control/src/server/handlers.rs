//! The node routes, `/metrics` and `/healthz`. What a change does to the store is the
//! backend's (`shared::Backend`); here the request is checked and handed over.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use podnet_proto::api::{validate_node_name, Encap, RegisterRequest, WgKey};
use serde_json::Value;

use super::answer::{bad_request, error};
use super::shared::Shared;

/// Reads a registration body field by field so a 400 names the field and the reason.
pub fn parse_register(body: &[u8]) -> Result<RegisterRequest, String> {
    const EXAMPLE: &str = r#"{"underlay_ip": "198.18.0.1", "encap": "vxlan"}"#;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(format!(
            "request body is empty; send a JSON object like {EXAMPLE}"
        ));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err(format!("request body must be a JSON object like {EXAMPLE}"));
    };
    if let Some(unknown) = fields.keys().find(|k| {
        !matches!(
            k.as_str(),
            "underlay_ip" | "encap" | "vtep_mac" | "wireguard_public_key"
        )
    }) {
        return Err(format!(
            "field `{unknown}`: unknown field; expected underlay_ip, encap and optionally vtep_mac and wireguard_public_key"
        ));
    }
    let underlay_ip = match fields.get("underlay_ip") {
        None => {
            return Err(
                "field `underlay_ip`: missing; the node's IPv4 address on the underlay".into(),
            )
        }
        Some(Value::String(s)) => s.parse::<Ipv4Addr>().map_err(|_| {
            format!("field `underlay_ip`: {s:?} is not an IPv4 address like \"198.18.0.1\"")
        })?,
        Some(other) => {
            return Err(format!(
                "field `underlay_ip`: expected a string like \"198.18.0.1\", got {other}"
            ))
        }
    };
    let encap = match fields.get("encap") {
        None => return Err("field `encap`: missing; \"ipip\" or \"vxlan\"".into()),
        Some(Value::String(s)) => s
            .parse::<Encap>()
            .map_err(|e| format!("field `encap`: {e}"))?,
        Some(other) => {
            return Err(format!(
                "field `encap`: expected \"ipip\" or \"vxlan\", got {other}"
            ))
        }
    };
    let vtep_mac = match fields.get("vtep_mac") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.parse().map_err(|e| format!("field `vtep_mac`: {e}"))?),
        Some(other) => {
            return Err(format!(
                "field `vtep_mac`: expected a string like \"02:00:c6:12:00:01\", got {other}"
            ))
        }
    };
    let wireguard_public_key = match fields.get("wireguard_public_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse::<WgKey>()
                .map_err(|e| format!("field `wireguard_public_key`: {e}"))?,
        ),
        Some(other) => {
            return Err(format!(
                "field `wireguard_public_key`: expected a base64 string of 32 bytes, got {other}"
            ))
        }
    };
    match (encap, wireguard_public_key) {
        (Encap::Wireguard, None) => {
            return Err("field `wireguard_public_key`: missing; a node with encap \"wireguard\" must give its public key (base64, as `wg pubkey` prints it)".into())
        }
        (Encap::Wireguard, Some(_)) | (_, None) => {}
        (other, Some(_)) => {
            return Err(format!(
                "field `wireguard_public_key`: only a node with encap \"wireguard\" has one, this one registers encap \"{other}\""
            ))
        }
    }
    Ok(RegisterRequest {
        underlay_ip,
        encap,
        vtep_mac,
        wireguard_public_key,
    })
}

/// Why a node name in the URL is unusable (the 400 detail).
fn check_name(name: &str) -> Result<(), String> {
    validate_node_name(name).map_err(|e| format!("node name {name:?} in the URL: {e}"))
}

pub(super) async fn put_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(detail) = check_name(&name) {
        return bad_request(detail);
    }
    let req = match parse_register(&body) {
        Ok(req) => req,
        Err(detail) => return bad_request(detail),
    };
    shared.backend.put_node(&shared, &name, &req).await
}

pub(super) async fn get_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Response {
    if let Err(detail) = check_name(&name) {
        return bad_request(detail);
    }
    let core = shared.core.lock().await;
    match core.registry.node(&name) {
        Some(node) => Json(node.clone()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no node named {name:?}"),
        ),
    }
}

pub(super) async fn delete_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Err(detail) = check_name(&name) {
        return bad_request(detail);
    }
    let purge = match parse_bool(&params, "purge") {
        Ok(p) => p,
        Err(detail) => return bad_request(detail),
    };
    shared.backend.delete_node(&shared, &name, purge).await
}

pub(super) fn parse_bool(params: &HashMap<String, String>, key: &str) -> Result<bool, String> {
    match params.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(format!(
            "query parameter `{key}`: expected true or false, got {other:?}"
        )),
    }
}

pub(super) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let m = &shared.metrics;
    {
        let core = shared.core.lock().await;
        let (up, down) = core.registry.counts();
        m.nodes.get_or_create(&[("state", "up")]).set(up as i64);
        m.nodes.get_or_create(&[("state", "down")]).set(down as i64);
        m.revision.set(core.registry.revision() as i64);
        m.capacity
            .set(i64::try_from(core.registry.ipam().capacity()).unwrap_or(i64::MAX));
    }
    let available = shared.backend.unavailable().is_none();
    m.store_available.set(i64::from(available));
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&m.registry),
    )
        .into_response()
}

/// `ok`; with the etcd store, `degraded` while etcd cannot take writes (reads and watches are
/// still served from the last state, so the status stays 200).
pub(super) async fn healthz(State(shared): State<Arc<Shared>>) -> String {
    match shared.backend.unavailable() {
        None => "ok\n".to_string(),
        Some(why) => format!(
            "degraded: serving reads and watches from the last state; writes fail until etcd is \
             back: {why}\n"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_bodies_name_the_bad_field() {
        let ok = parse_register(br#"{"underlay_ip":"198.18.0.1","encap":"vxlan","vtep_mac":null}"#)
            .unwrap();
        assert_eq!(ok.underlay_ip, Ipv4Addr::new(198, 18, 0, 1));
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"{", "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"encap":"vxlan"}"#, "field `underlay_ip`: missing"),
            (
                br#"{"underlay_ip":"198.18.0.300","encap":"vxlan"}"#,
                "field `underlay_ip`",
            ),
            (
                br#"{"underlay_ip":7,"encap":"vxlan"}"#,
                "field `underlay_ip`",
            ),
            (br#"{"underlay_ip":"198.18.0.1"}"#, "field `encap`: missing"),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"gre"}"#,
                "field `encap`",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"ipip","vtep_mac":5}"#,
                "field `vtep_mac`",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"ipip","vtep_mac":"02:00"}"#,
                "field `vtep_mac`",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"ipip","underlay":"x"}"#,
                "field `underlay`",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"wireguard"}"#,
                "field `wireguard_public_key`: missing",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"wireguard","wireguard_public_key":"AAAA"}"#,
                "decodes to 3 bytes",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"wireguard","wireguard_public_key":"not base64!"}"#,
                "not a WireGuard key",
            ),
            (
                br#"{"underlay_ip":"198.18.0.1","encap":"vxlan","wireguard_public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#,
                "only a node with encap \"wireguard\"",
            ),
        ];
        let wg = parse_register(
            br#"{"underlay_ip":"198.18.0.1","encap":"wireguard","wireguard_public_key":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}"#,
        )
        .unwrap();
        let key = wg.wireguard_public_key.unwrap();
        assert_eq!(key.0[0], 1);
        assert_eq!(key.0[31], 32);
        assert_eq!(key.short(), "AQIDBAUG");
        for (body, expect) in cases {
            let err = parse_register(body).unwrap_err();
            assert!(
                err.contains(expect),
                "{:?}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
