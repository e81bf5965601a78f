//! The running agent's shared state: what `/status` and `/metrics` show, what the membership
//! task updates, and the table swap both go through. The shells around it (the run function,
//! the admin API, the membership task) import this module and not each other.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;
use podnet_proto::ethernet::MacAddr;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

use crate::agent::host::{DirectRoutes, Repairs};
use crate::agent::pods::LocalPods;
use crate::agent::policy::Enforcer;
use crate::core::routing::{self, PeerPath, Routing};
use crate::core::table::{Peer, RouteTable, TableError};
use crate::datapath::Shared;

/// What `/status` shows that does not change while the agent runs.
#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_dev: String,
    pub vtep_mac: MacAddr,
    pub pod_cidr: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
    pub encap: &'static str,
    pub vni: Option<u32>,
    /// WireGuard: this node's public key (peers must be given it; the private key never
    /// leaves the state dir).
    pub wireguard_public_key: Option<String>,
    /// VXLAN: the outer UDP source ports sent from, one per lane, chosen by inner flow hash
    /// (empty for IP-in-IP).
    pub source_ports: Vec<u16>,
    pub mtu: u16,
    pub tun: String,
    /// TUN queues the data path reads in turn.
    pub tun_queues: usize,
    /// Underlay sockets packets arrive on: the VXLAN `SO_REUSEPORT` group (one per
    /// `--tun-queues`), or one IP-in-IP raw socket per worker.
    pub receive_sockets: usize,
    /// Data-path threads (`--workers`).
    pub workers: usize,
    pub offloads: OffloadInfo,
    pub membership: &'static str,
    pub control: Option<String>,
    /// This agent's PID, and the lock that makes it the only agent of its network namespace.
    pub pid: u32,
    pub lock: String,
    /// How peers are reached (`tunnel`, `cross-subnet`, `direct`), and the underlay subnet
    /// that decides which are on-link.
    pub routing: routing::Mode,
    pub underlay_net: Ipv4Net,
    /// Pod egress, as `status` shows it.
    pub egress: String,
}

/// Which offloads are in use (what the kernel accepted at start).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct OffloadInfo {
    pub tun_vnet_hdr: bool,
    pub tun_tso: bool,
    pub tun_csum: bool,
    pub udp_gso: bool,
    pub udp_gro: bool,
}

/// State the admin API and the membership task read while the agent runs.
pub struct Agent {
    pub info: NodeInfo,
    pub shared: Arc<Shared>,
    pub started: Instant,
    pub membership: MembershipStatus,
    pub state_dir: PathBuf,
    /// Repairs of the host state made since start (crate::agent::host).
    pub repairs: Arc<Repairs>,
    /// Which peers are reached by direct routes, and those routes (read by the host watch).
    pub routing: Routing,
    pub direct: Arc<ArcSwap<DirectRoutes>>,
    /// The control service client in control mode (for the graceful leave at shutdown).
    pub control: Option<podnet_control_client::client::Client>,
    /// The pods this node runs, as the CNI plugin reported them.
    pub pods: Arc<LocalPods>,
    /// Network policy for those pods.
    pub policy: Arc<Enforcer>,
}

impl Agent {
    /// Swaps in a new peer table built from `peers` at `revision`, keeping counters of peers
    /// that stay. The data path never waits: it keeps the old table until its next batch.
    pub fn apply_peers(&self, revision: u64, peers: Vec<Peer>) -> Result<(), TableError> {
        let old = self.shared.table.load();
        let new = old.rebuild(revision, peers)?;
        warn_unreachable_peers(self, Some(&old), &new);
        // Tunnels before routes: the data path finds a peer's tunnel once it routes to it.
        if let Some(wg) = &self.shared.wireguard {
            wg.sync(&new);
        }
        self.direct
            .store(Arc::new(self.routing.direct_routes(&new)));
        self.shared.table.store(Arc::new(new));
        Ok(())
    }
}

/// Logs, once per peer (again only if its encapsulation changes), each peer of `new` that this
/// node cannot send to: packets for it get ICMP host unreachable and the drop reason
/// `peer_encap`.
pub(crate) fn warn_unreachable_peers(agent: &Agent, old: Option<&RouteTable>, new: &RouteTable) {
    let config = agent.shared.forwarder().config();
    for p in new.peers() {
        let why = match (agent.routing.path(p), config.mtu_to(&p.encap)) {
            (PeerPath::Direct, _) | (PeerPath::Tunnel, Ok(_)) => continue,
            (PeerPath::Refused(why), _) => why,
            (PeerPath::Tunnel, Err(why)) => why.to_string(),
        };
        let known = old.is_some_and(|t| {
            t.peers()
                .iter()
                .any(|q| q.node == p.node && q.encap == p.encap)
        });
        if !known {
            tracing::warn!(peer = %p.node, encap = p.encap.name(),
                "peer {} receives {}, which this node cannot send ({why}): packets to {} get \
                 ICMP host unreachable (drop reason peer_encap)",
                p.node, p.encap.name(), p.pod_cidr);
        }
    }
}

/// Live state of the membership task, for `/status` and `/metrics`.
#[derive(Debug)]
pub struct MembershipStatus {
    /// Control-plane revision of the table in use.
    pub revision: AtomicU64,
    pub table_updates: AtomicU64,
    /// Registration (the `added` event's `last_heartbeat`) to route installed here, in seconds.
    pub convergence: Histogram,
}

impl Default for MembershipStatus {
    fn default() -> MembershipStatus {
        MembershipStatus {
            revision: AtomicU64::new(0),
            table_updates: AtomicU64::new(0),
            convergence: Histogram::new(CONVERGENCE_BUCKETS),
        }
    }
}

/// Buckets of the convergence histogram, in seconds (upper bounds; `+Inf` is implied).
pub const CONVERGENCE_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Wall-clock Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
