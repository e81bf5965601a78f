//! The agent's local admin API, server side: `/status`, `/routes`, `/metrics`, `/why`,
//! `/drops`, `/pods` (where the CNI plugin reports the pods it attaches) and the types they
//! answer with. The commands that read it are in
//! [`crate::agent::admin_client`].
//!
//! Handlers only read atomics and the current route table (`ArcSwap::load`), so scraping never
//! slows the data path. Metric names follow the Prometheus conventions (`podnet_agent_` prefix,
//! `_total` for counters, base units).

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use ipnet::Ipv4Net;
use podnet_proto::ethernet::MacAddr;
use serde::{Deserialize, Serialize};

use podnet_control_client::metrics::{self, label, one, Families, Labels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use crate::agent::pods::PodError;
use crate::agent::state::{unix_ms, Agent, NodeInfo};
use crate::cni::identity::PodIdentity;
use crate::core::drops::{CountersSnapshot, DropReason, PeerStats, TrafficSnapshot};
use crate::core::dropwatch::DropSample;
use crate::core::routing::PeerPath;
use crate::core::why::{self, Answer};
use podnet_proto::policy::{PodRecord, Protocol};

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
    /// A WireGuard peer's tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardPeer>,
}

/// A WireGuard peer's tunnel in `/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireguardPeer {
    pub public_key: String,
    /// The key's first 8 characters, as `status` prints it.
    pub key: String,
    /// Seconds since the last handshake completed (none yet: absent).
    pub last_handshake_s: Option<f64>,
    /// Handshakes completed since the tunnel started (it starts afresh on a new key).
    pub handshakes: u64,
    /// Inner bytes through the tunnel (boringtun's count of data messages).
    pub tx_bytes: u64,
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
    /// The control replica the agent talks to now (of those given to `--control`).
    pub control_server: Option<String>,
    pub peers: Vec<PeerStatus>,
    /// The node's counters: the sum of `worker_counters`.
    pub counters: CountersSnapshot,
    /// What each data-path worker carried and dropped.
    pub worker_counters: Vec<WorkerTraffic>,
    pub io_errors: IoErrorsBody,
    /// Underlay datagrams the kernel dropped because the receive sockets were full (never read,
    /// so under no drop reason).
    pub receive_overflow: u64,
    /// Host state put back since start, by kind (crate::agent::host::REPAIR_KINDS).
    pub repairs: std::collections::BTreeMap<&'static str, u64>,
    pub policy: PolicyStatus,
}

/// Network policy in `/status`: the revision of the records in force, the policies, and this
/// node's pods each direction isolates (`NS/NAME`).
#[derive(Debug, Serialize)]
pub struct PolicyStatus {
    /// The records' revision whose rules this node enforces (0 before any).
    pub revision: u64,
    pub policies: Vec<String>,
    pub ingress_isolated: Vec<String>,
    pub egress_isolated: Vec<String>,
}

fn policy_status(agent: &Agent) -> PolicyStatus {
    let records = agent.policy.records();
    let rules = agent.policy.rules().unwrap_or_default();
    let pods = agent.pods.snapshot();
    let names = |isolated: &std::collections::BTreeSet<std::net::Ipv4Addr>| {
        pods.values()
            .filter(|p| {
                p.ips
                    .iter()
                    .any(|ip| matches!(ip, std::net::IpAddr::V4(v4) if isolated.contains(v4)))
            })
            .map(PodRecord::key)
            .collect()
    };
    PolicyStatus {
        revision: agent.policy.enforced(),
        policies: records.policies.keys().cloned().collect(),
        ingress_isolated: names(&rules.ingress_isolated),
        egress_isolated: names(&rules.egress_isolated),
    }
}

/// One worker's share of the node's counters, in `/status`.
#[derive(Debug, Serialize)]
pub struct WorkerTraffic {
    pub tx: TrafficSnapshot,
    pub rx: TrafficSnapshot,
    pub drops: u64,
}

