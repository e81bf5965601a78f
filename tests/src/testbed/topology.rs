//! The testbed's address plan and the kinds of hosts and peers it is made of.
//!
//! The plan is `scripts/lib/topology.sh`'s, which `scripts/testbed` and `scripts/bench-control`
//! source: the harness runs it once for its values, and for etcd's command line.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use ipnet::Ipv4Net;

use podnet_proto::api::Encap;

/// `scripts/lib/topology.sh`.
fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/topology.sh")
}

/// Runs the topology script with `args`; its stdout.
fn run_script(args: &[&str]) -> String {
    let script = script();
    let mut argv = vec!["bash", script.to_str().expect("utf-8 path")];
    argv.extend_from_slice(args);
    let out = crate::cmd::run(None, &argv, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("scripts/lib/topology.sh {args:?}: {e}"));
    assert!(
        out.success(),
        "scripts/lib/topology.sh {args:?}: {}",
        out.combined()
    );
    out.stdout
}

/// The script's `TOPO_` value `name` (without the prefix).
fn value<T: FromStr>(name: &str) -> T {
    static VALUES: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    let values = VALUES.get_or_init(|| {
        crate::parse::env_file(&run_script(&["values"]))
            .into_iter()
            .collect()
    });
    let text = values
        .get(&format!("TOPO_{name}"))
        .unwrap_or_else(|| panic!("scripts/lib/topology.sh has no TOPO_{name}: {values:?}"));
    text.parse()
        .unwrap_or_else(|_| panic!("scripts/lib/topology.sh: TOPO_{name}={text} does not parse"))
}

/// `a.b` (TOPO_UNDERLAY or TOPO_PODS) followed by `.c.d`.
fn addr(prefix: &str, c: u8, d: u8) -> Ipv4Addr {
    let prefix: String = value(prefix);
    format!("{prefix}.{c}.{d}")
        .parse()
        .unwrap_or_else(|_| panic!("scripts/lib/topology.sh: {prefix}.{c}.{d} is no address"))
}

/// Port of podnet-control (on host 1's underlay address, or on each replica's).
pub fn control_port() -> u16 {
    value("CONTROL_PORT")
}

/// Members of the etcd cluster of an HA testbed.
pub fn etcd_members() -> u8 {
    value("ETCD_MEMBERS")
}

/// The agent's admin API inside each host namespace (DESIGN.md default).
pub fn admin_api() -> SocketAddr {
    value("ADMIN_API")
}

/// etcd member i's address.
pub fn etcd_ip(i: u8) -> Ipv4Addr {
    addr("UNDERLAY", 0, value::<u8>("ETCD_BASE") + i)
}

/// The etcd client URLs, comma-separated: `https://`, since a testbed's etcd serves TLS.
pub fn etcd_endpoints() -> String {
    run_script(&["etcd-endpoints", "https"]).trim().to_string()
}

/// etcd member i's command line, with its data in `data`, cluster token `token`, and TLS on
/// both ports with the certificates of the CA directory `pki`.
pub fn etcd_args(i: u8, data: &str, token: &str, pki: &str) -> Vec<String> {
    run_script(&["etcd-args", &i.to_string(), data, token, pki])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// podnet-control replica r's address.
pub fn replica_ip(r: u8) -> Ipv4Addr {
    addr("UNDERLAY", 0, value::<u8>("REPLICA_BASE") + r)
}

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

/// Host n's underlay address on underlay subnet `subnet` (0, or 1 on a two-subnet testbed).
pub fn underlay_ip_on(subnet: u8, n: u8) -> Ipv4Addr {
    addr("UNDERLAY", subnet, n)
}

/// Host n's underlay address on a one-subnet testbed.
pub fn underlay_ip(n: u8) -> Ipv4Addr {
    underlay_ip_on(0, n)
}

/// Host n's static pod CIDR.
pub fn static_cidr(n: u8) -> Ipv4Net {
    Ipv4Net::new(addr("PODS", n, 0), 24).expect("valid prefix")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_comes_from_the_scripts_topology() {
        assert_eq!(control_port(), 7800);
        assert_eq!(admin_api(), "127.0.0.1:7801".parse().unwrap());
        assert_eq!(underlay_ip_on(1, 4), Ipv4Addr::new(198, 18, 1, 4));
        assert_eq!(static_cidr(3), "10.244.3.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(etcd_ip(2), Ipv4Addr::new(198, 18, 0, 202));
        assert_eq!(replica_ip(1), Ipv4Addr::new(198, 18, 0, 211));
        assert_eq!(
            etcd_endpoints(),
            "https://198.18.0.201:2379,https://198.18.0.202:2379,https://198.18.0.203:2379"
        );
        let args = etcd_args(2, "/d", "tok", "/pki");
        assert_eq!(args[..5], ["etcd", "--name", "e2", "--data-dir", "/d"]);
        let cluster = args.iter().position(|a| a == "--initial-cluster").unwrap();
        assert_eq!(
            args[cluster + 1],
            "e1=https://198.18.0.201:2380,e2=https://198.18.0.202:2380,e3=https://198.18.0.203:2380"
        );
        // Client certificates on both ports, from the one CA.
        for flag in ["--client-cert-auth", "--peer-client-cert-auth"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing: {args:?}");
        }
        let ca = args.iter().position(|a| a == "--trusted-ca-file").unwrap();
        assert_eq!(args[ca + 1], "/pki/ca.pem");
    }
}
