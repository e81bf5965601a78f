//! The `podnet-agent` command line (DESIGN.md "CLI") and the validation of `run` flags.
//!
//! Parsing is clap's job; this module turns the parsed flags into a checked [`RunConfig`] and
//! rejects combinations that would build a broken node (overlapping peers, a pod CIDR outside
//! the cluster CIDR) with an error that names the flag to fix.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use podnet_proto::api;
use podnet_proto::ethernet::MacAddr;

/// Default local admin API address (inside the agent's own network namespace).
pub const DEFAULT_API: &str = "127.0.0.1:7801";
/// Where `run` keeps subnet.env and its last node table unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/podnet";
/// The cluster CIDR of static mode when `--cluster-cidr` is not given (podnet-control's default).
pub const DEFAULT_CLUSTER_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16);

#[derive(Debug, Parser)]
#[command(
    name = "podnet-agent",
    version,
    about = "podnet node agent: pod traffic over IP-in-IP, VXLAN or WireGuard, or direct routes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: create tunl0, join the overlay and forward pod traffic.
    Run(Box<RunArgs>),
    /// Show node, pod CIDR, encapsulation, MTU, peers and counters of a running agent.
    Status(ApiArgs),
    /// Show the longest-prefix-match table of a running agent.
    Routes(ApiArgs),
    /// Explain where a packet to IP goes from this node: the matching prefix, peer, underlay
    /// address, VTEP MAC, encapsulation, MTU and lease, or the reason it would be dropped.
    Why(WhyArgs),
    /// Show drops sampled by a running agent (reason, addresses, peer); rate-limited per reason.
    Drops(DropsArgs),
    /// Print this node's WireGuard public key (for other nodes' --static-peer CIDR=IP@KEY),
    /// making the key pair in the state dir if it has none yet, as `run` would.
    WireguardKey(KeyArgs),
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The agent's state dir (where `wireguard.key` is kept, 0600).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct WhyArgs {
    /// `DST` (how a packet to it is forwarded), or `SRC DST [PORT/PROTO]` (and what network
    /// policy says of that connection; PROTO is TCP, UDP or SCTP, TCP when omitted).
    #[arg(required = true, num_args = 1..=3, value_name = "[SRC] DST [PORT/PROTO]")]
    pub args: Vec<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

impl WhyArgs {
    /// The admin API query these arguments ask.
    pub fn query(&self) -> Result<String, String> {
        let ip = |s: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| format!("{s:?} is not an IPv4 address"))
        };
        match self.args.as_slice() {
            [dst] => Ok(format!("/why?ip={}", ip(dst)?)),
            [src, dst] => Ok(format!("/why?ip={}&src={}", ip(dst)?, ip(src)?)),
            [src, dst, port] => {
                let bad = || format!("{port:?}: give PORT/PROTO, e.g. 80/TCP (TCP, UDP or SCTP)");
                let (number, proto) = port.split_once('/').unwrap_or((port, "TCP"));
                let number: u16 = number.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
                let proto = proto.to_ascii_uppercase();
                if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
                    return Err(bad());
                }
                Ok(format!(
                    "/why?ip={}&src={}&port={number}&protocol={proto}",
                    ip(dst)?,
                    ip(src)?
                ))
            }
            _ => Err("give DST, or SRC DST [PORT/PROTO]".into()),
        }
    }
}

#[derive(Debug, Args)]
pub struct DropsArgs {
    /// Keep polling and print each new drop as it is sampled (Ctrl-C to stop).
    #[arg(long)]
    pub watch: bool,
    /// With --watch: stop after this long (e.g. 10s); runs until interrupted when absent.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Address of the agent's admin API.
    #[arg(long, default_value = DEFAULT_API)]
    pub api: SocketAddr,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `--encap`: the control API's [`api::Encap`] by its wire name (the one place they are
/// written), each listed in `--help` with what it means.
fn encap_parser() -> impl clap::builder::TypedValueParser<Value = api::Encap> {
    let values = api::Encap::ALL.map(|e| PossibleValue::new(e.name()).help(encap_help(e)));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<api::Encap>())
}

