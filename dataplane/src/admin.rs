//! The agent's local admin API (`/status`, `/routes`, `/metrics`) and the `status` / `routes`
//! commands that read it.
//!
//! Handlers only read atomics and the current route table (`ArcSwap::load`), so scraping never
//! slows the data path. Metric names follow the Prometheus conventions (`podnet_agent_` prefix,
//! `_total` for counters, base units).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use ipnet::Ipv4Net;
use podnet_proto::ethernet::MacAddr;
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, NodeInfo};
use crate::drops::{CountersSnapshot, PeerStats};

/// One peer in `/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    pub pod_cidr: Ipv4Net,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

/// Body of `/status`.
#[derive(Debug, Serialize)]
pub struct StatusBody<'a> {
    #[serde(flatten)]
    pub info: &'a NodeInfo,
    pub uptime_s: u64,
    pub table_revision: u64,
    pub control_connected: Option<bool>,
    pub peers: Vec<PeerStatus>,
    pub counters: CountersSnapshot,
    pub io_errors: IoErrorsBody,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IoErrorsBody {
    pub send: u64,
    pub tun_write: u64,
    pub offload: u64,
}

/// One row of `/routes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteRow {
    pub cidr: Ipv4Net,
    /// `local` for this node's own pod CIDR (served by the pod bridge), else `peer`.
    pub kind: String,
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
}

/// Body of `/routes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoutesBody {
    pub revision: u64,
    pub routes: Vec<RouteRow>,
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/routes", get(routes))
        .route("/metrics", get(metrics))
        .with_state(agent)
}

fn peers(agent: &Agent) -> Vec<PeerStatus> {
    let table = agent.shared.table.load();
    table
        .iter()
        .map(|(p, c)| {
            let PeerStats { tx, rx } = c.snapshot();
            PeerStatus {
                node: p.node.clone(),
                underlay_ip: p.underlay_ip,
                vtep_mac: p.vtep_mac,
                pod_cidr: p.pod_cidr,
                tx_packets: tx.packets,
                tx_bytes: tx.bytes,
                rx_packets: rx.packets,
                rx_bytes: rx.bytes,
            }
        })
        .collect()
}

async fn status(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let io = &agent.shared.io_errors;
    let body = StatusBody {
        info: &agent.info,
        uptime_s: agent.started.elapsed().as_secs(),
        table_revision: agent.shared.table.load().revision(),
        control_connected: agent.control.as_ref().map(|c| c.stats().watching),
        peers: peers(&agent),
        counters: agent.shared.forwarder.counters().snapshot(),
        io_errors: IoErrorsBody {
            send: io.send.load(Relaxed),
            tun_write: io.tun_write.load(Relaxed),
            offload: io.offload.load(Relaxed),
        },
    };
    Json(serde_json::to_value(&body).unwrap_or_default())
}

fn route_rows(agent: &Agent) -> RoutesBody {
    let table = agent.shared.table.load();
    let mut routes: Vec<RouteRow> = table
        .peers()
        .iter()
        .map(|p| RouteRow {
            cidr: p.pod_cidr,
            kind: "peer".into(),
            node: p.node.clone(),
            underlay_ip: p.underlay_ip,
            vtep_mac: p.vtep_mac,
        })
        .collect();
    routes.push(RouteRow {
        cidr: agent.info.pod_cidr,
        kind: "local".into(),
        node: agent.info.node.clone(),
        underlay_ip: agent.info.underlay_ip,
        vtep_mac: agent.info.vtep_mac,
    });
    routes.sort_by_key(|r| (u32::from(r.cidr.network()), r.cidr.prefix_len()));
    RoutesBody {
        revision: table.revision(),
        routes,
    }
}

async fn routes(State(agent): State<Arc<Agent>>) -> Json<RoutesBody> {
    Json(route_rows(&agent))
}

/// Prometheus text format: each family's HELP and TYPE lines followed by its samples.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    /// One metric family; `samples` are (label set without braces, value).
    fn family<I>(&mut self, name: &str, kind: &str, help: &str, samples: I)
    where
        I: IntoIterator<Item = (String, u64)>,
    {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {value}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
        }
    }
}

fn one(value: u64) -> [(String, u64); 1] {
    [(String::new(), value)]
}

