//! A multi-host testbed in network namespaces, torn down by `Drop`.
//!
//! Layout (DESIGN.md "Testbed"): netns `<prefix>-ul` holds bridge `br0`; host n lives in
//! `<prefix>-hn` with `eth0` 198.18.0.n/24 on `br0`, a `cni0` bridge holding the gateway of its
//! pod CIDR, and pods `<prefix>-hn-pm` on `cni0`. Static pod CIDRs are 10.244.n.0/24; with the
//! control service the CIDR comes from the agent's `subnet.env`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nix::sys::signal::Signal;

use crate::cmd::{must, run, Output};
use crate::http;
use crate::parse;
use crate::process::Background;
use crate::wait::wait_for;

/// Port of podnet-control on host 1's underlay address.
pub const CONTROL_PORT: u16 = 7800;
/// Members of the etcd cluster of an HA testbed.
pub const ETCD_MEMBERS: u8 = 3;
/// The agent's admin API inside each host namespace (DESIGN.md default).
pub const ADMIN_API: &str = "127.0.0.1:7801";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    Ipip,
    Vxlan,
    Wireguard,
}

impl Encap {
    pub fn as_str(self) -> &'static str {
        match self {
            Encap::Ipip => "ipip",
            Encap::Vxlan => "vxlan",
            Encap::Wireguard => "wireguard",
        }
    }

    /// Bytes the encapsulation adds; overlay MTU = 1500 - overhead on the testbed's underlay.
    pub fn overhead(self) -> u32 {
        match self {
            Encap::Ipip => 20,
            Encap::Vxlan => 50,
            Encap::Wireguard => 60,
        }
    }

    /// A pcap filter for what it puts on the underlay.
    pub fn underlay_filter(self) -> &'static str {
        match self {
            Encap::Ipip => "ip proto 4",
            Encap::Vxlan => "udp port 4789",
            Encap::Wireguard => "udp port 51820",
        }
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

pub struct TestbedBuilder {
    name: String,
    hosts: u8,
    pods: u8,
    mode: HostMode,
    overrides: Vec<(u8, HostMode)>,
    peers: Peers,
    agent_args: Vec<String>,
    control_args: Vec<String>,
    wait_mesh: bool,
    subnets: u8,
    mtls: bool,
    cni: bool,
    replicas: u8,
}

impl TestbedBuilder {
    /// `name` goes into the namespace prefix (with the PID and a counter, so it is unique).
    pub fn new(name: &str) -> TestbedBuilder {
        TestbedBuilder {
            name: name.to_owned(),
            hosts: 3,
            pods: 2,
            mode: HostMode::Bare,
            overrides: Vec::new(),
            peers: Peers::Static,
            agent_args: Vec::new(),
            control_args: Vec::new(),
            wait_mesh: true,
            subnets: 1,
            mtls: false,
            cni: false,
            replicas: 0,
        }
    }

    /// The HA control plane instead of one file-store service: a 3-member etcd cluster
    /// (members `etcd1..3`, each in its own namespace at 198.18.0.201-203) and `replicas`
    /// podnet-control replicas over it (`control1..`, at 198.18.0.211-213). Agents get every
    /// replica's URL.
    pub fn ha(mut self, replicas: u8) -> Self {
        assert!((1..=3).contains(&replicas));
        self.replicas = replicas;
        self
    }

    /// Makes the pods through the podnet CNI plugin, as a runtime would (control mode only: the
    /// plugin reads the agent's `subnet.env`): `podnet-cni` ADD in the host's namespace, the
    /// pod's namespace as `CNI_NETNS`, allocations in `<dir>/hN-cni`.
    pub fn cni(mut self) -> Self {
        self.cni = true;
        self
    }

    /// Runs podnet-control with mTLS: a cluster CA in `<dir>/pki` (`podnet-control ca`), a
    /// server certificate for 198.18.0.1, a node certificate per host, and an operator one
    /// (`operator-admin`). Without it the service runs `--insecure`.
    pub fn mtls(mut self) -> Self {
        self.mtls = true;
        self
    }

    /// Puts the hosts on 1 or 2 underlay subnets: with 2, the first half of the hosts is on
    /// 198.18.0.0/24 (bridge `br0`), the rest on 198.18.1.0/24 (`br1`), and the underlay
    /// namespace routes between them (198.18.0.254 and 198.18.1.254).
    pub fn subnets(mut self, n: u8) -> Self {
        assert!((1..=2).contains(&n));
        self.subnets = n;
        self
    }

    pub fn hosts(mut self, n: u8) -> Self {
        assert!((1..=200).contains(&n));
        self.hosts = n;
        self
    }

    pub fn pods_per_host(mut self, m: u8) -> Self {
        assert!((1..=200).contains(&m));
        self.pods = m;
        self
    }

    /// Mode of every host not given its own with [`Self::host_mode`].
    pub fn mode(mut self, mode: HostMode) -> Self {
        self.mode = mode;
        self
    }

    pub fn host_mode(mut self, host: u8, mode: HostMode) -> Self {
        self.overrides.push((host, mode));
        self
    }

    pub fn peers(mut self, peers: Peers) -> Self {
        self.peers = peers;
        self
    }

