//! `podnet-agent run`: host setup, the data-path threads, the admin API and clean teardown.
//!
//! Order matters: everything that can fail for a user-fixable reason (capabilities, underlay
//! address, a `tunl0` of the wrong kind, the control service refusing us) is checked before
//! anything is changed on the host, and whatever was installed is removed again on every exit
//! path after that (SIGINT/SIGTERM, or a setup step failing half way).

pub mod admin;
pub mod admin_client;
pub mod egress;
pub mod files;
pub mod host;
pub mod membership;
pub mod pods;
pub mod policy;
pub mod state;

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;
use podnet_proto::api::Encap;
use podnet_proto::ethernet::MacAddr;
use podnet_proto::vxlan::{self, Vni};

use crate::cli::{Membership, MtuArg, RunConfig, DEFAULT_STATE_DIR};
use crate::core::drops::Counters;
use crate::core::forward::{Forwarder, NodeConfig, SendPaths};
use crate::core::routing::{self, PeerPath, Routing};
use crate::core::table::{RouteTable, TableError};
use crate::datapath::{self, IoErrors, Shared, Underlay};
use crate::sys::caps::{self, Capability};
use crate::sys::lock::{self, AgentLock, LockError, AGENT_LOCK};
use crate::sys::netlink::{Netlink, NetlinkError};
use crate::sys::raw::{IpipSocket, RawError};
use crate::sys::tun::{Offloads, Tun, TunConfig, TunError, DEFAULT_TX_QUEUE_LEN};
use crate::sys::udp::{
    UdpConfig, UdpError, UdpTunnelSocket, DEFAULT_BUFFER_BYTES, DEFAULT_SOURCE_PORTS,
};
use crate::sys::{sysctl, Stop};
use crate::wireguard::{self, KeyError, Keys, Wireguard};
use egress::Masquerade;
use files::{write_subnet_env, StateDirError};
use host::{Desired, Host, HostError, Repairs};
use pods::LocalPods;
use state::{warn_unreachable_peers, Agent, MembershipStatus, NodeInfo, OffloadInfo};