/// Prometheus text exposition of the agent's counters.
pub fn render_metrics(agent: &Agent) -> String {
    let mut m = Exposition::default();
    let c = agent.shared.forwarder.counters().snapshot();
    let info = &agent.info;
    m.family(
        "podnet_agent_info",
        "gauge",
        "Static facts about this agent (value is always 1).",
        [(
            format!(
                "node=\"{}\",encap=\"{}\",pod_cidr=\"{}\",tun=\"{}\"",
                info.node, info.encap, info.pod_cidr, info.tun
            ),
            1,
        )],
    );
    m.family(
        "podnet_agent_drops_total",
        "counter",
        "Packets dropped, by reason.",
        c.drops
            .iter()
            .map(|(r, n)| (format!("reason=\"{}\"", r.name()), *n)),
    );
    let dirs = |tx: u64, rx: u64| {
        [
            ("direction=\"tx\"".to_string(), tx),
            ("direction=\"rx\"".to_string(), rx),
        ]
    };
    m.family(
        "podnet_agent_packets_total",
        "counter",
        "Inner packets carried (tx: encapsulated towards peers, rx: delivered to the TUN).",
        dirs(c.tx.packets, c.rx.packets),
    );
    m.family(
        "podnet_agent_bytes_total",
        "counter",
        "Inner packet bytes carried, by direction.",
        dirs(c.tx.bytes, c.rx.bytes),
    );
    let peers = peers(agent);
    let per_peer = |f: fn(&PeerStatus) -> (u64, u64)| {
        peers
            .iter()
            .flat_map(move |p| {
                let (tx, rx) = f(p);
                [
                    (format!("peer=\"{}\",direction=\"tx\"", p.node), tx),
                    (format!("peer=\"{}\",direction=\"rx\"", p.node), rx),
                ]
            })
            .collect::<Vec<_>>()
    };
    m.family(
        "podnet_agent_peer_packets_total",
        "counter",
        "Inner packets exchanged with each peer, by direction.",
        per_peer(|p| (p.tx_packets, p.rx_packets)),
    );
    m.family(
        "podnet_agent_peer_bytes_total",
        "counter",
        "Inner packet bytes exchanged with each peer, by direction.",
        per_peer(|p| (p.tx_bytes, p.rx_bytes)),
    );
    m.family(
        "podnet_agent_icmp_sent_total",
        "counter",
        "ICMP errors written back into the TUN device.",
        one(c.icmp_sent),
    );
    let io = &agent.shared.io_errors;
    m.family(
        "podnet_agent_io_errors_total",
        "counter",
        "Operating-system errors on the data path, by operation.",
        [
            ("op=\"send\"".to_string(), io.send.load(Relaxed)),
            ("op=\"tun_write\"".to_string(), io.tun_write.load(Relaxed)),
            ("op=\"offload\"".to_string(), io.offload.load(Relaxed)),
        ],
    );
    let table = agent.shared.table.load();
    m.family(
        "podnet_agent_routes",
        "gauge",
        "Peer routes in the forwarding table.",
        one(table.len() as u64),
    );
    m.family(
        "podnet_agent_table_revision",
        "gauge",
        "Control-plane revision of the forwarding table.",
        one(table.revision()),
    );
    let o = info.offloads;
    m.family(
        "podnet_agent_offload_enabled",
        "gauge",
        "Offloads in use (1) or not (0).",
        [
            ("tun_tso", o.tun_tso),
            ("tun_csum", o.tun_csum),
            ("udp_gso", o.udp_gso),
            ("udp_gro", o.udp_gro),
        ]
        .map(|(name, on)| (format!("offload=\"{name}\""), u64::from(on))),
    );
    if let Some(client) = &agent.control {
        let stats = client.stats();
        m.family(
            "podnet_agent_control_connected",
            "gauge",
            "Whether the watch on podnet-control is established.",
            one(u64::from(stats.watching)),
        );
        m.family(
            "podnet_agent_control_watch_connects_total",
            "counter",
            "Watch connections opened to podnet-control (reconnects included).",
            one(stats.watch_connects),
        );
        m.family(
            "podnet_agent_lease_renewals_total",
            "counter",
            "Lease renewals, by result.",
            [
                ("result=\"ok\"".to_string(), stats.renewals),
                ("result=\"failed\"".to_string(), stats.renew_failures),
            ],
        );
        m.family(
            "podnet_agent_table_updates_total",
            "counter",
            "Node-table changes applied from the control service.",
            one(agent.membership.table_updates.load(Relaxed)),
        );
    }
    m.0
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&agent),
    )
}