impl From<&CountersSnapshot> for WorkerTraffic {
    fn from(c: &CountersSnapshot) -> Self {
        WorkerTraffic {
            tx: c.tx,
            rx: c.rx,
            drops: c.total_drops(),
        }
    }
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
        .route("/pods", get(list_pods))
        .route(
            "/pods/{container}/{ifname}",
            axum::routing::put(attach_pod).delete(detach_pod),
        )
        .with_state(agent)
}

/// What the CNI plugin reports of a pod it attached: its identity and addresses.
#[derive(Debug, Deserialize)]
pub struct PodAttached {
    #[serde(flatten)]
    pub identity: PodIdentity,
    pub ips: Vec<std::net::IpAddr>,
}

/// `PUT /pods/{container}/{ifname}`: the CNI plugin attached a pod.
async fn attach_pod(
    State(agent): State<Arc<Agent>>,
    Path((container, ifname)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let attached: PodAttached = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return pod_error(StatusCode::BAD_REQUEST, format!("pod report: {e}")),
    };
    let PodAttached { identity, ips } = attached;
    let record = PodRecord {
        namespace: identity.namespace,
        name: identity.name,
        node: String::new(),
        ips,
        labels: identity.labels,
        ports: identity.ports,
        container_id: container.clone(),
    };
    let key = record.key();
    let attachment = format!("{container}/{ifname}");
    match agent.pods.attach(&attachment, record) {
        Ok(changed) => {
            // The pod's rules are in place before the plugin may finish: the pod is never
            // reachable against its policies.
            let a = Arc::clone(&agent);
            let enforced = tokio::task::spawn_blocking(move || a.policy.apply()).await;
            if let Some(e) = match enforced {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            } {
                let _ = agent.pods.detach(&attachment);
                return pod_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the pod's network policy could not be applied: {e}"),
                );
            }
            if changed {
                tracing::info!(pod = %key, container = %container, "pod attached");
            }
            Json(serde_json::json!({"pod": key, "changed": changed})).into_response()
        }
        Err(e @ PodError::Invalid(_)) => pod_error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ PodError::NameTaken { .. }) => pod_error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ PodError::Save(_)) => pod_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `DELETE /pods/{container}/{ifname}`: the CNI plugin removed a pod (idempotent).