fn encap_help(encap: api::Encap) -> &'static str {
    match encap {
        api::Encap::Ipip => "IPv4-in-IPv4 (IP protocol 4), as Linux ipip devices send it",
        api::Encap::Vxlan => "VXLAN on UDP 4789, as Linux vxlan devices send it",
        api::Encap::None => "No tunnel: direct kernel routes to peers on the underlay subnet",
        api::Encap::Wireguard => {
            "WireGuard transport messages on UDP 51820 (encrypted; standard WireGuard peers \
             interoperate). The key pair lives in the state dir"
        }
    }
}

/// `--mtu N|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtuArg {
    Auto,
    Fixed(u16),
}

impl FromStr for MtuArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(MtuArg::Auto);
        }
        match s.parse::<u16>() {
            Ok(n) if (576..=65_000).contains(&n) => Ok(MtuArg::Fixed(n)),
            _ => Err(format!(
                "'{s}' is not an MTU: give a number from 576 to 65000, or 'auto'"
            )),
        }
    }
}

/// `--static-peer CIDR=IP[@MAC|@KEY][,ENCAP]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticPeer {
    pub pod_cidr: Ipv4Net,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    /// A WireGuard peer's public key (`@KEY`, base64 as `wg pubkey` prints it).
    pub wireguard_key: Option<api::WgKey>,
    /// What the peer receives; `None`: this node's own `--encap`.
    pub encap: Option<api::Encap>,
}

impl FromStr for StaticPeer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "expected CIDR=IP[@MAC|@KEY][,ENCAP], e.g. 10.244.2.0/24=198.18.0.2, \
                     10.244.2.0/24=198.18.0.2,ipip or, for a WireGuard peer, \
                     10.244.2.0/24=198.18.0.2@<its public key>";
        let (s, encap) = match s.split_once(',') {
            Some((peer, encap)) => (peer, Some(encap.parse::<api::Encap>()?)),
            None => (s, None),
        };
        let (cidr, rest) = s.split_once('=').ok_or_else(|| format!("'{s}': {usage}"))?;
        let (ip, mac) = match rest.split_once('@') {
            Some((ip, mac)) => (ip, Some(mac)),
            None => (rest, None),
        };
        let pod_cidr: Ipv4Net = cidr
            .parse()
            .map_err(|_| format!("'{cidr}' is not an IPv4 CIDR ({usage})"))?;
        if pod_cidr.trunc() != pod_cidr {
            return Err(format!(
                "'{cidr}' has host bits set; did you mean {}?",
                pod_cidr.trunc()
            ));
        }
        let underlay_ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("'{ip}' is not an IPv4 address ({usage})"))?;
        // After '@': a MAC has colons, a WireGuard key (base64) never does.
        let (vtep_mac, wireguard_key) = match mac {
            Some(m) if m.contains(':') => (
                m.parse()
                    .map_err(|e| format!("'{m}' is not a MAC address: {e}"))?,
                None,
            ),
            Some(k) => (
                MacAddr::vtep_for(underlay_ip),
                Some(k.parse::<api::WgKey>().map_err(|e| {
                    format!("after '@': neither a MAC address nor a WireGuard key: {e}")
                })?),
            ),
            None => (MacAddr::vtep_for(underlay_ip), None),
        };
        Ok(StaticPeer {
            pod_cidr,
            underlay_ip,
            vtep_mac,
            wireguard_key,
            encap,
        })
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 500ms, 20s, 24h: {e}"))
}

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("membership").required(true).args(["control", "pod_cidr"])
))]
pub struct RunArgs {
    /// This node's name (a DNS label: a-z, 0-9 and '-').
    #[arg(long)]
    pub node_name: String,
    /// This node's address on the underlay network.
    #[arg(long)]
    pub underlay_ip: Ipv4Addr,
    /// Underlay device (default: the device that holds --underlay-ip).
    #[arg(long)]
    pub underlay_dev: Option<String>,
    /// What this node receives (peers are each sent what they receive); `none`: no tunnel,
    /// direct routes to the peers on the underlay subnet.
    #[arg(long, value_parser = encap_parser())]
    pub encap: api::Encap,
    /// With --encap vxlan|ipip: direct routes to peers on the underlay subnet, the tunnel to
    /// the others.
    #[arg(long)]
    pub cross_subnet: bool,
    /// VXLAN network identifier (24 bits).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..(1 << 24)))]
    pub vni: u32,
    /// Name of the TUN device to create.
    #[arg(long, default_value = "tunl0")]
    pub tun_name: String,
    /// Overlay MTU, or 'auto' = underlay MTU minus the encapsulation overhead.
    #[arg(long, default_value = "auto")]
    pub mtu: MtuArg,
    /// URL of podnet-control, or the URLs of several replicas, comma-separated (calls fail
    /// over from one to the next); the node's pod CIDR and peers come from it.
    #[arg(long, conflicts_with_all = ["pod_cidr", "static_peer"])]
    pub control: Option<String>,
    /// File holding the bearer token for podnet-control.
    #[arg(long, requires = "control")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: podnet_control_client::tls::ClientArgs,
    /// Static mode: this node's pod CIDR.
    #[arg(long)]
    pub pod_cidr: Option<Ipv4Net>,
    /// The whole cluster's pod network; routed into the TUN device. With --control it comes
    /// from podnet-control (given here, it must match); static mode defaults to 10.244.0.0/16.
    #[arg(long)]
    pub cluster_cidr: Option<Ipv4Net>,
    /// Static mode: a peer as `CIDR=IP[@MAC][,ENCAP]`; repeat for each peer.
    #[arg(
        long = "static-peer",
        requires = "pod_cidr",
        help = "Static mode: a peer as CIDR=IP[@MAC][,ENCAP] (ENCAP: what the peer receives, default --encap); repeat for each peer"
    )]
    pub static_peer: Vec<StaticPeer>,
    /// Where subnet.env and the last known node table are written.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Local admin API address (/status, /routes, /metrics).
    #[arg(long, default_value = DEFAULT_API)]
    pub api: SocketAddr,
    /// Disable TUN/UDP offloads (TSO, GSO, GRO) and use the plain per-packet path.
    #[arg(long)]
    pub no_offload: bool,
    /// Source-NAT pod traffic to destinations outside --cluster-cidr (the nftables table
    /// `ip podnet`), so pods reach the underlay and beyond. The default.
    #[arg(long, overrides_with = "no_masquerade")]
    pub masquerade: bool,
    /// No pod egress: pods reach only the cluster, and leave no table behind.
    #[arg(long, overrides_with = "masquerade")]
    pub no_masquerade: bool,
    /// How long the data path keeps polling after its last packet before it sleeps: cuts the
    /// wake-ups that dominate round-trip time, at the price of CPU while traffic trickles
    /// (an idle agent sleeps). 0 turns polling off.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub busy_poll: Duration,
    /// TUN queues (and, for VXLAN, receive sockets), served in turn: flows spread over them,
    /// so a ping or a DNS query does not wait behind a bulk transfer's backlog. 1 to 8.
    #[arg(long, default_value_t = crate::datapath::DEFAULT_TUN_QUEUES,
          value_parser = clap::value_parser!(u8).range(1..=8))]
    pub tun_queues: u8,
    /// Data-path threads, each with its own TUN queues and receive sockets; a flow stays on
    /// one. Default: the CPUs this process may run on, at most --tun-queues. 1 to 8.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub workers: Option<u8>,
}