/// Why the agent could not start (or had to stop).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Caps(#[from] caps::CapsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error(transparent)]
    Udp(#[from] UdpError),
    #[error(transparent)]
    Raw(#[from] RawError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error("TUN device {name} is held by another process (PID {}); nothing was changed. A second open would attach to it and take a share of its packets: stop that process, or pass another --tun-name", pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "))]
    TunHeld { name: String, pids: Vec<i32> },
    #[error("--static-peer {cidr}={ip} cannot be reached: {why}")]
    PeerRefused {
        cidr: Ipv4Net,
        ip: Ipv4Addr,
        why: String,
    },
    #[error("the static peers do not form a valid table: {0}")]
    Table(#[from] TableError),
    #[error("--underlay-dev {dev} does not hold --underlay-ip {ip} (it is on {actual}); fix one of the two flags")]
    UnderlayDevMismatch {
        dev: String,
        ip: Ipv4Addr,
        actual: String,
    },
    #[error("underlay device {dev} has MTU {mtu}, too small for {encap} (overhead {overhead} bytes); raise its MTU or pass --mtu")]
    UnderlayMtuTooSmall {
        dev: String,
        mtu: u32,
        encap: &'static str,
        overhead: usize,
    },
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot serve the admin API on {addr}: {source}; pass another --api address")]
    Api {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Membership(#[from] membership::MembershipError),
    #[error("data path thread failed: {0}")]
    DataPath(io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
}

/// Runs the agent until SIGINT/SIGTERM. Host changes are undone before returning.
pub fn run(cfg: RunConfig) -> Result<(), AgentError> {
    caps::require(&[Capability::NetAdmin, Capability::NetRaw])?;
    // Before anything is changed: one agent per network namespace, and a TUN device nobody
    // else holds. Held until this function returns (or the process dies).
    let lock = AgentLock::acquire(AGENT_LOCK, Path::new(DEFAULT_STATE_DIR))?;
    let holders = lock::tun_holders(&cfg.tun_name);
    if !holders.is_empty() {
        return Err(AgentError::TunHeld {
            name: cfg.tun_name.clone(),
            pids: holders,
        });
    }
    let encap = cfg.encap;
    let netlink = Netlink::new()?;
    let underlay = netlink.link_with_address(cfg.underlay_ip)?;
    if let Some(dev) = &cfg.underlay_dev {
        if dev != &underlay.name {
            return Err(AgentError::UnderlayDevMismatch {
                dev: dev.clone(),
                ip: cfg.underlay_ip,
                actual: underlay.name,
            });
        }
    }
    let mtu = match cfg.mtu {
        MtuArg::Fixed(m) => m,
        MtuArg::Auto => {
            let m = (underlay.mtu as usize).saturating_sub(encap.overhead());
            if m < 576 {
                return Err(AgentError::UnderlayMtuTooSmall {
                    dev: underlay.name,
                    mtu: underlay.mtu,
                    encap: encap.name(),
                    overhead: encap.overhead(),
                });
            }
            m.min(usize::from(u16::MAX)) as u16
        }
    };
    let vtep_mac = MacAddr::vtep_for(cfg.underlay_ip);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("podnet-ctl")
        .build()
        .map_err(AgentError::Runtime)?;

    // The key pair before joining: its public half goes into the node record.
    let wireguard = match encap {
        Encap::Wireguard => Some(Wireguard::new(Keys::load_or_create(&cfg.state_dir)?)),
        _ => None,
    };
    // Membership first: in control mode the pod CIDR comes from the control service.
    let joined = runtime.block_on(membership::join(
        &cfg,
        encap,
        vtep_mac,
        wireguard.as_ref().map(Wireguard::public),
    ))?;
    let (pod_cidr, cluster_cidr) = (joined.pod_cidr, joined.cluster_cidr);
    let table = RouteTable::build(joined.revision, joined.peers)?;
    let routing = Routing {
        mode: match (encap, cfg.cross_subnet) {
            (Encap::None, _) => routing::Mode::Direct,
            (_, true) => routing::Mode::CrossSubnet,
            (_, false) => routing::Mode::Tunnel,
        },
        underlay_net: netlink
            .addresses(underlay.index)?
            .into_iter()
            .find(|net| net.contains(&cfg.underlay_ip))
            .map_or_else(|| Ipv4Net::from(cfg.underlay_ip), |net| net.trunc()),
    };
    if let Membership::Static { .. } = cfg.membership {
        // A static peer that cannot be reached is a mistake in the flags: say so now.
        for p in table.peers() {
            if let PeerPath::Refused(why) = routing.path(p) {
                return Err(AgentError::PeerRefused {
                    cidr: p.pod_cidr,
                    ip: p.underlay_ip,
                    why,
                });
            }
        }
    }
    let direct = Arc::new(ArcSwap::from_pointee(routing.direct_routes(&table)));

    let tun = Tun::open(&TunConfig {
        offload: cfg.offload,
        multi_queue: cfg.tun_queues > 1,
        ..TunConfig::new(&cfg.tun_name)
    })?;
    let mut tun_queues = Vec::new();
    for _ in 1..cfg.tun_queues {
        match tun.clone_queue() {
            Ok(q) => tun_queues.push(q),
            Err(e) => {
                tracing::warn!(error = %e, queues = 1 + tun_queues.len(),
                    "cannot open more TUN queues; going on with these");
                break;
            }
        }
    }
    let queues = 1 + tun_queues.len();
    let workers = match cfg.workers {
        Some(w) if usize::from(w) > queues => {
            tracing::warn!(
                workers = w,
                queues,
                "fewer TUN queues than workers; one worker per queue"
            );
            queues
        }
        Some(w) => usize::from(w),
        None => crate::cli::default_workers(queues),
    };
    let offloads: Offloads = tun.offloads();
    if let Some(e) = tun.offload_refusal() {
        tracing::warn!(error = %e, "TUN offload refused by the kernel; using the per-packet path");
    }
    // The tunl0 address is the network address of our pod CIDR (DESIGN: 10.244.1.0/32); it is
    // also the source of the ICMP errors we write into tunl0.
    let tun_addr = pod_cidr.network();
    let repairs = Arc::new(Repairs::default());
    let mut host = Some(Host::install(
        netlink,
        Desired {
            tun_name: cfg.tun_name.clone(),
            mtu: u32::from(mtu),
            address: tun_addr,
            cluster_cidr,
            tx_queue_len: DEFAULT_TX_QUEUE_LEN,
            direct: Arc::clone(&direct),
            underlay_index: underlay.index,
            masquerade: cfg.masquerade.then_some(Masquerade {
                pod_cidr,
                cluster_cidr,
            }),
        },
        tun.index(),
    )?);
    let result = (|| {
        // Peers are sent what they receive: this node's own sockets, and a send-only socket
        // for the other encapsulation. A send path that cannot be opened only makes the peers
        // that need it unreachable (logged, counted as peer_encap), never the node.
        let mut send = SendPaths::all(mtu, underlay.mtu);
        let sock = match encap {
            Encap::Vxlan => {
                let own = UdpTunnelSocket::bind(&UdpConfig {
                    gro: cfg.offload,
                    gso: cfg.offload,
                    source_ports: DEFAULT_SOURCE_PORTS,
                    receivers: usize::from(cfg.tun_queues),
                    ..UdpConfig::new(cfg.underlay_ip, vxlan::PORT)
                })?;
                let ipip = IpipSocket::send_only(cfg.underlay_ip, DEFAULT_BUFFER_BYTES)
                    .map_err(|e| {
                        send.ipip = Err(format!("cannot open the IP-in-IP send socket: {e}"))
                    })
                    .ok();
                Underlay::vxlan(own, ipip)
            }
            Encap::Ipip => {
                let own = (0..workers)
                    .map(|w| {
                        IpipSocket::bind_share(cfg.underlay_ip, DEFAULT_BUFFER_BYTES, w, workers)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // Bound to an ephemeral port, not 4789: it only sends.
                let vxlan = UdpTunnelSocket::bind(&UdpConfig {
                    gro: false,
                    gso: cfg.offload,
                    source_ports: DEFAULT_SOURCE_PORTS,
                    ..UdpConfig::new(cfg.underlay_ip, 0)
                })
                .map_err(|e| send.vxlan = Err(format!("cannot open the VXLAN send sockets: {e}")))
                .ok();
                Underlay::ipip(own, vxlan)
            }
            Encap::None => {
                let why = "this node runs --encap none: it has no tunnel, and reaches only \
                           peers on its underlay subnet, by direct routes";
                send.ipip = Err(why.into());
                send.vxlan = Err(why.into());
                Underlay::none()
            }
            Encap::Wireguard => {
                let own = UdpTunnelSocket::bind(&UdpConfig {
                    gro: cfg.offload,
                    gso: cfg.offload,
                    receivers: usize::from(cfg.tun_queues),
                    ..UdpConfig::new(cfg.underlay_ip, wireguard::PORT)
                })?;
                let why = "this node runs --encap wireguard and sends pod traffic only \
                           encrypted; run that peer with --encap wireguard too";
                send.ipip = Err(why.into());
                send.vxlan = Err(why.into());
                Underlay::wireguard(own)
            }
        };
        if encap != Encap::Wireguard {
            send.wireguard = Err(format!(
                "this node runs --encap {}: it has no WireGuard key; run every node of an \
                 encrypted cluster with --encap wireguard",
                encap.name()
            ));
        }
        for (name, path) in [("ipip", &send.ipip), ("vxlan", &send.vxlan)] {
            // A node without a tunnel, or one that sends only encrypted, refuses these by
            // design; only a socket that failed to open is news.
            let by_design = matches!(encap, Encap::None | Encap::Wireguard);
            if let (Err(why), false) = (path, by_design) {
                tracing::warn!(
                    encap = name,
                    "peers that receive {name} are unreachable: {why}"
                );
            }
        }
        let (udp_gso, udp_gro, source_ports) = match sock.vxlan_socket() {
            Some(s) if encap == Encap::Vxlan => (s.gso(), s.gro(), s.source_ports().to_vec()),
            Some(s) if encap == Encap::Wireguard => (s.gso(), s.gro(), Vec::new()),
            _ => (false, false, Vec::new()),
        };
        let receive_sockets = sock.receiver_count();
        write_subnet_env(&cfg.state_dir, cluster_cidr, pod_cidr, mtu, cfg.api)?;
        let info = NodeInfo {
            node: cfg.node_name.clone(),
            underlay_ip: cfg.underlay_ip,
            underlay_dev: underlay.name.clone(),
            vtep_mac,
            pod_cidr,
            cluster_cidr,
            encap: encap.name(),
            vni: (encap == Encap::Vxlan).then_some(cfg.vni),
            wireguard_public_key: wireguard.as_ref().map(|w| w.public().to_string()),
            source_ports,
            mtu,
            tun: cfg.tun_name.clone(),
            tun_queues: 1 + tun_queues.len(),
            receive_sockets,
            workers,
            offloads: OffloadInfo {
                tun_vnet_hdr: offloads.vnet_hdr,
                tun_tso: offloads.tso4,
                tun_csum: offloads.csum,
                udp_gso,
                udp_gro,
            },
            membership: match cfg.membership {
                Membership::Static { .. } => "static",
                Membership::Control { .. } => "control",
            },
            control: match &cfg.membership {
                Membership::Control { url, .. } => Some(url.clone()),
                Membership::Static { .. } => None,
            },
            pid: std::process::id(),
            lock: lock.name(),
            routing: routing.mode,
            underlay_net: routing.underlay_net,
            egress: if cfg.masquerade {
                format!(
                    "masquerade {pod_cidr} to outside {} (nftables table ip {})",
                    cluster_cidr,
                    egress::TABLE
                )
            } else {
                "off (--no-masquerade): pods reach only the cluster".to_string()
            },
        };
        let pods = Arc::new(LocalPods::load(&cfg.state_dir, &cfg.node_name));
        let enforcer = Arc::new(policy::Enforcer::new(Arc::clone(&pods), &cfg.state_dir));
        // What an earlier agent left goes; the saved records are enforced before the data
        // path forwards anything, and before "up".
        enforcer.remove();
        enforcer.apply()?;
        // The admin API's port is bound before "up" is logged: a client that connects after
        // that line waits in the backlog until `serve` accepts, instead of being refused.
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(cfg.api))
            .map_err(|source| AgentError::Api {
                addr: cfg.api,
                source,
            })?;
        tracing::info!(
            node = %info.node, pod_cidr = %pod_cidr, encap = info.encap, mtu,
            tun = %info.tun, underlay = %info.underlay_dev,
            tun_tso = offloads.tso4, tun_csum = offloads.csum, udp_gso, udp_gro,
            peers = table.len(), source_ports = info.source_ports.len(),
            tun_queues = info.tun_queues, receive_sockets, workers,
            "podnet-agent up"
        );
        let forwarder = Forwarder::new(
            NodeConfig {
                node: cfg.node_name.clone(),
                underlay_ip: cfg.underlay_ip,
                vtep_mac,
                pod_cidr,
                cluster_cidr,
                encap,
                vni: Vni::new(cfg.vni).unwrap_or_default(),
                mtu,
                send,
                icmp_source: tun_addr,
            },
            Arc::new(Counters::new()),
        );
        let forwarders = std::iter::successors(Some(forwarder), |f| Some(f.for_worker()))
            .take(workers)
            .collect();
        if let Some(wg) = &wireguard {
            wg.sync(&table);
        }
        let shared = Arc::new(Shared {
            wireguard,
            forwarders,
            table: ArcSwap::from_pointee(table),
            tun,
            tun_queues,
            underlay: sock,
            stop: Stop::new().map_err(AgentError::DataPath)?,
            io_errors: IoErrors::default(),
            busy_poll: cfg.busy_poll,
            epoch: Instant::now(),
        });
        let agent = Arc::new(Agent {
            info,
            shared: Arc::clone(&shared),
            started: Instant::now(),
            membership: MembershipStatus::default(),
            state_dir: cfg.state_dir.clone(),
            repairs: Arc::clone(&repairs),
            routing,
            direct,
            control: joined.session.as_ref().map(|s| s.client.clone()),
            pods: Arc::clone(&pods),
            policy: Arc::clone(&enforcer),
        });
        warn_unreachable_peers(&agent, None, &shared.table.load());
        let mut threads = spawn_data_path(&shared)?;
        if shared.wireguard.is_some() {
            threads.push(spawn_wireguard_timers(&shared)?);
        }
        let watcher = spawn_host_watch(host.take(), &shared, &repairs)?;
        let served = runtime.block_on(serve(listener, Arc::clone(&agent), joined.session));
        shared.stop.stop();
        for (i, thread) in threads.into_iter().enumerate() {
            match thread.join() {
                Ok(Err(e)) => tracing::error!(worker = i, error = %e, "data path worker failed"),
                Err(_) => tracing::error!(worker = i, "data path worker panicked"),
                Ok(Ok(())) => {}
            }
        }
        // The watcher tears the host down as it ends, also when it panics (unwinding).
        if watcher.join().is_err() {
            tracing::error!("host watch thread panicked");
        }
        served
    })();
    // Tear down before the lock goes (it was taken first, so it is dropped last): a next agent
    // must not start while this one still removes its route.
    drop(host);
    drop(lock);
    result
}

/// Starts the thread that keeps the host state as desired ([`host::watch`]) until the agent
/// stops; the host is torn down when the thread ends and drops it.
fn spawn_host_watch(
    host: Option<Host>,
    shared: &Arc<Shared>,
    repairs: &Arc<Repairs>,
) -> Result<std::thread::JoinHandle<()>, AgentError> {
    let (s, r) = (Arc::clone(shared), Arc::clone(repairs));
    std::thread::Builder::new()
        .name("podnet-host".into())
        .spawn(move || {
            let queues: Vec<&Tun> = (0..s.queue_count()).map(|i| s.queue(i)).collect();
            if let Some(h) = host {
                host::watch(h, &queues, &r, &s.stop);
            }
        })
        .map_err(AgentError::DataPath)
}

/// Starts the data-path workers, one thread each. A worker serves both directions of its
/// flows (datapath::run): on a 2-core host that carries the same bytes with fewer context
/// switches than a tx and an rx thread (bench/RESULTS.md).
fn spawn_data_path(
    shared: &Arc<Shared>,
) -> Result<Vec<std::thread::JoinHandle<io::Result<()>>>, AgentError> {
    let mut threads = Vec::new();
    for i in 0..shared.workers() {
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("podnet-dp{i}"))
            .spawn(move || {
                let r = datapath::run(&s, i);
                if let Err(e) = &r {
                    tracing::error!(worker = i, error = %e, "data path stopped");
                    // Stop the agent rather than keep a node up that forwards only part of
                    // its flows.
                    s.stop.stop();
                }
                r
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // The ones already running stop with the agent.
                shared.stop.stop();
                return Err(AgentError::DataPath(e));
            }
        }
    }
    Ok(threads)
}

/// Starts the thread that runs the WireGuard timers ([`Wireguard::tick`]: handshake retries,
/// keepalives, rekeys) every [`wireguard::TICK`] until the agent stops.
fn spawn_wireguard_timers(
    shared: &Arc<Shared>,
) -> Result<std::thread::JoinHandle<io::Result<()>>, AgentError> {
    let s = Arc::clone(shared);
    std::thread::Builder::new()
        .name("podnet-wg".into())
        .spawn(move || {
            let Some(wg) = &s.wireguard else {
                return Ok(());
            };
            let mut out = vec![0u8; 2048];
            while !s.stop.is_stopped() {
                wg.tick(&mut out, |dst, bytes| {
                    datapath::send_control(&s, dst, bytes)
                });
                std::thread::sleep(wireguard::TICK);
            }
            Ok(())
        })
        .map_err(AgentError::DataPath)
}

/// Runs the admin API and the membership task until a signal (or the data path) stops us.
async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    session: Option<membership::Session>,
) -> Result<(), AgentError> {
    let app = crate::agent::admin::router(Arc::clone(&agent));
    let admin = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    let publisher = agent
        .control
        .clone()
        .map(|client| tokio::spawn(pods::publish(Arc::clone(&agent.pods), client)));
    let policy = agent
        .control
        .clone()
        .map(|client| tokio::spawn(policy::follow(Arc::clone(&agent.policy), client)));
    policy::sample_denials(Arc::clone(&agent.policy));
    let policy_watch = tokio::spawn(policy::watch(
        Arc::clone(&agent.policy),
        Arc::clone(&agent.repairs),
    ));
    let member = session.map(|s| tokio::spawn(membership::run(s, Arc::clone(&agent))));
    let stopped = wait_for_stop(&agent.shared.stop).await;
    admin.abort();
    for task in [member, publisher, policy].into_iter().flatten() {
        task.abort();
    }
    policy_watch.abort();
    agent.policy.remove();
    membership::leave(&agent).await;
    tracing::info!(reason = stopped, "podnet-agent stopping");
    Ok(())
}

async fn wait_for_stop(stop: &Stop) -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return "no signal handlers";
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = tick.tick() => if stop.is_stopped() { return "data path stopped" },
        }
    }
}