    /// Extra flags for every `podnet-agent run`.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Extra flags for `podnet-control serve`.
    pub fn control_args(mut self, args: &[&str]) -> Self {
        self.control_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Do not wait for the full ping mesh in `build` (the test checks reachability itself).
    pub fn no_wait(mut self) -> Self {
        self.wait_mesh = false;
        self
    }

    pub fn build(self) -> Testbed {
        assert!(
            !(self.mtls && self.replicas > 0),
            "HA testbeds serve plain HTTP; mTLS is tested on the file store"
        );
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        static REAP: std::sync::Once = std::sync::Once::new();
        REAP.call_once(reap_stale_namespaces);
        let tag: String = self
            .name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect::<String>()
            .to_ascii_lowercase();
        let prefix = format!(
            "pn-e2e-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join("podnet-e2e").join(&prefix);
        std::fs::create_dir_all(&dir).expect("create testbed dir");
        let mut tb = Testbed {
            prefix,
            dir,
            hosts: Vec::new(),
            namespaces: Vec::new(),
            procs: BTreeMap::new(),
            peers: self.peers,
            mtls: self.mtls,
            replicas: self.replicas,
            cni: self.cni,
            agent_args: self.agent_args,
            control_args: self.control_args,
            pods_per_host: self.pods,
            second_subnet_from: if self.subnets == 2 {
                self.hosts.div_ceil(2) + 1
            } else {
                u8::MAX
            },
        };
        let ul = tb.add_netns("ul");
        for s in 0..self.subnets {
            let br = format!("br{s}");
            must(Some(&ul), &["ip", "link", "add", &br, "type", "bridge"]);
            must(Some(&ul), &["ip", "link", "set", &br, "up"]);
            if self.subnets > 1 {
                let gw = format!("198.18.{s}.254/24");
                must(Some(&ul), &["ip", "addr", "add", &gw, "dev", &br]);
            }
        }
        if self.subnets > 1 {
            must(Some(&ul), &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }
        for n in 1..=self.hosts {
            let mode = self
                .overrides
                .iter()
                .rev()
                .find(|(h, _)| *h == n)
                .map_or(self.mode, |(_, m)| *m);
            tb.add_host(n, mode);
        }
        let podnet_control = self.peers == Peers::Control
            && tb
                .hosts
                .iter()
                .any(|h| matches!(h.mode, HostMode::Podnet(_) | HostMode::PodnetDirect));
        if podnet_control {
            if tb.mtls {
                tb.make_pki(self.hosts);
            }
            if tb.replicas == 0 {
                tb.start_control(&[]);
            } else {
                tb.start_etcd_cluster();
                for r in 1..=tb.replicas {
                    tb.start_replica(r);
                }
            }
        }
        for n in 1..=self.hosts {
            tb.setup_dataplane(n);
        }
        for n in 1..=self.hosts {
            if tb.host(n).pods.is_empty() {
                let cidr = tb.wait_subnet(n, Duration::from_secs(30));
                tb.add_pods(n, cidr);
            }
        }
        if self.wait_mesh {
            if let Err(e) = tb.wait_mesh(Duration::from_secs(60)) {
                panic!("testbed {}: {e}", tb.prefix);
            }
        }
        tb
    }
}

/// Deletes namespaces left by an earlier test run that was killed before its `Drop` ran:
/// names of the form `pn-e2e-<tag>-<pid>-...` whose PID is no longer alive.
fn reap_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let parts: Vec<&str> = name.split('-').collect();
        if parts.len() < 5 || parts[0] != "pn" || parts[1] != "e2e" {
            continue;
        }
        let Ok(pid) = parts[3].parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(
                None,
                &["ip", "netns", "del", &name],
                Duration::from_secs(10),
            );
        }
    }
}

/// A running testbed. Dropping it stops every process it started (by PID) and deletes every
/// namespace it created, also when the test panicked (then the logs are printed and kept).
pub struct Testbed {
    pub prefix: String,
    /// Logs, pcaps, agent state dirs.
    pub dir: PathBuf,
    pub hosts: Vec<Host>,
    namespaces: Vec<String>,
    procs: BTreeMap<String, Background>,
    peers: Peers,
    mtls: bool,
    /// podnet-control replicas over etcd (0: one file-store service in host 1).
    replicas: u8,
    cni: bool,
    agent_args: Vec<String>,
    control_args: Vec<String>,
    pods_per_host: u8,
    /// The first host on the second underlay subnet (`u8::MAX`: one subnet).
    second_subnet_from: u8,
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

impl Testbed {
    pub fn ul(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    /// Host n (1-based).
    pub fn host(&self, n: u8) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.index == n)
            .unwrap_or_else(|| panic!("no host {n}"))
    }