/// Where the node's pod CIDR and peers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    Static {
        pod_cidr: Ipv4Net,
        peers: Vec<StaticPeer>,
    },
    Control {
        url: String,
        token_file: Option<PathBuf>,
        /// The CA and certificate for an https:// URL.
        tls: Option<podnet_control_client::tls::ClientFiles>,
    },
}

/// Why `run` flags cannot work together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0}")]
    Tls(String),
    #[error("--node-name '{0}' is not a valid node name: use 1-63 characters a-z, 0-9 and '-', not starting or ending with '-'")]
    NodeName(String),
    #[error("--pod-cidr {pod} is outside --cluster-cidr {cluster}: pick a pod CIDR inside the cluster CIDR")]
    PodCidrOutsideCluster { pod: Ipv4Net, cluster: Ipv4Net },
    #[error("--static-peer {peer} is outside --cluster-cidr {cluster}")]
    PeerOutsideCluster { peer: Ipv4Net, cluster: Ipv4Net },
    #[error("--static-peer {a} overlaps {b}: every node needs its own pod CIDR")]
    Overlap { a: Ipv4Net, b: Ipv4Net },
    #[error("--static-peer {cidr}={ip} uses this node's own underlay IP")]
    PeerIsSelf { cidr: Ipv4Net, ip: Ipv4Addr },
    #[error("--static-peer {a} and {b} both use underlay IP {ip}")]
    DuplicateUnderlay {
        a: Ipv4Net,
        b: Ipv4Net,
        ip: Ipv4Addr,
    },
    #[error(
        "--tun-name '{0}' is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
    )]
    TunName(String),
    #[error("--pod-cidr {0} has host bits set; did you mean {1}?")]
    PodCidrHostBits(Ipv4Net, Ipv4Net),
    #[error("--pod-cidr {0} is too small: a node needs at least a /30")]
    PodCidrTooSmall(Ipv4Net),
    #[error("--cross-subnet goes with --encap vxlan or ipip (the tunnel for peers on other subnets); --encap none routes only to peers on the underlay subnet")]
    CrossSubnetWithoutTunnel,
    #[error("--cross-subnet sends same-subnet pod traffic in clear, and --encap wireguard encrypts all of it: drop one of the two")]
    CrossSubnetInClear,
    #[error("--static-peer {cidr}={ip} receives wireguard and needs its public key: --static-peer {cidr}={ip}@KEY (base64, as `wg pubkey` prints it)")]
    WireguardPeerWithoutKey { cidr: Ipv4Net, ip: Ipv4Addr },
    #[error("--workers {workers} needs as many TUN queues, and --tun-queues is {queues}: each worker reads queues of its own; raise --tun-queues or lower --workers")]
    WorkersOverQueues { workers: u8, queues: u8 },
}

