//! Where the agent's pod CIDR and peers come from: static flags, or `podnet-control`.
//!
//! In control mode the agent registers, renews its lease and follows the watch (all in
//! [`podnet_control_client::client`]); every change of the node table becomes a new route table that
//! is swapped in while the data path keeps running, and is written to
//! `<state-dir>/nodes.json` so an agent restarted while the control service is down forwards
//! with the last table it knew.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use podnet_control_client::client::{read_token_file, Client, ClientError};
use podnet_proto::api::Encap;
use podnet_proto::api::{NodeTable, RegisterRequest, RegisterResponse, WgKey};
use podnet_proto::ethernet::MacAddr;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agent::files::write_atomic;
use crate::agent::state::{unix_ms, Agent};
use crate::cli::{Membership, RunConfig, DEFAULT_CLUSTER_CIDR};
use crate::core::table::{Peer, PeerEncap};

/// How long `run` waits for the control service at start before falling back to the last
/// persisted table (and retrying in the background).
const JOIN_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("control service refused to register this node: {0}")]
    Refused(ClientError),
    #[error("control service unreachable and no saved state in {dir}: {source}; start podnet-control or check --control")]
    Unreachable { dir: PathBuf, source: ClientError },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the control service gave pod CIDR {pod} outside its cluster CIDR {cluster}: check podnet-control's --cluster-cidr and --node-prefix")]
    ClusterMismatch { pod: Ipv4Net, cluster: Ipv4Net },
    #[error("--cluster-cidr {flag} differs from the control service's cluster CIDR {service}: drop --cluster-cidr (the agent takes the service's) or give {service}")]
    ClusterFlag { flag: Ipv4Net, service: Ipv4Net },
    #[error("saved state {path} is unreadable: {reason}; delete it to start fresh")]
    BadState { path: PathBuf, reason: String },
}

/// The result of joining: enough to build the first route table.
pub struct Joined {
    pub pod_cidr: Ipv4Net,
    /// The whole pod network: the control service's, or `--cluster-cidr` (its default) when
    /// static.
    pub cluster_cidr: Ipv4Net,
    pub revision: u64,
    pub peers: Vec<Peer>,
    pub session: Option<Session>,
}

/// What the membership task needs to keep the node registered and its table current.
pub struct Session {
    pub client: Client,
    name: String,
    req: RegisterRequest,
    lease: Option<RegisterResponse>,
    table: NodeTable,
    state_file: PathBuf,
}

/// What control mode persists in `<state-dir>/nodes.json`.
#[derive(Serialize, Deserialize)]
struct Saved {
    node: String,
    pod_cidr: Ipv4Net,
    /// Absent from the files of agents that took the cluster CIDR from their flag.
    #[serde(default)]
    cluster_cidr: Option<Ipv4Net>,
    table: NodeTable,
}

/// Peers of `own` in a control-plane node table.
fn peers_from(table: &NodeTable, own: &str) -> Vec<Peer> {
    table
        .peers(own)
        .map(|n| Peer {
            node: n.name.clone(),
            underlay_ip: n.underlay_ip,
            vtep_mac: n.vtep_mac,
            pod_cidr: n.pod_cidr,
            encap: PeerEncap::of(n.encap, n.wireguard_public_key),
        })
        .collect()
}

fn static_name(ip: Ipv4Addr) -> String {
    format!("static-{ip}")
}

/// Joins the overlay: static peers from flags, or registration with podnet-control.
pub async fn join(
    cfg: &RunConfig,
    encap: Encap,
    vtep_mac: MacAddr,
    wireguard_public_key: Option<WgKey>,
) -> Result<Joined, MembershipError> {
    let (url, token_file, tls) = match &cfg.membership {
        Membership::Static { pod_cidr, peers } => {
            let peers = peers
                .iter()
                .map(|p| Peer {
                    node: static_name(p.underlay_ip),
                    underlay_ip: p.underlay_ip,
                    vtep_mac: p.vtep_mac,
                    pod_cidr: p.pod_cidr,
                    encap: PeerEncap::of(p.encap.unwrap_or(encap), p.wireguard_key),
                })
                .collect();
            return Ok(Joined {
                pod_cidr: *pod_cidr,
                cluster_cidr: cfg.cluster_cidr.unwrap_or(DEFAULT_CLUSTER_CIDR),
                revision: 0,
                peers,
                session: None,
            });
        }
        Membership::Control {
            url,
            token_file,
            tls,
        } => (url, token_file, tls),
    };
    let token = token_file.as_deref().map(read_token_file).transpose()?;
    let client = Client::with_tls(url, token, tls.as_ref())?;
    let req = RegisterRequest {
        underlay_ip: cfg.underlay_ip,
        encap,
        vtep_mac: Some(vtep_mac),
        wireguard_public_key,
    };
    let state_file = cfg.state_dir.join("nodes.json");
    let registered = tokio::time::timeout(
        JOIN_PATIENCE,
        client.register_with_retry(&cfg.node_name, &req),
    )
    .await;
    let (pod_cidr, cluster_cidr, lease, table) = match registered {
        Ok(Ok(lease)) => {
            let table = match client.list().await {
                Ok(list) => NodeTable::from_list(list),
                Err(_) => load(&state_file)?.map(|s| s.table).unwrap_or_default(),
            };
            (lease.pod_cidr, lease.cluster_cidr, Some(lease), table)
        }
        Ok(Err(e)) if !e.is_retryable() => return Err(MembershipError::Refused(e)),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            // The control service is away: forward with what we knew, keep trying.
            let source = ClientError::Unreachable {
                url: url.clone(),
                reason: format!("no answer within {JOIN_PATIENCE:?}"),
            };
            let Some(saved) = load(&state_file)? else {
                return Err(MembershipError::Unreachable {
                    dir: cfg.state_dir.clone(),
                    source,
                });
            };
            tracing::warn!(
                revision = saved.table.revision,
                "control service unreachable; forwarding with the saved node table"
            );
            let cluster = saved
                .cluster_cidr
                .or(cfg.cluster_cidr)
                .unwrap_or(DEFAULT_CLUSTER_CIDR);
            (saved.pod_cidr, cluster, None, saved.table)
        }
    };
    if let Some(flag) = cfg.cluster_cidr.filter(|f| *f != cluster_cidr) {
        return Err(MembershipError::ClusterFlag {
            flag,
            service: cluster_cidr,
        });
    }
    if !cluster_cidr.contains(&pod_cidr) {
        return Err(MembershipError::ClusterMismatch {
            pod: pod_cidr,
            cluster: cluster_cidr,
        });
    }
    Ok(Joined {
        pod_cidr,
        cluster_cidr,
        revision: table.revision,
        peers: peers_from(&table, &cfg.node_name),
        session: Some(Session {
            client,
            name: cfg.node_name.clone(),
            req,
            lease,
            table,
            state_file,
        }),
    })
}