    fn host_mut(&mut self, n: u8) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.index == n)
            .unwrap_or_else(|| panic!("no host {n}"))
    }

    /// Pod m (1-based) of host n.
    pub fn pod(&self, n: u8, m: u8) -> &Pod {
        &self.host(n).pods[usize::from(m) - 1]
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.hosts.iter().flat_map(|h| h.pods.clone()).collect()
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Creates `<prefix>-<suffix>` with `lo` up and records it for teardown.
    pub fn add_netns(&mut self, suffix: &str) -> String {
        let ns = format!("{}-{suffix}", self.prefix);
        must(None, &["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        must(Some(&ns), &["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Attaches a new namespace `<prefix>-<suffix>` to the underlay bridge of `ip`'s subnet
    /// with `ip`/24 on eth0 (and, with two subnets, a default route via that subnet's router).
    pub fn add_underlay_node(&mut self, suffix: &str, ip: Ipv4Addr) -> String {
        let ns = self.add_netns(suffix);
        let ul = self.ul();
        let port = format!("u{suffix}");
        let subnet = ip.octets()[2];
        let bridge = format!("br{subnet}");
        must(
            Some(&ul),
            &[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        );
        must(
            Some(&ul),
            &["ip", "link", "set", &port, "master", &bridge, "up"],
        );
        must(
            Some(&ns),
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        must(Some(&ns), &["ip", "link", "set", "eth0", "up"]);
        if self.second_subnet_from != u8::MAX {
            let gw = format!("198.18.{subnet}.254");
            must(
                Some(&ns),
                &["ip", "route", "add", "198.18.0.0/15", "via", &gw],
            );
        }
        ns
    }

    /// Host n's underlay address: 198.18.0.n, or 198.18.1.n on the second subnet.
    pub fn underlay_of(&self, n: u8) -> Ipv4Addr {
        let subnet = u8::from(n >= self.second_subnet_from);
        Ipv4Addr::new(198, 18, subnet, n)
    }

    /// Creates host n's namespace on the underlay with IPv4 forwarding on; no pods yet.
    pub fn add_host(&mut self, n: u8, mode: HostMode) {
        let ip = self.underlay_of(n);
        let ns = self.add_underlay_node(&format!("h{n}"), ip);
        must(Some(&ns), &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        self.hosts.push(Host {
            index: n,
            ns,
            underlay_ip: ip,
            mode,
            pod_cidr: None,
            pods: Vec::new(),
        });
    }

    /// Host n's `cni0` bridge (gateway = first address of `cidr`) and its pods; pods keep MTU
    /// 1500 so they can send more than the overlay MTU (for the frag-needed checks).
    pub fn add_pods(&mut self, n: u8, cidr: Ipv4Net) {
        if self.cni {
            let mut pods = Vec::new();
            for m in 1..=self.pods_per_host {
                let pns = self.add_netns(&format!("h{n}-p{m}"));
                let out = self.cni_call(n, "ADD", &pns, "eth0", None);
                assert!(
                    out.success(),
                    "podnet-cni ADD for {pns}: {}",
                    out.combined()
                );
                let result: serde_json::Value =
                    serde_json::from_str(&out.stdout).expect("ADD result JSON");
                let ip: Ipv4Net = result["ips"][0]["address"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("no address in {result}"));
                pods.push(Pod {
                    ns: pns,
                    ip: ip.addr(),
                    host: n,
                });
            }
            let host = self.host_mut(n);
            host.pod_cidr = Some(cidr);
            host.pods = pods;
            return;
        }
        let hns = self.host(n).ns.clone();
        let base = u32::from(cidr.network());
        let gw = Ipv4Addr::from(base + 1);
        let len = cidr.prefix_len();
        must(Some(&hns), &["ip", "link", "add", "cni0", "type", "bridge"]);
        must(
            Some(&hns),
            &["ip", "addr", "add", &format!("{gw}/{len}"), "dev", "cni0"],
        );
        must(Some(&hns), &["ip", "link", "set", "cni0", "up"]);
        let mut pods = Vec::new();
        for m in 1..=self.pods_per_host {
            let pns = self.add_netns(&format!("h{n}-p{m}"));
            let port = format!("p{m}");
            must(
                Some(&hns),
                &[
                    "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                    &pns,
                ],
            );
            must(
                Some(&hns),
                &["ip", "link", "set", &port, "master", "cni0", "up"],
            );
            let ip = Ipv4Addr::from(base + 1 + u32::from(m));
            must(
                Some(&pns),
                &["ip", "addr", "add", &format!("{ip}/{len}"), "dev", "eth0"],
            );
            must(Some(&pns), &["ip", "link", "set", "eth0", "up"]);
            must(
                Some(&pns),
                &["ip", "route", "add", "default", "via", &gw.to_string()],
            );
            pods.push(Pod {
                ns: pns,
                ip,
                host: n,
            });
        }
        let host = self.host_mut(n);
        host.pod_cidr = Some(cidr);
        host.pods = pods;
    }

    /// Sets up host n's data path for its mode (static CIDRs; control-mode pods come later).
    pub fn setup_dataplane(&mut self, n: u8) {
        let mode = self.host(n).mode;
        let control = self.peers == Peers::Control
            && matches!(mode, HostMode::Podnet(_) | HostMode::PodnetDirect);
        if !control {
            self.add_pods(n, static_cidr(n));
        }
        match mode {
            HostMode::Podnet(_) | HostMode::PodnetDirect => {
                let args = self.agent_args_of(n, mode);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.start_agent(n, &args);
            }
            HostMode::KernelVxlan => self.setup_kernel_vxlan(n),
            HostMode::Plain => {
                let ns = self.host(n).ns.clone();
                for k in self.other_hosts(n) {
                    let cidr = static_cidr(k).to_string();
                    must(
                        Some(&ns),
                        &[
                            "ip",
                            "route",
                            "add",
                            &cidr,
                            "via",
                            &self.underlay_of(k).to_string(),
                        ],
                    );
                }
            }
            HostMode::Bare => {}
        }
    }

    fn other_hosts(&self, n: u8) -> Vec<u8> {
        self.hosts
            .iter()
            .map(|h| h.index)
            .filter(|&k| k != n)
            .collect()
    }

    fn setup_kernel_vxlan(&mut self, n: u8) {
        let ns = self.host(n).ns.clone();
        let local = self.underlay_of(n).to_string();
        let mac = vtep_mac(self.underlay_of(n));
        must(
            Some(&ns),
            &[
                "ip",
                "link",
                "add",
                "vxlan0",
                "type",
                "vxlan",
                "id",
                "1",
                "dstport",
                "4789",
                "local",
                &local,
                "dev",
                "eth0",
                "nolearning",
            ],
        );
        must(
            Some(&ns),
            &[
                "ip", "link", "set", "vxlan0", "address", &mac, "mtu", "1450", "up",
            ],
        );
        for k in self.other_hosts(n) {
            let peer_mac = vtep_mac(self.underlay_of(k));
            let gw = static_cidr(k).network().to_string();
            let dst = self.underlay_of(k).to_string();
            must(
                Some(&ns),
                &[
                    "ip",
                    "neigh",
                    "add",
                    &gw,
                    "lladdr",
                    &peer_mac,
                    "dev",
                    "vxlan0",
                    "nud",
                    "permanent",
                ],
            );
            must(
                Some(&ns),
                &[
                    "bridge", "fdb", "append", &peer_mac, "dev", "vxlan0", "dst", &dst,
                ],
            );
            must(
                Some(&ns),
                &[
                    "ip",
                    "route",
                    "add",
                    &static_cidr(k).to_string(),
                    "via",
                    &gw,
                    "dev",
                    "vxlan0",
                    "onlink",
                ],
            );
        }
    }

    /// The `podnet-agent run` flags the testbed uses for host n (without the binary).
    pub fn agent_args(&self, n: u8, encap: Encap) -> Vec<String> {
        self.agent_args_of(n, HostMode::Podnet(encap))
    }

    /// [`Testbed::agent_args`] for a podnet host `mode` (`--encap none` for `PodnetDirect`).
    pub fn agent_args_of(&self, n: u8, mode: HostMode) -> Vec<String> {
        let encap = match mode {
            HostMode::Podnet(e) => e.as_str(),
            _ => "none",
        };
        let mut a: Vec<String> = [
            "run",
            "--node-name",
            &format!("h{n}"),
            "--underlay-ip",
            &self.underlay_of(n).to_string(),
            "--underlay-dev",
            "eth0",
            "--encap",
            encap,
            "--state-dir",
            self.path(&format!("h{n}")).to_str().expect("utf-8 path"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match self.peers {
            Peers::Static => {
                a.push("--pod-cidr".into());
                a.push(static_cidr(n).to_string());
                for k in self.other_hosts(n) {
                    // Each peer is sent what it receives.
                    let receives = match self.host(k).mode {
                        HostMode::Podnet(Encap::Wireguard) => {
                            format!("@{},wireguard", self.wireguard_key(k))
                        }
                        HostMode::Podnet(e) => format!(",{}", e.as_str()),
                        // A WireGuard node's bare peer runs whatever WireGuard the test starts
                        // there, with the key pair made in its state dir.
                        HostMode::Bare if mode == HostMode::Podnet(Encap::Wireguard) => {
                            format!("@{},wireguard", self.wireguard_key(k))
                        }
                        HostMode::PodnetDirect => ",none".to_string(),
                        HostMode::KernelVxlan => ",vxlan".to_string(),
                        HostMode::Plain | HostMode::Bare => String::new(),
                    };
                    a.push("--static-peer".into());
                    a.push(format!(
                        "{}={}{receives}",
                        static_cidr(k),
                        self.underlay_of(k)
                    ));
                }
            }
            Peers::Control => {
                a.push("--control".into());
                a.push(self.control_url());
                if self.mtls {
                    let pki = self.pki();
                    if !pki.join(format!("node-h{n}.pem")).exists() {
                        // A host added after the testbed was built.
                        let dir = pki.to_str().expect("utf-8 path");
                        self.ca(&["issue", "--dir", dir, "--node", &format!("h{n}")]);
                    }
                    for (flag, file) in [
                        ("--tls-ca", "ca.pem".to_string()),
                        ("--tls-cert", format!("node-h{n}.pem")),
                        ("--tls-key", format!("node-h{n}-key.pem")),
                    ] {
                        a.push(flag.into());
                        a.push(pki.join(file).to_str().expect("utf-8 path").into());
                    }
                }
            }
        }
        // A test that picks its own worker count keeps it.
        if let Some(w) =
            workers_override().filter(|_| !self.agent_args.iter().any(|a| a == "--workers"))
        {
            a.push("--workers".into());
            a.push(w.to_string());
        }
        a.extend(self.agent_args.iter().cloned());
        a
    }

    /// Host n's WireGuard public key. Its key pair is made here (in the agent's state dir,
    /// where the agent finds it) when it has none yet, so static peers can be given it
    /// before the agents start.
    pub fn wireguard_key(&self, n: u8) -> String {
        let file = self.path(&format!("h{n}")).join("wireguard.key");
        if !file.exists() {
            std::fs::create_dir_all(file.parent().expect("state dir")).expect("state dir");
            std::fs::write(&file, format!("{}\n", crate::wg::genkey())).expect("key file");
        }
        let private = std::fs::read_to_string(&file).expect("key file");
        crate::wg::pubkey(private.trim())
    }

    /// The control service's URL, or every replica's, comma-separated, as agents get them.
    pub fn control_url(&self) -> String {
        let scheme = if self.mtls { "https" } else { "http" };
        if self.replicas == 0 {
            return format!("{scheme}://{}:{CONTROL_PORT}", underlay_ip(1));
        }
        (1..=self.replicas)
            .map(|r| format!("{scheme}://{}", self.replica_addr(r)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where etcd member i (1-3) listens for clients.
    pub fn etcd_ip(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 200 + i)
    }

    /// The etcd client URLs, comma-separated.
    pub fn etcd_endpoints(&self) -> String {
        (1..=ETCD_MEMBERS)
            .map(|i| format!("http://{}:2379", Testbed::etcd_ip(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Replica r's address.
    pub fn replica_addr(&self, r: u8) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(198, 18, 0, 210 + r), CONTROL_PORT))
    }

    /// Namespace of replica r.
    pub fn replica_ns(&self, r: u8) -> String {
        format!("{}-c{r}", self.prefix)
    }

    /// Namespace of etcd member i.
    pub fn etcd_ns(&self, i: u8) -> String {
        format!("{}-etcd{i}", self.prefix)
    }

    /// Starts the 3-member etcd cluster and waits until it is healthy.
    pub fn start_etcd_cluster(&mut self) {
        crate::require_tools(&["etcd", "etcdctl"]);
        for i in 1..=ETCD_MEMBERS {
            self.add_underlay_node(&format!("etcd{i}"), Testbed::etcd_ip(i));
        }
        for i in 1..=ETCD_MEMBERS {
            self.start_etcd(i);
        }
        let ns = self.etcd_ns(1);
        let endpoints = self.etcd_endpoints();
        let healthy = wait_for("etcd cluster healthy", Duration::from_secs(30), || {
            let out = crate::run(
                Some(&ns),
                &["etcdctl", "--endpoints", &endpoints, "endpoint", "health"],
                Duration::from_secs(10),
            )?;
            if out.success() {
                Ok(())
            } else {
                Err(out.combined())
            }
        });
        if let Err(e) = healthy {
            panic!("{e}; etcd1 log:\n{}", self.log("etcd1"));
        }
    }

    /// Starts (or restarts, on its data dir) etcd member i as process `etcdI`.
    pub fn start_etcd(&mut self, i: u8) {
        let ip = Testbed::etcd_ip(i);
        let cluster = (1..=ETCD_MEMBERS)
            .map(|k| format!("e{k}=http://{}:2380", Testbed::etcd_ip(k)))
            .collect::<Vec<_>>()
            .join(",");
        let data = self.path(&format!("etcd{i}.data"));
        let client = format!("http://{ip}:2379");
        let peer = format!("http://{ip}:2380");
        let argv = [
            "etcd",
            "--name",
            &format!("e{i}"),
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
            "--initial-cluster-token",
            &self.prefix.clone(),
            "--initial-cluster-state",
            "new",
        ];
        let ns = self.etcd_ns(i);
        self.start(&format!("etcd{i}"), &ns, &argv);
    }

    /// The etcd member (1-3) that leads now, from `etcdctl endpoint status`.
    pub fn etcd_leader(&self) -> Result<u8, String> {
        let out = crate::run(
            Some(&self.etcd_ns(1)),
            &[
                "etcdctl",
                "--endpoints",
                &self.etcd_endpoints(),
                "endpoint",
                "status",
                "-w",
                "json",
            ],
            Duration::from_secs(10),
        )?;
        let status: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {}", out.combined()))?;
        for (i, member) in status.as_array().into_iter().flatten().enumerate() {
            let s = &member["Status"];
            if s["header"]["member_id"] == s["leader"] && !s["leader"].is_null() {
                return Ok(i as u8 + 1);
            }
        }
        Err(format!("no leader in {}", out.stdout))
    }

    /// Starts podnet-control replica r over the etcd cluster as process `controlR` and waits
    /// for its /healthz (`extra` flags added).
    pub fn start_replica(&mut self, r: u8) {
        let ns = self.replica_ns(r);
        let addr = self.replica_addr(r);
        if !self.namespaces.contains(&ns) {
            let SocketAddr::V4(v4) = addr else {
                unreachable!("replica addresses are IPv4")
            };
            self.add_underlay_node(&format!("c{r}"), *v4.ip());
        }
        let bin = crate::podnet_bin("podnet-control");
        let mut argv: Vec<String> = [
            bin.to_str().expect("utf-8 path"),
            "serve",
            "--listen",
            &addr.to_string(),
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.etcd_endpoints(),
            "--etcd-prefix",
            "/podnet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.push("--insecure".into());
        argv.extend(self.control_args.iter().cloned());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let name = format!("control{r}");
        self.start(&name, &ns, &argv);
        let r = wait_for(&format!("{name} /healthz"), Duration::from_secs(20), || {
            if let Some(status) = self.procs.get_mut(&name).and_then(|p| p.try_exit()) {
                return Ok(Err(format!("{name} exited ({status})")));
            }
            match http::get(&ns, addr, "/healthz") {
                Ok(r) if r.status == 200 => Ok(Ok(())),
                Ok(r) => Err(format!("status {}", r.status)),
                Err(e) => Err(e),
            }
        });
        if let Err(e) | Ok(Err(e)) = r {
            panic!("{e}; log:\n{}", self.log(&name));
        }
    }

    /// The network config a runtime hands `podnet-cni` on host n (`conf` replaces it).
    pub fn cni_config(&self, n: u8) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "podnet",
            "type": "podnet",
            "subnetFile": self.path(&format!("h{n}/subnet.env")),
            "dataDir": self.path(&format!("h{n}-cni")),
        })
    }

    /// Runs `podnet-cni` in host n's namespace as a runtime would: `verb`, the pod's namespace
    /// `pod_ns` (by name, under /run/netns), `ifname`, and `conf` (default [`Self::cni_config`])
    /// on stdin.
    pub fn cni_call(
        &self,
        n: u8,
        verb: &str,
        pod_ns: &str,
        ifname: &str,
        conf: Option<&serde_json::Value>,
    ) -> crate::Output {
        let conf = conf.cloned().unwrap_or_else(|| self.cni_config(n));
        let bin = crate::podnet_bin("podnet-cni");
        self.cni_exec(n, &bin, verb, pod_ns, ifname, &conf)
    }

    /// Runs CNI plugin `plugin` (podnet's or a reference plugin) in host n's namespace as a
    /// runtime would, `conf` on stdin.
    pub fn cni_exec(
        &self,
        n: u8,
        plugin: &std::path::Path,
        verb: &str,
        pod_ns: &str,
        ifname: &str,
        conf: &serde_json::Value,
    ) -> crate::Output {
        let netns = format!("/run/netns/{pod_ns}");
        crate::cmd::run_with_stdin(
            Some(&self.host(n).ns),
            &[
                "env",
                &format!("CNI_COMMAND={verb}"),
                &format!("CNI_CONTAINERID={pod_ns}"),
                &format!("CNI_NETNS={netns}"),
                &format!("CNI_IFNAME={ifname}"),
                "CNI_PATH=/usr/lib/cni",
                plugin.to_str().expect("utf-8 path"),
            ],
            conf.to_string().as_bytes(),
            Duration::from_secs(30),
        )
        .expect("podnet-cni")
    }

    /// The cluster CA and certificates of an mTLS testbed.
    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    /// `podnet-control ca ARGS`; panics unless it succeeds.
    pub fn ca(&self, args: &[&str]) -> String {
        let bin = crate::podnet_bin("podnet-control");
        let mut argv = vec![bin.to_str().expect("utf-8 path"), "ca"];
        argv.extend_from_slice(args);
        let out = crate::run(None, &argv, Duration::from_secs(30)).expect("podnet-control ca");
        assert!(
            out.success(),
            "podnet-control ca {args:?}: {}",
            out.combined()
        );
        out.stdout
    }

    fn make_pki(&self, hosts: u8) {
        let pki = self.pki();
        let dir = pki.to_str().expect("utf-8 path");
        self.ca(&["init", "--dir", dir]);
        let server_ip = underlay_ip(1).to_string();
        self.ca(&["issue", "--dir", dir, "--server", "--ip", &server_ip]);
        self.ca(&["issue", "--dir", dir, "--operator", "admin"]);
        for n in 1..=hosts {
            self.ca(&["issue", "--dir", dir, "--node", &format!("h{n}")]);
        }
    }

    /// `curl` arguments that reach the service as the operator (`-sS --cacert .. --cert ..
    /// --key ..`), or plain `-sS` without mTLS.
    pub fn operator_curl(&self) -> Vec<String> {
        let mut a = vec!["curl".to_string(), "-sS".to_string()];
        if self.mtls {
            let pki = self.pki();
            for (flag, file) in [
                ("--cacert", "ca.pem"),
                ("--cert", "operator-admin.pem"),
                ("--key", "operator-admin-key.pem"),
            ] {
                a.push(flag.into());
                a.push(pki.join(file).to_str().expect("utf-8 path").into());
            }
        }
        a
    }

    /// The control service's address (replica 1's on an HA testbed).
    pub fn control_addr(&self) -> SocketAddr {
        if self.replicas > 0 {
            return self.replica_addr(1);
        }
        SocketAddr::from((underlay_ip(1), CONTROL_PORT))
    }

    /// Starts `podnet-agent ARGS` in host n as process `agent-hn` (replacing a stopped one).
    pub fn start_agent(&mut self, n: u8, args: &[&str]) {
        std::fs::create_dir_all(self.path(&format!("h{n}"))).expect("state dir");
        let bin = crate::podnet_bin("podnet-agent");
        let mut argv = vec![bin.to_str().expect("utf-8 path")];
        argv.extend_from_slice(args);
        let ns = self.host(n).ns.clone();
        self.start(&format!("agent-h{n}"), &ns, &argv);
    }

    /// Starts `podnet-control serve` in host 1 on 198.18.0.1:7800 with its state in the
    /// testbed dir, as process `control`.
    pub fn start_control(&mut self, extra: &[&str]) {
        let bin = crate::podnet_bin("podnet-control");
        let state = self.path("control-state.json");
        let listen = self.control_addr().to_string();
        let mut argv = vec![
            bin.to_str().expect("utf-8 path").to_owned(),
            "serve".into(),
            "--listen".into(),
            listen,
            "--state".into(),
            state.to_str().expect("utf-8 path").to_owned(),
        ];
        if self.mtls {
            let pki = self.pki();
            for (flag, file) in [
                ("--tls-cert", "server.pem"),
                ("--tls-key", "server-key.pem"),
                ("--client-ca", "ca.pem"),
            ] {
                argv.push(flag.into());
                argv.push(pki.join(file).to_str().expect("utf-8 path").into());
            }
        } else {
            argv.push("--insecure".into());
        }
        argv.extend(self.control_args.iter().cloned());
        argv.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let ns = self.host(1).ns.clone();
        self.start("control", &ns, &argv);
        let addr = self.control_addr();
        let r = wait_for("podnet-control /healthz", Duration::from_secs(20), || {
            if let Some(status) = self.procs.get_mut("control").and_then(|p| p.try_exit()) {
                return Ok(Err(format!("podnet-control exited ({status})")));
            }
            if self.mtls {
                let mut curl = self.operator_curl();
                curl.extend(["-f".into(), format!("{}/healthz", self.control_url())]);
                let curl: Vec<&str> = curl.iter().map(String::as_str).collect();
                return match crate::run(Some(&ns), &curl, Duration::from_secs(5)) {
                    Ok(o) if o.success() => Ok(Ok(())),
                    Ok(o) => Err(o.combined()),
                    Err(e) => Err(e),
                };
            }
            match http::get(&ns, addr, "/healthz") {
                Ok(r) if r.status == 200 => Ok(Ok(())),
                Ok(r) => Err(format!("status {}", r.status)),
                Err(e) => Err(e),
            }
        });
        if let Err(e) | Ok(Err(e)) = r {
            panic!("{e}; log:\n{}", self.log("control"));
        }
    }

    /// Starts `argv` in `ns` in the background under `name` (logs in the testbed dir).
    pub fn start(&mut self, name: &str, ns: &str, argv: &[&str]) {
        if let Some(mut old) = self.procs.remove(name) {
            old.stop();
        }
        let log = self.path(&format!("{name}.log"));
        let p = Background::start(name, Some(ns), argv, &log);
        self.procs.insert(name.to_owned(), p);
    }

    pub fn proc(&mut self, name: &str) -> &mut Background {
        self.procs
            .get_mut(name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Stops (SIGTERM, then SIGKILL) and forgets process `name`.
    pub fn stop(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        self.procs.remove(name).and_then(|mut p| p.stop())
    }

    /// SIGKILLs process `name` but keeps it (for its log).
    pub fn kill9(&mut self, name: &str) {
        self.proc(name).signal(Signal::SIGKILL);
        self.proc(name).wait_exit(Duration::from_secs(5));
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// The first finished line of process `name`'s log that starts with `prefix`. A line the
    /// process is still writing has no newline yet, and reading it would cut it short.
    pub fn finished_line(&self, name: &str, prefix: &str) -> Option<String> {
        self.log(name)
            .split_inclusive('\n')
            .find_map(|l| l.strip_suffix('\n').filter(|l| l.starts_with(prefix)))
            .map(str::to_owned)
    }

    /// Starts host n's agent again with the testbed's flags for podnet host `mode` (after a
    /// stop or SIGKILL) and waits until it is up; returns when it was.
    pub fn restart_agent(&mut self, n: u8, mode: HostMode) -> Instant {
        let args = self.agent_args_of(n, mode);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_agent(n, &args);
        self.wait_agent_up(n, Duration::from_secs(20))
    }

    /// Waits until host n's agent (process `agent-hn`) logged that it is up; returns when.
    pub fn wait_agent_up(&self, n: u8, timeout: Duration) -> Instant {
        let name = format!("agent-h{n}");
        wait_for(&format!("{name} up"), timeout, || {
            let log = self.log(&name);
            if log.contains("podnet-agent up") {
                Ok(Instant::now())
            } else {
                Err(log)
            }
        })
        .unwrap_or_else(|log| panic!("{name} did not come up:\n{log}"))
    }

    /// Waits until host n's agent wrote `subnet.env`, returning its POD_SUBNET.
    pub fn wait_subnet(&mut self, n: u8, timeout: Duration) -> Ipv4Net {
        let file = self.path(&format!("h{n}/subnet.env"));
        let name = format!("agent-h{n}");
        let r = wait_for(&format!("{}", file.display()), timeout, || {
            if let Some(status) = self.procs.get_mut(&name).and_then(|p| p.try_exit()) {
                return Ok(Err(format!("{name} exited ({status})")));
            }
            let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            let env = parse::env_file(&text);
            let subnet = env.get("POD_SUBNET").ok_or("no POD_SUBNET yet")?;
            Ok(subnet
                .parse::<Ipv4Net>()
                .map_err(|e| format!("POD_SUBNET={subnet}: {e}")))
        });
        match r {
            Ok(Ok(net)) => net,
            Err(e) | Ok(Err(e)) => panic!("{e}; log:\n{}", self.log(&name)),
        }
    }

    /// `ping -c COUNT` from `from` to `to` (-W 1 s per reply, 0.2 s apart), bounded.
    pub fn ping(&self, from: &Pod, to: Ipv4Addr, count: u32) -> Output {
        let c = count.to_string();
        let timeout = Duration::from_secs(u64::from(count) + 5);
        run(
            Some(&from.ns),
            &[
                "ping",
                "-n",
                "-c",
                &c,
                "-i",
                "0.2",
                "-W",
                "1",
                &to.to_string(),
            ],
            timeout,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// One ping from every pod to every other pod; lists the pairs that got no reply.
    pub fn mesh_failures(&self) -> Vec<String> {
        let pods = self.pods();
        let mut failed = Vec::new();
        for a in &pods {
            for b in &pods {
                if a.ns != b.ns && !self.ping(a, b.ip, 1).success() {
                    failed.push(format!("{} -> {}", a.ns, b.ip));
                }
            }
        }
        failed
    }

    /// Waits until every pod pings every other pod.
    pub fn wait_mesh(&mut self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let failed = self.mesh_failures();
            if failed.is_empty() {
                return Ok(());
            }
            for (name, p) in self.procs.iter_mut() {
                if let Some(status) = p.try_exit() {
                    return Err(format!("{name} exited ({status}):\n{}", p.log()));
                }
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "after {timeout:?} still no ping {}",
                    failed.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// [`Testbed::start`], then waits up to `timeout` for `ready` to appear in the process's
    /// log (a server saying it listens); the error carries the log.
    pub fn start_ready(
        &mut self,
        name: &str,
        ns: &str,
        argv: &[&str],
        ready: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        self.start(name, ns, argv);
        wait_for(&format!("{name} to print {ready:?}"), timeout, || {
            let log = self.log(name);
            if log.contains(ready) {
                Ok(())
            } else {
                Err(log)
            }
        })
    }

    /// Starts a one-shot `iperf3 -s -1` named `name` in `ns` and waits until it listens.
    pub fn start_iperf_server(&mut self, name: &str, ns: &str) -> Result<(), String> {
        self.start_ready(
            name,
            ns,
            &["iperf3", "-s", "-1", "--forceflush"],
            "listening",
            Duration::from_secs(10),
        )
    }

    /// A bounded iperf3 TCP run (`-t SECS -J`) from `client` to an `iperf3 -s -1` in `server`.
    pub fn iperf(
        &mut self,
        client: &Pod,
        server: &Pod,
        secs: u32,
    ) -> Result<parse::IperfResult, String> {
        self.iperf_with(client, server, secs, &[])
    }

    /// [`Testbed::iperf`] with more client arguments (`-M 100`, `-R`, ...).
    pub fn iperf_with(
        &mut self,
        client: &Pod,
        server: &Pod,
        secs: u32,
        extra: &[&str],
    ) -> Result<parse::IperfResult, String> {
        let name = format!("iperf3-s-{}", server.ns);
        self.start_iperf_server(&name, &server.ns.clone())?;
        let (t, ip) = (secs.to_string(), server.ip.to_string());
        let mut argv = vec![
            "iperf3",
            "-c",
            &ip,
            "-t",
            &t,
            "-J",
            "--connect-timeout",
            "3000",
        ];
        argv.extend_from_slice(extra);
        let out = run(
            Some(&client.ns),
            &argv,
            Duration::from_secs(u64::from(secs) + 20),
        )?;
        self.stop(&name);
        parse::iperf3_json(&out.stdout).map_err(|e| format!("{e}; stderr: {}", out.stderr))
    }

    /// GET on host n's agent admin API.
    pub fn admin_get(&self, n: u8, path: &str) -> Result<http::Response, String> {
        http::get(&self.host(n).ns, ADMIN_API.parse().expect("addr"), path)
    }

    /// Host n's agent `/metrics` text (panics unless 200).
    pub fn metrics(&self, n: u8) -> String {
        let r = self
            .admin_get(n, "/metrics")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 200, "/metrics on h{n}: {}", r.body);
        r.body
    }

    /// Host n's `podnet_agent_drops_total{reason}` (0 when the agent has no such sample yet).
    /// Exactly that family: the per-peer family carries the same reasons and would count them
    /// twice.
    pub fn drops(&self, n: u8, reason: &str) -> f64 {
        parse::metric_sum(
            &self.metrics(n),
            "podnet_agent_drops_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        // Tools first, then the agents (which leave podnet-control gracefully on SIGTERM, so it
        // must still be up), the control service last.
        let mut names: Vec<String> = self.procs.keys().cloned().collect();
        names.sort_by_key(|n| match n.as_str() {
            "control" => 2,
            n if n.starts_with("agent-") => 1,
            _ => 0,
        });
        for name in names {
            if let Some(mut p) = self.procs.remove(&name) {
                p.stop();
                if panicking {
                    let log = p.log();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("--- {} ({name}) last lines:", self.prefix);
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(None, &["ip", "netns", "del", ns], Duration::from_secs(10));
        }
        if panicking {
            eprintln!(
                "testbed {} torn down; logs kept in {}",
                self.prefix,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