/// `run` flags after validation.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub node_name: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_dev: Option<String>,
    pub encap: api::Encap,
    pub cross_subnet: bool,
    pub vni: u32,
    pub tun_name: String,
    pub mtu: MtuArg,
    /// `--cluster-cidr` as given: in control mode the service's, which this must match.
    pub cluster_cidr: Option<Ipv4Net>,
    pub membership: Membership,
    pub state_dir: PathBuf,
    pub api: SocketAddr,
    pub offload: bool,
    /// Pod egress through the nftables table `ip podnet`.
    pub masquerade: bool,
    pub busy_poll: Duration,
    pub tun_queues: u8,
    /// `--workers`; `None`: one per usable CPU (see [`default_workers`]).
    pub workers: Option<u8>,
}

/// The data-path workers when `--workers` is not given: the CPUs this process may run on (its
/// affinity mask and CPU quota, as the standard library reads them), at most `queues`.
pub fn default_workers(queues: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    cpus.clamp(1, queues.max(1))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// A DNS-1123 label, the same rule the control service applies.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl RunArgs {
    /// Checks the flags against each other.
    pub fn validate(self) -> Result<RunConfig, ConfigError> {
        if !valid_node_name(&self.node_name) {
            return Err(ConfigError::NodeName(self.node_name));
        }
        if !valid_ifname(&self.tun_name) {
            return Err(ConfigError::TunName(self.tun_name));
        }
        if self.cross_subnet && self.encap == api::Encap::None {
            return Err(ConfigError::CrossSubnetWithoutTunnel);
        }
        if self.cross_subnet && self.encap == api::Encap::Wireguard {
            return Err(ConfigError::CrossSubnetInClear);
        }
        if let Some(workers) = self.workers.filter(|w| *w > self.tun_queues) {
            return Err(ConfigError::WorkersOverQueues {
                workers,
                queues: self.tun_queues,
            });
        }
        let tls = self
            .tls
            .files()
            .map_err(|e| ConfigError::Tls(e.to_string()))?;
        if tls.is_some() && self.control.is_none() {
            return Err(ConfigError::Tls(
                "--tls-ca, --tls-cert and --tls-key are for --control https://...".into(),
            ));
        }
        let membership = match (self.control, self.pod_cidr) {
            (Some(url), _) => Membership::Control {
                url,
                token_file: self.token_file,
                tls,
            },
            (None, Some(pod)) => {
                let cluster = self.cluster_cidr.unwrap_or(DEFAULT_CLUSTER_CIDR);
                validate_static(pod, &self.static_peer, cluster, self.underlay_ip)?;
                let own = self.encap;
                if let Some(p) = self.static_peer.iter().find(|p| {
                    p.encap.unwrap_or(own) == api::Encap::Wireguard && p.wireguard_key.is_none()
                }) {
                    return Err(ConfigError::WireguardPeerWithoutKey {
                        cidr: p.pod_cidr,
                        ip: p.underlay_ip,
                    });
                }
                Membership::Static {
                    pod_cidr: pod,
                    peers: self.static_peer,
                }
            }
            // clap enforces one of the two; keep the type honest anyway.
            (None, None) => unreachable!("clap requires --control or --pod-cidr"),
        };
        Ok(RunConfig {
            node_name: self.node_name,
            underlay_ip: self.underlay_ip,
            underlay_dev: self.underlay_dev,
            encap: self.encap,
            cross_subnet: self.cross_subnet,
            vni: self.vni,
            tun_name: self.tun_name,
            mtu: self.mtu,
            cluster_cidr: self.cluster_cidr,
            membership,
            state_dir: self.state_dir,
            api: self.api,
            offload: !self.no_offload,
            masquerade: !self.no_masquerade,
            busy_poll: self.busy_poll,
            tun_queues: self.tun_queues,
            workers: self.workers,
        })
    }
}

