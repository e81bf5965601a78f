//! [`TestbedBuilder`]: what a test asks for, brought up in order (underlay, hosts, control
//! service, data planes, pods), and the namespaces an earlier killed run left behind.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::namespaces::Testbed;
use super::topology::{HostMode, Peers};
use crate::cmd::{must, run};

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

    /// Pods the builder makes on each host (0: the test makes its own).
    pub fn pods_per_host(mut self, m: u8) -> Self {
        assert!(m <= 200);
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
        // One pod (or none) has no pair to check.
        if self.wait_mesh && tb.pods().len() >= 2 {
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