async fn detach_pod(
    State(agent): State<Arc<Agent>>,
    Path((container, ifname)): Path<(String, String)>,
) -> axum::response::Response {
    match agent.pods.detach(&format!("{container}/{ifname}")) {
        Ok(gone) => {
            let a = Arc::clone(&agent);
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || a.policy.apply()).await {
                tracing::warn!("network policy not updated after a pod left: {e}");
            }
            let pod = gone.map(|p| p.key());
            if let Some(pod) = &pod {
                tracing::info!(pod = %pod, container = %container, "pod detached");
            }
            Json(serde_json::json!({"pod": pod})).into_response()
        }
        Err(e) => pod_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /pods`: this node's pods, by attachment.
async fn list_pods(
    State(agent): State<Arc<Agent>>,
) -> Json<std::collections::BTreeMap<String, PodRecord>> {
    Json(agent.pods.snapshot())
}

fn pod_error(status: StatusCode, detail: String) -> axum::response::Response {
    (
        status,
        Json(serde_json::json!({"error": status.canonical_reason(), "detail": detail})),
    )
        .into_response()
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
        agent.shared.forwarder().counters().watch.tick(unix_ms());
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
    /// With a source, the answer says what network policy decides.
    src: Option<Ipv4Addr>,
    port: Option<u16>,
    protocol: Option<String>,
}

async fn why_handler(State(agent): State<Arc<Agent>>, Query(q): Query<WhyQuery>) -> Json<Answer> {
    let mut answer = {
        let table = agent.shared.table.load();
        why::explain(
            agent.shared.forwarder().config(),
            &agent.routing,
            &table,
            q.ip,
            agent.control.is_some(),
        )
    };
    if let Some(src) = q.src {
        let protocol = q
            .protocol
            .as_deref()
            .map(|p| p.to_ascii_uppercase())
            .and_then(|p| Protocol::from_name(&p))
            .unwrap_or(Protocol::Tcp);
        let port = q.port.map(|n| (n, protocol));
        answer.policy = Some(why::PolicyAnswer::new(
            &agent.policy.cluster(),
            src,
            q.ip,
            port,
        ));
    }
    let tunnel = answer
        .peer
        .as_ref()
        .zip(agent.shared.wireguard.as_ref())
        .and_then(|(p, wg)| wg.tunnel(p.underlay_ip));
    answer.tunnel = tunnel.map(|t| {
        let s = t.stats();
        why::TunnelInfo {
            key: t.key.short(),
            last_handshake_ms: s.last_handshake_s.map(|s| (s * 1000.0) as u64),
            tx_bytes: s.tx_bytes,
            rx_bytes: s.rx_bytes,
        }
    });
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
    /// Packets network policy denied here, sampled, after `policy_since`.
    #[serde(default)]
    pub policy: Vec<crate::agent::policy::Denial>,
    /// Sequence number of the newest denial: pass it as `policy_since` next time.
    #[serde(default)]
    pub policy_last_seq: u64,
}

#[derive(Debug, Deserialize)]
struct DropsQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    policy_since: u64,
}

async fn drops_handler(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<DropsQuery>,
) -> Json<DropsBody> {
    let watch = &agent.shared.forwarder().counters().watch;
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
    let (policy_last_seq, policy) = agent.policy.denials_since(q.policy_since);
    Json(DropsBody {
        policy,
        policy_last_seq,
        last_seq: sampled_total,
        drops_total: agent.shared.counters().total_drops(),
        sampled_total,
        samples,
        receive_overflow: agent.shared.underlay.receive_drops(),
    })
}

fn peers(agent: &Agent) -> Vec<PeerStatus> {
    let table = agent.shared.table.load();
    let config = agent.shared.forwarder().config();
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
                wireguard: agent
                    .shared
                    .wireguard
                    .as_ref()
                    .and_then(|wg| wg.tunnel(p.underlay_ip))
                    .map(|t| {
                        let s = t.stats();
                        WireguardPeer {
                            public_key: t.key.to_string(),
                            key: t.key.short(),
                            last_handshake_s: s.last_handshake_s,
                            handshakes: s.handshakes,
                            tx_bytes: s.tx_bytes,
                            rx_bytes: s.rx_bytes,
                        }
                    }),
            }
        })
        .collect()
}

async fn status(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let io = &agent.shared.io_errors;
    let workers = agent.shared.worker_counters();
    let body = StatusBody {
        info: &agent.info,
        uptime_s: agent.started.elapsed().as_secs(),
        table_revision: agent.shared.table.load().revision(),
        control_connected: agent.control.as_ref().map(|c| c.stats().watching),
        control_server: agent.control.as_ref().map(|c| c.server().to_string()),
        peers: peers(&agent),
        counters: CountersSnapshot::sum(&workers),
        worker_counters: workers.iter().map(WorkerTraffic::from).collect(),
        io_errors: IoErrorsBody {
            send: io.send.load(Relaxed),
            tun_write: io.tun_write.load(Relaxed),
            offload: io.offload.load(Relaxed),
        },
        receive_overflow: agent.shared.underlay.receive_drops(),
        repairs: agent.repairs.snapshot().into_iter().collect(),
        policy: policy_status(&agent),
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

/// Drop reasons that can be charged to a known sending peer.
const PEER_REASONS: [DropReason; 10] = [
    DropReason::Malformed,
    DropReason::NotIpv4,
    DropReason::WrongVni,
    DropReason::NotLocal,
    DropReason::Spoofed,
    DropReason::WgBadMac,
    DropReason::WgReplay,
    DropReason::WgUnknownIndex,
    DropReason::WgWrongKey,
    DropReason::WgCookie,
];

/// Reads the agent's counters at each scrape: they live in the data path's atomics, which the
/// core keeps free of any metrics library.
struct AgentMetrics(Arc<Agent>);

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AgentMetrics")
            .field(&self.0.info.node)
            .finish()
    }
}

fn dirs(tx: u64, rx: u64) -> [(Labels, u64); 2] {
    [
        (label("direction", "tx"), tx),
        (label("direction", "rx"), rx),
    ]
}

fn peer_dir(p: &PeerStatus, tx: u64, rx: u64) -> [(Labels, u64); 2] {
    dirs(tx, rx).map(|(mut l, n)| {
        l.insert(0, ("peer", p.node.clone()));
        (l, n)
    })
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for AgentMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        let agent = &*self.0;
        let mut m = Families(encoder);
        let workers = agent.shared.worker_counters();
        let c = CountersSnapshot::sum(&workers);
        let info = &agent.info;
        m.gauge(
            "podnet_agent_info",
            "Static facts about this agent (value is always 1).",
            [(
                vec![
                    ("node", info.node.clone()),
                    ("encap", info.encap.to_string()),
                    ("pod_cidr", info.pod_cidr.to_string()),
                    ("tun", info.tun.clone()),
                ],
                1,
            )],
        )?;
        m.counter(
            "podnet_agent_drops",
            "Packets dropped, by reason.",
            c.drops.iter().map(|(r, n)| (label("reason", r.name()), *n)),
        )?;
        m.counter(
            "podnet_agent_packets",
            "Inner packets carried (tx: encapsulated towards peers, rx: delivered to the TUN).",
            dirs(c.tx.packets, c.rx.packets),
        )?;
        m.counter(
            "podnet_agent_bytes",
            "Inner packet bytes carried, by direction.",
            dirs(c.tx.bytes, c.rx.bytes),
        )?;
        m.counter(
            "podnet_agent_worker_packets",
            "Inner packets carried by each data-path worker, by direction.",
            workers.iter().enumerate().flat_map(|(i, w)| {
                dirs(w.tx.packets, w.rx.packets).map(|(mut l, n)| {
                    l.insert(0, ("worker", i.to_string()));
                    (l, n)
                })
            }),
        )?;
        let peers = peers(agent);
        m.counter(
            "podnet_agent_peer_packets",
            "Inner packets exchanged with each peer, by direction.",
            peers
                .iter()
                .flat_map(|p| peer_dir(p, p.tx_packets, p.rx_packets)),
        )?;
        m.counter(
            "podnet_agent_peer_bytes",
            "Inner packet bytes exchanged with each peer, by direction.",
            peers
                .iter()
                .flat_map(|p| peer_dir(p, p.tx_bytes, p.rx_bytes)),
        )?;
        m.counter(
            "podnet_agent_peer_drops",
            "Packets from each peer dropped by the inbound checks, by reason.",
            peers.iter().flat_map(|p| {
                PEER_REASONS.iter().map(move |r| {
                    (
                        vec![("peer", p.node.clone()), ("reason", r.name().to_string())],
                        p.drops.get(r.name()).copied().unwrap_or(0),
                    )
                })
            }),
        )?;
        let tunnels: Vec<_> = peers
            .iter()
            .filter_map(|p| p.wireguard.as_ref().map(|w| (p, w)))
            .collect();
        m.counter(
            "podnet_agent_wireguard_handshakes",
            "WireGuard handshakes completed with each peer (since its tunnel started: a new key starts it afresh).",
            tunnels
                .iter()
                .map(|(p, w)| (label("peer", &p.node), w.handshakes)),
        )?;
        m.counter(
            "podnet_agent_wireguard_bytes",
            "Inner bytes through each peer's WireGuard tunnel, by direction.",
            tunnels
                .iter()
                .flat_map(|(p, w)| peer_dir(p, w.tx_bytes, w.rx_bytes)),
        )?;
        m.counter(
            "podnet_agent_drop_samples",
            "Drops recorded for `podnet-agent drops --watch` (rate-limited per reason).",
            one(agent.shared.forwarder().counters().watch.sampled()),
        )?;
        m.counter(
            "podnet_agent_icmp_sent",
            "ICMP errors written back into the TUN device.",
            one(c.icmp_sent),
        )?;
        m.counter(
            "podnet_agent_icmp_ratelimited",
            "ICMP errors not sent because of the rate limit (1000/s, bursts of 50).",
            one(c.icmp_ratelimited),
        )?;
        let io = &agent.shared.io_errors;
        m.counter(
            "podnet_agent_io_errors",
            "Operating-system errors on the data path, by operation.",
            [
                (label("op", "send"), io.send.load(Relaxed)),
                (label("op", "tun_write"), io.tun_write.load(Relaxed)),
                (label("op", "offload"), io.offload.load(Relaxed)),
            ],
        )?;
        m.counter(
            "podnet_agent_repairs",
            "Host state another process changed and the agent put back, by what it was.",
            agent
                .repairs
                .snapshot()
                .into_iter()
                .map(|(what, n)| (label("what", what), n)),
        )?;
        m.counter(
            "podnet_agent_policy_packets",
            "Packets network policy judged on this node, by direction and verdict: every denied \
             packet, and the first packet of each allowed connection since the last policy change.",
            agent
                .policy
                .judged()
                .into_iter()
                .map(|(direction, allowed, n)| {
                    let verdict = if allowed { "allowed" } else { "denied" };
                    (
                        vec![
                            ("direction", direction.name().to_string()),
                            ("verdict", verdict.to_string()),
                        ],
                        n,
                    )
                }),
        )?;
        m.counter(
            "podnet_agent_receive_overflow",
            "Underlay datagrams the kernel dropped because the agent's receive sockets were full.",
            one(agent.shared.underlay.receive_drops()),
        )?;
        let table = agent.shared.table.load();
        m.gauge(
            "podnet_agent_routes",
            "Peer routes in the forwarding table.",
            one(gauge(table.len() as u64)),
        )?;
        m.gauge(
            "podnet_agent_table_revision",
            "Control-plane revision of the forwarding table.",
            one(gauge(table.revision())),
        )?;
        m.gauge(
            "podnet_agent_overlay_mtu_bytes",
            "MTU of the TUN device: the largest pod packet carried without ICMP fragmentation-needed.",
            one(i64::from(info.mtu)),
        )?;
        m.gauge(
            "podnet_agent_uptime_seconds",
            "Seconds since the agent started.",
            one(gauge(agent.started.elapsed().as_secs())),
        )?;
        let o = info.offloads;
        m.gauge(
            "podnet_agent_offload_enabled",
            "Offloads in use (1) or not (0).",
            [
                ("tun_tso", o.tun_tso),
                ("tun_csum", o.tun_csum),
                ("udp_gso", o.udp_gso),
                ("udp_gro", o.udp_gro),
            ]
            .map(|(name, on)| (label("offload", name), i64::from(on))),
        )?;
        if let Some(client) = &agent.control {
            let stats = client.stats();
            m.gauge(
                "podnet_agent_control_connected",
                "Whether the watch on podnet-control is established.",
                one(i64::from(stats.watching)),
            )?;
            m.counter(
                "podnet_agent_control_watch_connects",
                "Watch connections opened to podnet-control (reconnects included).",
                one(stats.watch_connects),
            )?;
            m.counter(
                "podnet_agent_lease_renewals",
                "Lease renewals, by result.",
                [
                    (label("result", "ok"), stats.renewals),
                    (label("result", "failed"), stats.renew_failures),
                ],
            )?;
            m.counter(
                "podnet_agent_table_updates",
                "Node-table changes applied from the control service.",
                one(agent.membership.table_updates.load(Relaxed)),
            )?;
        }
        Ok(())
    }
}

/// Prometheus text exposition of the agent's metrics.
pub fn render_metrics(agent: &Arc<Agent>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentMetrics(agent.clone())));
    if agent.control.is_some() {
        // prometheus-client appends the "." itself.
        registry.register(
            "podnet_agent_route_convergence_seconds",
            "Time from a node's registration with podnet-control to its route being installed here",
            agent.membership.convergence.clone(),
        );
    }
    metrics::render(&registry)
}

async fn metrics(State(agent): State<Arc<Agent>>) -> axum::response::Response {
    // Policy's counters are read from nft.
    match tokio::task::spawn_blocking(move || render_metrics(&agent)).await {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics failed: {e}\n"),
        )
            .into_response(),
    }
}