/// Errors of the `status` / `routes` commands.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot reach the agent's admin API at {addr}: {reason}; is podnet-agent running in this network namespace (ip netns exec ...) and is --api right?")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("unexpected answer from {addr}: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
}

/// GETs `path` from the admin API at `addr`.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<serde_json::Value, QueryError> {
    let url = format!("http://{addr}{path}");
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| QueryError::Unreachable {
            addr,
            reason: e.to_string(),
        })?;
    if !resp.status().is_success() {
        return Err(QueryError::Protocol {
            addr,
            reason: format!("HTTP {}", resp.status()),
        });
    }
    resp.json().await.map_err(|e| QueryError::Protocol {
        addr,
        reason: e.to_string(),
    })
}

/// Human-readable `podnet-agent status`.
pub fn format_status(v: &serde_json::Value) -> String {
    let s = |k: &str| v.get(k).map(display).unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "node:        {}", s("node"));
    let _ = writeln!(
        out,
        "underlay:    {} on {} (VTEP MAC {})",
        s("underlay_ip"),
        s("underlay_dev"),
        s("vtep_mac")
    );
    let _ = writeln!(
        out,
        "pod CIDR:    {} (cluster {})",
        s("pod_cidr"),
        s("cluster_cidr")
    );
    let vni = v
        .get("vni")
        .filter(|x| !x.is_null())
        .map(|x| format!(" vni {x}"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "encap:       {}{vni}, MTU {} on {}",
        s("encap"),
        s("mtu"),
        s("tun")
    );
    if let Some(o) = v.get("offloads").and_then(|o| o.as_object()) {
        let on: Vec<&str> = o
            .iter()
            .filter(|(_, v)| v.as_bool() == Some(true))
            .map(|(k, _)| k.as_str())
            .collect();
        let _ = writeln!(
            out,
            "offloads:    {}",
            if on.is_empty() {
                "none".into()
            } else {
                on.join(", ")
            }
        );
    }
    let control = match v.get("control").and_then(|c| c.as_str()) {
        Some(url) => format!(
            "control {url} ({})",
            if v.get("control_connected").and_then(|c| c.as_bool()) == Some(true) {
                "connected"
            } else {
                "disconnected"
            }
        ),
        None => "static".into(),
    };
    let _ = writeln!(
        out,
        "membership:  {control}, table revision {}",
        s("table_revision")
    );
    let _ = writeln!(out, "uptime:      {}s", s("uptime_s"));
    let c = &v["counters"];
    let _ = writeln!(
        out,
        "traffic:     tx {} pkts / {} B, rx {} pkts / {} B, icmp sent {}",
        c["tx"]["packets"], c["tx"]["bytes"], c["rx"]["packets"], c["rx"]["bytes"], c["icmp_sent"]
    );
    let _ = writeln!(
        out,
        "\nPEER                 UNDERLAY         POD CIDR            TX PKTS      RX PKTS"
    );
    for p in v["peers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<18} {:>8} {:>12}",
            display(&p["node"]),
            display(&p["underlay_ip"]),
            display(&p["pod_cidr"]),
            p["tx_packets"],
            p["rx_packets"]
        );
    }
    let _ = writeln!(out, "\nDROPS");
    if let Some(d) = c["drops"].as_object() {
        for (reason, n) in d {
            let _ = writeln!(out, "  {reason:<18} {n}");
        }
    }
    out
}

/// Human-readable `podnet-agent routes`.
pub fn format_routes(v: &serde_json::Value) -> String {
    let mut out = format!("revision {}\n", display(&v["revision"]));
    let _ = writeln!(
        out,
        "{:<20} {:<6} {:<20} {:<16} VTEP MAC",
        "CIDR", "KIND", "NODE", "UNDERLAY"
    );
    for r in v["routes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<20} {:<6} {:<20} {:<16} {}",
            display(&r["cidr"]),
            display(&r["kind"]),
            display(&r["node"]),
            display(&r["underlay_ip"]),
            display(&r["vtep_mac"])
        );
    }
    out
}

fn display(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}
