//! Hosts on the underlay: their namespaces, pods, data planes (podnet agents, the kernel's
//! VXLAN, plain routes) and the agents' flags.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::namespaces::Testbed;
use podnet_proto::api::Encap;

use super::topology::{
    static_cidr, underlay_ip_on, vtep_mac, workers_override, Host, HostMode, Peers, Pod,
};
use crate::cmd::must;
use crate::parse;
use crate::wait::wait_for;

impl Testbed {
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
        underlay_ip_on(subnet, n)
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
                let ip = self.cni_add(n, &pns, "");
                pods.push(Pod {
                    ns: pns,
                    ip,
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

    pub(super) fn other_hosts(&self, n: u8) -> Vec<u8> {
        self.hosts
            .iter()
            .map(|h| h.index)
            .filter(|&k| k != n)
            .collect()
    }

    pub(super) fn setup_kernel_vxlan(&mut self, n: u8) {
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
            HostMode::Podnet(e) => e.name(),
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
                        HostMode::Podnet(e) => format!(",{}", e.name()),
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

    /// Starts `podnet-agent ARGS` in host n as process `agent-hn` (replacing a stopped one).
    pub fn start_agent(&mut self, n: u8, args: &[&str]) {
        std::fs::create_dir_all(self.path(&format!("h{n}"))).expect("state dir");
        let bin = crate::podnet_bin("podnet-agent");
        let mut argv = vec![bin.to_str().expect("utf-8 path")];
        argv.extend_from_slice(args);
        let ns = self.host(n).ns.clone();
        self.start(&format!("agent-h{n}"), &ns, &argv);
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
}
