//! The agent's local admin API, server side: `/status`, `/routes`, `/metrics`, `/why`,
//! `/drops` and the types they answer with. The commands that read it are in
//! [`crate::agent::admin_client`].
//!
//! Handlers only read atomics and the current route table (`ArcSwap::load`), so scraping never
//! slows the data path. Metric names follow the Prometheus conventions (`podnet_agent_` prefix,
//! `_total` for counters, base units).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use ipnet::Ipv4Net;
use podnet_proto::ethernet::MacAddr;
use serde::{Deserialize, Serialize};

use crate::agent::state::{unix_ms, Agent, Histogram, NodeInfo};
use crate::core::drops::{CountersSnapshot, DropReason, PeerStats};
use crate::core::dropwatch::DropSample;
use crate::core::routing::PeerPath;
use crate::core::why::{self, Answer};

/// One peer in `/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    pub pod_cidr: Ipv4Net,
    /// What the peer receives, and so what this node sends it.
    pub encap: String,
    /// Why this node cannot send to it (packets get host unreachable), if it cannot.
    pub unreachable: Option<String>,
    /// `direct` (a kernel route via its underlay IP), `tunnel` or `refused`.
    pub path: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets from this peer dropped, by reason (every reason listed).
    pub drops: std::collections::BTreeMap<String, u64>,
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
    /// Underlay datagrams the kernel dropped because the receive sockets were full (never read,
    /// so under no drop reason).
    pub receive_overflow: u64,
    /// Host state put back since start, by kind (crate::agent::host::REPAIR_KINDS).
    pub repairs: std::collections::BTreeMap<&'static str, u64>,
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
    /// What the node receives (a peer's is what this node sends it).
    #[serde(default)]
    pub encap: String,
    /// How a peer is reached: `direct`, `tunnel` or `refused` (`local` for this node).
    #[serde(default)]
    pub path: String,
}

/// Body of `/routes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoutesBody {
    pub revision: u64,
    pub routes: Vec<RouteRow>,
}

/// The admin API. Also starts (on the current tokio runtime) the coarse clock that refills the
/// drop sampler's buckets; it stops when the agent is dropped.
pub fn router(agent: Arc<Agent>) -> Router {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(housekeeping(Arc::downgrade(&agent)));
    }
    Router::new()
        .route("/status", get(status))
        .route("/routes", get(routes))
        .route("/metrics", get(metrics))
        .route("/why", get(why_handler))
        .route("/drops", get(drops_handler))
        .with_state(agent)
}

