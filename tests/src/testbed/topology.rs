//! The testbed's address plan and the kinds of hosts and peers it is made of.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use podnet_proto::api::Encap;

/// Port of podnet-control on host 1's underlay address.
pub const CONTROL_PORT: u16 = 7800;

/// Members of the etcd cluster of an HA testbed.
pub const ETCD_MEMBERS: u8 = 3;

/// The agent's admin API inside each host namespace (DESIGN.md default).
pub const ADMIN_API: &str = "127.0.0.1:7801";

/// A pcap filter for what a podnet host of `encap` puts on the underlay.
pub fn underlay_filter(encap: Encap) -> &'static str {
    match encap {
        Encap::Ipip => "ip proto 4",
        Encap::Vxlan => "udp port 4789",
        Encap::Wireguard => "udp port 51820",
        Encap::None => "ip and not udp and not ip proto 4",
    }
}

/// What carries a host's pod traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMode {
    /// `podnet-agent run --encap E`.
    Podnet(Encap),
    /// `podnet-agent run --encap none`: direct routes to the peers on its underlay subnet.
    PodnetDirect,
    /// The kernel's vxlan device with static neighbour/FDB entries (DESIGN.md VTEP MAC rule).
    KernelVxlan,
    /// Plain routes over the underlay, no encapsulation.
    Plain,
    /// Namespaces, addresses and pods only; the test starts whatever it wants.
    Bare,
}

/// Where podnet agents get their peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// `--pod-cidr 10.244.n.0/24 --static-peer 10.244.k.0/24=198.18.0.k` for every other host.
    Static,
    /// `--control http://198.18.0.1:7800`, podnet-control running in host 1.
    Control,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub host: u8,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub index: u8,
    pub ns: String,
    pub underlay_ip: Ipv4Addr,
    pub mode: HostMode,
    pub pod_cidr: Option<Ipv4Net>,
    pub pods: Vec<Pod>,
}

pub fn underlay_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, n)
}

pub fn static_cidr(n: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).expect("valid prefix")
}

/// DESIGN.md VTEP MAC: 02:00 followed by the 4 bytes of the underlay address.
pub fn vtep_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// `PODNET_TEST_WORKERS=N`: every agent the harness starts runs `--workers N` (scripts/test
/// runs the end-to-end suites once with the default and once with 1).
pub fn workers_override() -> Option<u8> {
    let v = std::env::var("PODNET_TEST_WORKERS").ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("PODNET_TEST_WORKERS={v}: give a number from 1 to 8")),
    )
}

/// The data-path workers an agent with `queues` TUN queues runs in this test run: the
/// override, or the agent's default (the CPUs it may use, at most the queues).
pub fn expected_workers(queues: usize) -> usize {
    match workers_override() {
        Some(w) => usize::from(w).min(queues),
        None => std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(queues),
    }
}