fn load(path: &Path) -> Result<Option<Saved>, MembershipError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| MembershipError::BadState {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(MembershipError::BadState {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Keeps the lease and the route table current until aborted.
pub async fn run(session: Session, agent: Arc<Agent>) {
    let Session {
        client,
        name,
        req,
        lease,
        table,
        state_file,
    } = session;
    let (pod_cidr, cluster_cidr) = (agent.info.pod_cidr, agent.info.cluster_cidr);
    persist(&state_file, &name, (pod_cidr, cluster_cidr), &table);
    let renew = {
        let (client, name, req) = (client.clone(), name.clone(), req.clone());
        tokio::spawn(async move {
            let mut lease = lease;
            loop {
                let current = match lease.take() {
                    Some(l) => l,
                    None => match client.register_with_retry(&name, &req).await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "control service refused this node");
                            return;
                        }
                    },
                };
                if current.pod_cidr != pod_cidr {
                    tracing::error!(
                        old = %pod_cidr, new = %current.pod_cidr,
                        "control service moved this node to another pod CIDR; restart the agent"
                    );
                    return;
                }
                let e = client.keep_registered(&name, &req, &current).await;
                tracing::error!(error = %e, "lease renewal stopped; registering again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let (tx, mut rx) = watch::channel(table.clone());
    let watcher = {
        let client = client.clone();
        tokio::spawn(async move { client.watch(Some(table), tx).await })
    };
    let mut applied = rx.borrow().revision;
    agent.membership.revision.store(applied, Relaxed);
    while rx.changed().await.is_ok() {
        let table = rx.borrow_and_update().clone();
        if table.revision == applied {
            continue;
        }
        let peers = peers_from(&table, &name);
        let before = agent.shared.table.load();
        let (old_names, new_names): (Vec<_>, Vec<_>) = (
            before.peers().iter().map(|p| p.node.clone()).collect(),
            peers.iter().map(|p| p.node.clone()).collect(),
        );
        match agent.apply_peers(table.revision, peers) {
            Ok(()) => {
                applied = table.revision;
                agent.membership.revision.store(applied, Relaxed);
                agent.membership.table_updates.fetch_add(1, Relaxed);
                // On the service's clock, like the heartbeat times (ours if it cannot say).
                let now_ms = client.server_time_ms().unwrap_or_else(unix_ms);
                for n in new_names.iter().filter(|n| !old_names.contains(n)) {
                    if let Some(node) = table.nodes.get(n) {
                        // An `added` node carries its registration time as last_heartbeat.
                        let took =
                            Duration::from_millis(now_ms.saturating_sub(node.last_heartbeat));
                        agent.membership.convergence.observe(took.as_secs_f64());
                        tracing::info!(node = %n, pod_cidr = %node.pod_cidr, underlay_ip = %node.underlay_ip, revision = applied, convergence_ms = took.as_millis() as u64, "route added");
                    }
                }
                for n in old_names.iter().filter(|n| !new_names.contains(n)) {
                    tracing::info!(node = %n, revision = applied, "route removed");
                }
                persist(&state_file, &name, (pod_cidr, cluster_cidr), &table);
            }
            Err(e) => {
                tracing::error!(error = %e, revision = table.revision, "node table rejected; keeping the previous one")
            }
        }
    }
    renew.abort();
    watcher.abort();
}

/// Writes the state an agent restarted while the control service is away starts from: the
/// node's pod and cluster CIDRs, and the table.
fn persist(
    path: &Path,
    node: &str,
    (pod_cidr, cluster_cidr): (Ipv4Net, Ipv4Net),
    table: &NodeTable,
) {
    let saved = Saved {
        node: node.to_string(),
        pod_cidr,
        cluster_cidr: Some(cluster_cidr),
        table: table.clone(),
    };
    match serde_json::to_vec_pretty(&saved) {
        Ok(bytes) => {
            if let Err(e) = write_atomic(path, &bytes) {
                tracing::warn!(error = %e, "cannot save the node table");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode the node table"),
    }
}

/// On a clean shutdown in control mode, leave gracefully so peers withdraw our routes at once.
pub async fn leave(agent: &Agent) {
    let Some(client) = &agent.control else {
        return;
    };
    match tokio::time::timeout(
        Duration::from_secs(2),
        client.delete(&agent.info.node, false),
    )
    .await
    {
        Ok(Ok(())) => tracing::info!("left the cluster"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "graceful leave failed; the lease will lapse instead")
        }
        Err(_) => tracing::warn!("graceful leave timed out; the lease will lapse instead"),
    }
}