/// Every 100 ms: advances the drop sampler's clock (refilling its buckets), and logs each
/// change of the control connection once (the client retries quietly in between).
async fn housekeeping(agent: Weak<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut connected: Option<bool> = None;
    loop {
        tick.tick().await;
        let Some(agent) = agent.upgrade() else {
            return;
        };
        agent.shared.forwarder.counters().watch.tick(unix_ms());
        if let Some(client) = &agent.control {
            let stats = client.stats();
            let now = stats.watching;
            match connected {
                Some(before) if before == now => {}
                None if !now => {} // still connecting at start: not a change
                _ => {
                    if now {
                        tracing::info!(
                            server = client.server(),
                            revision = agent.shared.table.load().revision(),
                            watch_connects = stats.watch_connects,
                            "control connection up"
                        );
                    } else {
                        tracing::warn!(
                            server = client.server(),
                            revision = agent.shared.table.load().revision(),
                            "control connection lost; forwarding with the last table"
                        );
                    }
                    connected = Some(now);
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct WhyQuery {
    ip: Ipv4Addr,
}

async fn why_handler(State(agent): State<Arc<Agent>>, Query(q): Query<WhyQuery>) -> Json<Answer> {
    let answer = {
        let table = agent.shared.table.load();
        why::explain(
            agent.shared.forwarder.config(),
            &agent.routing,
            &table,
            q.ip,
            agent.control.is_some(),
        )
    };
    let (Some(client), Some(peer)) = (&agent.control, &answer.peer) else {
        return Json(answer);
    };
    // The lease as the control service sees it now; if it cannot say, the answer says so.
    let answer = match tokio::time::timeout(Duration::from_secs(2), client.node(&peer.node)).await {
        Ok(Ok(node)) => answer.with_control(Some(&node), unix_ms()),
        Ok(Err(e)) if e.status() == Some(404) => answer.with_control(None, unix_ms()),
        _ => answer,
    };
    Json(answer)
}

/// One sample in `/drops`, with the sending peer's name when the outer source is a peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DropRow {
    #[serde(flatten)]
    pub sample: DropSampleBody,
    pub peer: Option<String>,
}

/// [`DropSample`] as JSON (the CLI reads it back).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DropSampleBody {
    pub seq: u64,
    pub time_ms: u64,
    pub reason: String,
    pub direction: String,
    pub outer_src: Option<Ipv4Addr>,
    pub inner_src: Option<Ipv4Addr>,
    pub inner_dst: Option<Ipv4Addr>,
    pub protocol: Option<u8>,
    pub len: u32,
}

impl From<DropSample> for DropSampleBody {
    fn from(s: DropSample) -> Self {
        Self {
            seq: s.seq,
            time_ms: s.time_ms,
            reason: s.reason.name().into(),
            direction: match s.direction {
                crate::core::dropwatch::Direction::Tx => "tx".into(),
                crate::core::dropwatch::Direction::Rx => "rx".into(),
            },
            outer_src: s.outer_src,
            inner_src: s.inner_src,
            inner_dst: s.inner_dst,
            protocol: s.protocol,
            len: s.len,
        }
    }
}

/// Body of `/drops?since=SEQ`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DropsBody {
    /// Sequence number of the newest sample: pass it as `since` next time.
    pub last_seq: u64,
    /// Drops counted so far (all reasons); the difference to the samples is what the rate
    /// limit left out.
    pub drops_total: u64,
    /// Samples recorded so far.
    pub sampled_total: u64,
    pub samples: Vec<DropRow>,
    /// Packets the kernel dropped at the full receive sockets so far: never read, so neither
    /// counted by reason nor sampled (`receive_overflow` in `/status`).
    #[serde(default)]
    pub receive_overflow: u64,
}

#[derive(Debug, Deserialize)]
struct DropsQuery {
    #[serde(default)]
    since: u64,
}

async fn drops_handler(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<DropsQuery>,
) -> Json<DropsBody> {
    let counters = agent.shared.forwarder.counters();
    let watch = &counters.watch;
    let sampled_total = watch.sampled();
    let table = agent.shared.table.load();
    let samples = watch
        .since(q.since)
        .into_iter()
        .map(|s| DropRow {
            peer: s
                .outer_src
                .and_then(|ip| table.by_underlay(ip))
                .map(|i| table.peer(i).node.clone()),
            sample: s.into(),
        })
        .collect();
    Json(DropsBody {
        last_seq: sampled_total,
        drops_total: counters.total_drops(),
        sampled_total,
        samples,
        receive_overflow: agent.shared.underlay.receive_drops(),
    })
}

/// Appends the `_bucket`, `_sum` and `_count` lines of histogram family `name`.
fn render_histogram(h: &Histogram, out: &mut Exposition, name: &str, help: &str) {
    let _ = writeln!(out.0, "# HELP {name} {help}\n# TYPE {name} histogram");
    let (buckets, sum) = h.cumulative();
    for (le, n) in buckets {
        let le = le.map(|b| b.to_string()).unwrap_or_else(|| "+Inf".into());
        let _ = writeln!(out.0, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out.0, "{name}_sum {sum}");
    let _ = writeln!(out.0, "{name}_count {}", h.count());
}

fn peers(agent: &Agent) -> Vec<PeerStatus> {
    let table = agent.shared.table.load();
    let config = agent.shared.forwarder.config();
    table
        .iter()
        .map(|(p, c)| {
            let stats = c.snapshot();
            let PeerStats { tx, rx, .. } = stats;
            let path = agent.routing.path(p);
            PeerStatus {
                node: p.node.clone(),
                underlay_ip: p.underlay_ip,
                vtep_mac: p.vtep_mac,
                pod_cidr: p.pod_cidr,
                encap: p.encap.name().to_string(),
                path: path.name().to_string(),
                unreachable: match path {
                    PeerPath::Refused(why) => Some(why),
                    PeerPath::Direct => None,
                    PeerPath::Tunnel => config.mtu_to(&p.encap).err().map(str::to_string),
                },
                tx_packets: tx.packets,
                tx_bytes: tx.bytes,
                rx_packets: rx.packets,
                rx_bytes: rx.bytes,
                drops: stats
                    .drop_counts()
                    .map(|(r, n)| (r.name().to_string(), n))
                    .collect(),
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
        receive_overflow: agent.shared.underlay.receive_drops(),
        repairs: agent.repairs.snapshot().into_iter().collect(),
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
            encap: p.encap.name().to_string(),
            path: agent.routing.path(p).name().to_string(),
        })
        .collect();
    routes.push(RouteRow {
        cidr: agent.info.pod_cidr,
        kind: "local".into(),
        node: agent.info.node.clone(),
        underlay_ip: agent.info.underlay_ip,
        vtep_mac: agent.info.vtep_mac,
        encap: agent.info.encap.to_string(),
        path: "local".into(),
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

/// Drop reasons that can be charged to a known sending peer.
const PEER_REASONS: [DropReason; 5] = [
    DropReason::Malformed,
    DropReason::NotIpv4,
    DropReason::WrongVni,
    DropReason::NotLocal,
    DropReason::Spoofed,
];

fn c_watch_sampled(agent: &Agent) -> u64 {
    agent.shared.forwarder.counters().watch.sampled()
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
        "podnet_agent_peer_drops_total",
        "counter",
        "Packets from each peer dropped by the inbound checks, by reason.",
        peers
            .iter()
            .flat_map(|p| {
                PEER_REASONS.iter().map(move |r| {
                    (
                        format!("peer=\"{}\",reason=\"{}\"", p.node, r.name()),
                        p.drops.get(r.name()).copied().unwrap_or(0),
                    )
                })
            })
            .collect::<Vec<_>>(),
    );
    m.family(
        "podnet_agent_drop_samples_total",
        "counter",
        "Drops recorded for `podnet-agent drops --watch` (rate-limited per reason).",
        one(c_watch_sampled(agent)),
    );
    m.family(
        "podnet_agent_icmp_sent_total",
        "counter",
        "ICMP errors written back into the TUN device.",
        one(c.icmp_sent),
    );
    m.family(
        "podnet_agent_icmp_ratelimited_total",
        "counter",
        "ICMP errors not sent because of the rate limit (1000/s, bursts of 50).",
        one(c.icmp_ratelimited),
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
    m.family(
        "podnet_agent_repairs_total",
        "counter",
        "Host state another process changed and the agent put back, by what it was.",
        agent
            .repairs
            .snapshot()
            .into_iter()
            .map(|(what, n)| (format!("what=\"{what}\""), n)),
    );
    m.family(
        "podnet_agent_receive_overflow_total",
        "counter",
        "Underlay datagrams the kernel dropped because the agent's receive sockets were full.",
        one(agent.shared.underlay.receive_drops()),
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
    m.family(
        "podnet_agent_overlay_mtu_bytes",
        "gauge",
        "MTU of the TUN device: the largest pod packet carried without ICMP fragmentation-needed.",
        one(u64::from(info.mtu)),
    );
    m.family(
        "podnet_agent_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        one(agent.started.elapsed().as_secs()),
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
        render_histogram(
            &agent.membership.convergence,
            &mut m,
            "podnet_agent_route_convergence_seconds",
            "Time from a node's registration with podnet-control to its route being installed here.",
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