fn validate_static(
    pod: Ipv4Net,
    peers: &[StaticPeer],
    cluster: Ipv4Net,
    own_ip: Ipv4Addr,
) -> Result<(), ConfigError> {
    if pod.trunc() != pod {
        return Err(ConfigError::PodCidrHostBits(pod, pod.trunc()));
    }
    if pod.prefix_len() > 30 {
        return Err(ConfigError::PodCidrTooSmall(pod));
    }
    if !cluster.contains(&pod) {
        return Err(ConfigError::PodCidrOutsideCluster { pod, cluster });
    }
    for (i, p) in peers.iter().enumerate() {
        if !cluster.contains(&p.pod_cidr) {
            return Err(ConfigError::PeerOutsideCluster {
                peer: p.pod_cidr,
                cluster,
            });
        }
        if p.underlay_ip == own_ip {
            return Err(ConfigError::PeerIsSelf {
                cidr: p.pod_cidr,
                ip: p.underlay_ip,
            });
        }
        if overlaps(&p.pod_cidr, &pod) {
            return Err(ConfigError::Overlap {
                a: p.pod_cidr,
                b: pod,
            });
        }
        for q in &peers[..i] {
            if overlaps(&p.pod_cidr, &q.pod_cidr) {
                return Err(ConfigError::Overlap {
                    a: q.pod_cidr,
                    b: p.pod_cidr,
                });
            }
            if p.underlay_ip == q.underlay_ip {
                return Err(ConfigError::DuplicateUnderlay {
                    a: q.pod_cidr,
                    b: p.pod_cidr,
                    ip: p.underlay_ip,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn why_takes_a_destination_or_a_connection() {
        let query = |args: &[&str]| {
            let mut argv = vec!["podnet-agent", "why"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv)
                .map_err(|e| e.to_string())?
                .command
            {
                Command::Why(w) => w.query(),
                _ => unreachable!(),
            }
        };
        assert_eq!(query(&["10.244.2.3"]).unwrap(), "/why?ip=10.244.2.3");
        assert_eq!(
            query(&["10.244.1.2", "10.244.2.3"]).unwrap(),
            "/why?ip=10.244.2.3&src=10.244.1.2"
        );
        assert_eq!(
            query(&["10.244.1.2", "10.244.2.3", "53/udp"]).unwrap(),
            "/why?ip=10.244.2.3&src=10.244.1.2&port=53&protocol=UDP"
        );
        assert_eq!(
            query(&["10.244.1.2", "10.244.2.3", "80"]).unwrap(),
            "/why?ip=10.244.2.3&src=10.244.1.2&port=80&protocol=TCP"
        );
        assert!(query(&["10.244.1.2", "10.244.2.3", "80/icmp"])
            .unwrap_err()
            .contains("PORT/PROTO"));
        assert!(query(&["10.244.1.2", "x"])
            .unwrap_err()
            .contains("not an IPv4 address"));
        assert!(query(&["a", "b", "c", "d"]).is_err());
    }

    fn run(args: &[&str]) -> Result<RunConfig, String> {
        let mut argv = vec!["podnet-agent", "run"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(a) => a.validate().map_err(|e| e.to_string()),
            _ => unreachable!(),
        }
    }

    const BASE: [&str; 6] = [
        "--node-name",
        "h1",
        "--underlay-ip",
        "198.18.0.1",
        "--encap",
        "vxlan",
    ];

    fn with(extra: &[&'static str]) -> Result<RunConfig, String> {
        let mut v: Vec<&str> = BASE.to_vec();
        v.extend_from_slice(extra);
        run(&v)
    }

    #[test]
    fn static_peer_parses_with_and_without_mac() {
        let p: StaticPeer = "10.244.2.0/24=198.18.0.2".parse().unwrap();
        assert_eq!(p.underlay_ip, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(p.vtep_mac.to_string(), "02:00:c6:12:00:02");
        let p: StaticPeer = "10.244.3.0/24=198.18.0.3@02:aa:bb:cc:dd:ee"
            .parse()
            .unwrap();
        assert_eq!(p.vtep_mac.to_string(), "02:aa:bb:cc:dd:ee");
        assert!("10.244.2.0/24".parse::<StaticPeer>().is_err());
        assert!("10.244.2.1/24=198.18.0.2"
            .parse::<StaticPeer>()
            .unwrap_err()
            .contains("host bits"));
        assert!("10.244.2.0/24=nope".parse::<StaticPeer>().is_err());
        assert!("10.244.2.0/24=198.18.0.2@zz".parse::<StaticPeer>().is_err());
    }

    #[test]
    fn static_peer_takes_the_encapsulation_it_receives() {
        let p: StaticPeer = "10.244.2.0/24=198.18.0.2".parse().unwrap();
        assert_eq!(p.encap, None, "default: this node's own --encap");
        let p: StaticPeer = "10.244.2.0/24=198.18.0.2,ipip".parse().unwrap();
        assert_eq!(p.encap, Some(api::Encap::Ipip));
        let p: StaticPeer = "10.244.3.0/24=198.18.0.3@02:aa:bb:cc:dd:ee,vxlan"
            .parse()
            .unwrap();
        assert_eq!(
            (p.vtep_mac.to_string().as_str(), p.encap),
            ("02:aa:bb:cc:dd:ee", Some(api::Encap::Vxlan))
        );
        let e = "10.244.2.0/24=198.18.0.2,gre"
            .parse::<StaticPeer>()
            .unwrap_err();
        assert!(
            e.contains("\"gre\"") && e.contains("expected ipip, vxlan"),
            "{e}"
        );
    }

    #[test]
    fn static_mode_accepts_a_consistent_node() {
        let c = with(&[
            "--pod-cidr",
            "10.244.1.0/24",
            "--static-peer",
            "10.244.2.0/24=198.18.0.2",
            "--static-peer",
            "10.244.3.0/24=198.18.0.3",
        ])
        .unwrap();
        assert!(c.offload);
        assert_eq!(c.tun_name, "tunl0");
        assert_eq!(c.mtu, MtuArg::Auto);
        assert_eq!(c.busy_poll, crate::datapath::DEFAULT_BUSY_POLL);
        assert_eq!(c.tun_queues, crate::datapath::DEFAULT_TUN_QUEUES);
        match c.membership {
            Membership::Static { peers, .. } => assert_eq!(peers.len(), 2),
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn rejects_overlapping_and_out_of_cluster_peers() {
        let e = with(&[
            "--pod-cidr",
            "10.244.1.0/24",
            "--static-peer",
            "10.244.2.0/24=198.18.0.2",
            "--static-peer",
            "10.244.2.128/25=198.18.0.3",
        ])
        .unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let e = with(&[
            "--pod-cidr",
            "10.244.1.0/24",
            "--static-peer",
            "10.244.1.0/25=198.18.0.3",
        ])
        .unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let e = with(&["--pod-cidr", "10.99.1.0/24"]).unwrap_err();
        assert!(e.contains("outside --cluster-cidr"), "{e}");
        let e = with(&[
            "--pod-cidr",
            "10.244.1.0/24",
            "--static-peer",
            "10.99.0.0/24=198.18.0.2",
        ])
        .unwrap_err();
        assert!(e.contains("outside --cluster-cidr"), "{e}");
        let e = with(&[
            "--pod-cidr",
            "10.244.1.0/24",
            "--static-peer",
            "10.244.2.0/24=198.18.0.1",
        ])
        .unwrap_err();
        assert!(e.contains("own underlay IP"), "{e}");
    }

    #[test]
    fn rejects_malformed_flags() {
        assert!(with(&[]).unwrap_err().contains("--pod-cidr"));
        assert!(with(&["--pod-cidr", "10.244.1.0/24", "--control", "http://x"]).is_err());
        assert!(with(&["--pod-cidr", "10.244.1.0/24", "--vni", "16777216"]).is_err());
        assert!(with(&["--pod-cidr", "10.244.1.0/24", "--mtu", "12"])
            .unwrap_err()
            .contains("MTU"));
        assert!(with(&["--pod-cidr", "10.244.1.0/24", "--tun-name", "a/b"])
            .unwrap_err()
            .contains("--tun-name"));
        let e = run(&[
            "--node-name",
            "H_1",
            "--underlay-ip",
            "198.18.0.1",
            "--encap",
            "ipip",
            "--pod-cidr",
            "10.244.1.0/24",
        ])
        .unwrap_err();
        assert!(e.contains("node name"), "{e}");
        assert!(run(&[
            "--node-name",
            "h1",
            "--underlay-ip",
            "198.18.0.1",
            "--encap",
            "gre",
            "--pod-cidr",
            "10.244.1.0/24"
        ])
        .is_err());
    }

    #[test]
    fn tun_queues_are_one_to_eight() {
        let ok = |q: &'static str| with(&["--pod-cidr", "10.244.1.0/24", "--tun-queues", q]);
        assert_eq!(ok("1").unwrap().tun_queues, 1);
        assert_eq!(ok("8").unwrap().tun_queues, 8);
        for bad in ["0", "9", "four"] {
            let err = ok(bad).unwrap_err();
            assert!(err.contains("--tun-queues"), "{bad}: {err}");
        }
    }

    #[test]
    fn workers_are_one_to_eight_and_no_more_than_the_tun_queues() {
        let run = |args: &[&'static str]| {
            let mut a = vec!["--pod-cidr", "10.244.1.0/24"];
            a.extend_from_slice(args);
            with(&a)
        };
        assert_eq!(run(&[]).unwrap().workers, None);
        assert_eq!(run(&["--workers", "2"]).unwrap().workers, Some(2));
        for bad in ["0", "9", "many"] {
            let err = run(&["--workers", bad]).unwrap_err();
            assert!(err.contains("--workers"), "{bad}: {err}");
        }
        let err = run(&["--workers", "4", "--tun-queues", "2"]).unwrap_err();
        assert!(
            err.contains("--workers 4") && err.contains("raise --tun-queues"),
            "{err}"
        );
        // The default never exceeds the queues, and is at least one.
        assert_eq!(default_workers(1), 1);
        assert!((1..=8).contains(&default_workers(8)));
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(default_workers(8), cpus.min(8));
    }

    #[test]
    fn control_mode_needs_no_pod_cidr() {
        let c = with(&[
            "--control",
            "http://198.18.0.1:7800",
            "--no-offload",
            "--busy-poll",
            "0",
        ])
        .unwrap();
        assert!(!c.offload);
        assert_eq!(c.busy_poll, Duration::ZERO);
        assert!(matches!(c.membership, Membership::Control { .. }));
    }

    #[test]
    fn wireguard_static_peers_take_a_key_and_need_one() {
        const KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
        let wg = |peer: String| {
            run(&[
                "--node-name",
                "h1",
                "--underlay-ip",
                "198.18.0.1",
                "--encap",
                "wireguard",
                "--pod-cidr",
                "10.244.1.0/24",
                "--static-peer",
                &peer,
            ])
        };
        let c = wg(format!("10.244.2.0/24=198.18.0.2@{KEY}")).unwrap();
        assert_eq!(c.encap, api::Encap::Wireguard);
        let Membership::Static { peers, .. } = &c.membership else {
            panic!("static")
        };
        assert_eq!(peers[0].wireguard_key.unwrap().0[0], 1);
        assert_eq!(peers[0].vtep_mac.to_string(), "02:00:c6:12:00:02");
        let err = wg("10.244.2.0/24=198.18.0.2".into()).unwrap_err();
        assert!(
            err.contains("needs its public key") && err.contains("@KEY"),
            "{err}"
        );
        let err = wg("10.244.2.0/24=198.18.0.2@AAAA".into()).unwrap_err();
        assert!(
            err.contains("neither a MAC address nor a WireGuard key"),
            "{err}"
        );
        // A peer of another encapsulation needs no key.
        assert!(wg("10.244.2.0/24=198.18.0.2,vxlan".into()).is_ok());
        let err = run(&[
            "--node-name",
            "h1",
            "--underlay-ip",
            "198.18.0.1",
            "--encap",
            "wireguard",
            "--cross-subnet",
            "--control",
            "http://198.18.0.9:7800",
        ])
        .unwrap_err();
        assert!(err.contains("in clear"), "{err}");
    }
}
