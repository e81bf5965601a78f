//! Network policy compiled for one node: which of its pods each direction isolates, and the
//! rules that allow traffic for them, rendered as the nftables table the agent applies.
//!
//! The table works on the `forward` hook of the `ip` family. Every packet to or from a local
//! pod passes there: routed traffic, and traffic bridged between two pods of this node too,
//! since bridge netfilter hands bridged IPv4 to the IP hooks. Traffic from the node itself
//! (health checks) leaves through `output`, so it is never filtered, as Kubernetes wants.
//!
//! Rules match a connection's original direction (`ct original ...`), so a reply is judged as
//! the connection it belongs to. A connection approved under the current rules carries their
//! generation in its conntrack mark and passes at once after that. A change brings a new
//! generation: each connection is judged again at its next packet, and one the new rules deny
//! stops there, with no conntrack entry to flush.
//!
//! The addresses a policy's peer covers are a named set, one per peer of each policy rule,
//! named for where the peer is written: a pod coming or going changes the set's elements, and
//! no rule. [`crate::core::policy_table`] turns these rules into the table and its updates.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use podnet_proto::policy::{
    Cluster, Direction, Endpoint, NetworkPolicy, Peer, PodView, PolicyPort, PortRef, Protocol,
};

/// What a rule allows on the transport layer: one protocol, and a range of destination ports
/// (every port when `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub protocol: Protocol,
    pub ports: Option<(u16, u16)>,
}

/// One allowing rule of one local pod in one direction.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allow {
    /// The local pod's address.
    pub pod: Ipv4Addr,
    /// The other end.
    pub peers: Peers,
    /// Any traffic (`None`), or any of these.
    pub ports: Option<Vec<PortRange>>,
    /// The policy the rule comes from (`NS/NAME`).
    pub policy: String,
}

/// The other end of an allowing rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peers {
    /// Anywhere.
    Any,
    /// What one peer of a policy rule covers now, as the named set `name`: pods as /32s, or a
    /// block's prefixes (`interval`).
    Set {
        name: String,
        nets: Vec<Ipv4Net>,
        interval: bool,
    },
    /// The one pod a named port resolved on, written into the rule.
    Pod(Ipv4Addr),
}

impl Peers {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        match self {
            Peers::Any => true,
            Peers::Set { nets, .. } => nets.iter().any(|n| n.contains(&ip)),
            Peers::Pod(pod) => *pod == ip,
        }
    }
}

/// The name of the set of peer `peer` of rule `rule` of `policy` in `direction`: the same for
/// as long as the policy reads the same there (FNV-1a, so restarts agree).
fn set_name(policy: &str, direction: Direction, rule: usize, peer: usize) -> String {
    let key = format!("{policy}\0{direction:?}\0{rule}\0{peer}");
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("peers_{hash:016x}")
}

/// The node's policy: isolated pods per direction and their allowing rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRules {
    pub ingress_isolated: BTreeSet<Ipv4Addr>,
    pub egress_isolated: BTreeSet<Ipv4Addr>,
    pub ingress: Vec<Allow>,
    pub egress: Vec<Allow>,
}

impl NodeRules {
    /// Whether the rules let a connection from `src` to `dst`:`port`/`protocol` (`port` 0 and
    /// no protocol for traffic without ports) pass: what the table does, for tests and `why`.
    pub fn allows(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        port: u16,
        protocol: Option<Protocol>,
    ) -> bool {
        let ok = |rules: &[Allow], me: Ipv4Addr, other: Ipv4Addr| {
            rules.iter().any(|r| {
                r.pod == me
                    && r.peers.contains(other)
                    && r.ports.as_ref().is_none_or(|ps| {
                        ps.iter().any(|p| {
                            Some(p.protocol) == protocol
                                && p.ports.is_none_or(|(a, b)| (a..=b).contains(&port))
                        })
                    })
            })
        };
        (!self.egress_isolated.contains(&src) || ok(&self.egress, src, dst))
            && (!self.ingress_isolated.contains(&dst) || ok(&self.ingress, dst, src))
    }
}

/// Compiles the policies of `cluster` for the pods of `local` (this node's).
pub fn compile<'a>(cluster: &Cluster, local: impl IntoIterator<Item = &'a PodView>) -> NodeRules {
    let mut out = NodeRules::default();
    for pod in local {
        let addrs: Vec<Ipv4Addr> = pod
            .ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        for direction in [Direction::Ingress, Direction::Egress] {
            let policies: Vec<&NetworkPolicy> = cluster.isolating(pod, direction).collect();
            if policies.is_empty() {
                continue;
            }
            let (isolated, rules) = match direction {
                Direction::Ingress => (&mut out.ingress_isolated, &mut out.ingress),
                Direction::Egress => (&mut out.egress_isolated, &mut out.egress),
            };
            isolated.extend(addrs.iter().copied());
            for policy in policies {
                for allow in allows(cluster, policy, pod, direction) {
                    for &addr in &addrs {
                        rules.push(Allow {
                            pod: addr,
                            ..allow.clone()
                        });
                    }
                }
            }
        }
    }
    out.ingress.sort();
    out.ingress.dedup();
    out.egress.sort();
    out.egress.dedup();
    out
}

/// One rule of a policy: its peers and its ports.
type RuleParts<'a> = (Option<&'a [Peer]>, Option<&'a [PolicyPort]>);

/// The allowing rules one policy gives `pod` in `direction` (their `pod` field unset).
fn allows(
    cluster: &Cluster,
    policy: &NetworkPolicy,
    pod: &PodView,
    direction: Direction,
) -> Vec<Allow> {
    let rules: Vec<RuleParts> = match direction {
        Direction::Ingress => policy
            .spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_deref(), r.ports.as_deref()))
            .collect(),
        Direction::Egress => policy
            .spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_deref(), r.ports.as_deref()))
            .collect(),
    };
    let mut out = Vec::new();
    let unset = Ipv4Addr::UNSPECIFIED;
    for (index, (peers, ports)) in rules.into_iter().enumerate() {
        // Each peer is a set of its own: the sets of a pod selector and of a block may overlap,
        // and a set's elements may not.
        let groups: Vec<Peers> = match peers {
            None | Some([]) => vec![Peers::Any],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, p)| Peers::Set {
                    name: set_name(&policy.key(), direction, index, i),
                    nets: peer_nets(cluster, policy, p),
                    interval: p.ip_block.is_some(),
                })
                .collect(),
        };
        let allow = |peers: &Peers, ports: Option<Vec<PortRange>>| Allow {
            pod: unset,
            peers: peers.clone(),
            ports,
            policy: policy.key(),
        };
        let entries = match ports {
            None | Some([]) => {
                out.extend(groups.iter().map(|g| allow(g, None)));
                continue;
            }
            Some(entries) => entries,
        };
        // Numbers (and protocol-only entries) hold whoever the destination is; a name resolves
        // on the destination pod: this pod for ingress, each pod among the peers for egress.
        let mut fixed = Vec::new();
        let mut named = Vec::new();
        for e in entries {
            match &e.port {
                Some(PortRef::Name(name)) => named.push((name.as_str(), e.protocol())),
                Some(PortRef::Number(n)) => {
                    let start = u16::try_from(*n).unwrap_or(0);
                    let end = e
                        .end_port
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(start);
                    fixed.push(PortRange {
                        protocol: e.protocol(),
                        ports: Some((start, end)),
                    });
                }
                None => fixed.push(PortRange {
                    protocol: e.protocol(),
                    ports: None,
                }),
            }
        }
        if direction == Direction::Ingress {
            fixed.extend(
                named
                    .iter()
                    .filter_map(|(name, proto)| resolve(pod, name, *proto)),
            );
        }
        if !fixed.is_empty() {
            let fixed = dedup(fixed);
            out.extend(groups.iter().map(|g| allow(g, Some(fixed.clone()))));
        }
        if direction == Direction::Egress && !named.is_empty() {
            for dst in &cluster.pods {
                let resolved: Vec<PortRange> = named
                    .iter()
                    .filter_map(|(name, proto)| resolve(dst, name, *proto))
                    .collect();
                if resolved.is_empty() {
                    continue;
                }
                for ip in dst.ips.iter().filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                }) {
                    if groups.iter().any(|g| g.contains(ip)) {
                        out.push(allow(&Peers::Pod(ip), Some(dedup(resolved.clone()))));
                    }
                }
            }
        }
    }
    out
}

fn dedup(mut ports: Vec<PortRange>) -> Vec<PortRange> {
    ports.sort();
    ports.dedup();
    ports
}

/// The port `pod` declares as `name` for `protocol`.
fn resolve(pod: &PodView, name: &str, protocol: Protocol) -> Option<PortRange> {
    pod.ports
        .iter()
        .find(|p| p.name == name && p.protocol == protocol)
        .map(|p| PortRange {
            protocol,
            ports: Some((p.port, p.port)),
        })
}

/// The IPv4 networks a peer of `policy` covers: its block minus the exceptions, or the
/// addresses of the pods its selectors pick.
fn peer_nets(cluster: &Cluster, policy: &NetworkPolicy, peer: &Peer) -> Vec<Ipv4Net> {
    if let Some(block) = &peer.ip_block {
        let Some((IpNet::V4(cidr), except)) = block.parsed() else {
            return Vec::new();
        };
        let except: Vec<Ipv4Net> = except
            .into_iter()
            .filter_map(|e| match e {
                IpNet::V4(v4) => Some(v4),
                IpNet::V6(_) => None,
            })
            .collect();
        return subtract(cidr, &except);
    }
    let mut pods: Vec<Ipv4Net> = cluster
        .pods
        .iter()
        .flat_map(|p| p.ips.iter().map(move |ip| (p, *ip)))
        .filter(|(p, ip)| cluster.peer_matches(policy, peer, &Endpoint::Pod(p, *ip)))
        .filter_map(|(_, ip)| match ip {
            IpAddr::V4(v4) => Some(Ipv4Net::from(v4)),
            IpAddr::V6(_) => None,
        })
        .collect();
    pods.sort();
    pods
}

/// `net` without the addresses of `holes`, as the fewest prefixes.
fn subtract(net: Ipv4Net, holes: &[Ipv4Net]) -> Vec<Ipv4Net> {
    if holes.iter().any(|h| h.contains(&net)) {
        return Vec::new();
    }
    if !holes.iter().any(|h| net.contains(h)) {
        return vec![net];
    }
    // A hole lies strictly inside: split in halves and subtract from each.
    let halves = net
        .subnets(net.prefix_len() + 1)
        .expect("a net holding a smaller hole has a longer prefix");
    halves.flat_map(|half| subtract(half, holes)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Upstream's probe layout with `policies` (JSON, `apiVersion` and `kind` added).
    fn cluster(policies: &[serde_json::Value]) -> Cluster {
        let policies = policies
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p["apiVersion"] = json!("networking.k8s.io/v1");
                p["kind"] = json!("NetworkPolicy");
                let policy: NetworkPolicy = serde_json::from_value(p).expect("a policy");
                policy.validate().expect("a valid policy");
                policy
            })
            .collect();
        podnet_proto::policy::fixtures::probe_cluster(policies)
    }

    fn policy(name: &str, ns: &str, spec: serde_json::Value) -> serde_json::Value {
        json!({"metadata": {"name": name, "namespace": ns}, "spec": spec})
    }

    /// Upstream's cases and more, each a set of policies.
    fn cases() -> Vec<Vec<serde_json::Value>> {
        let a = json!({"matchLabels": {"pod": "a"}});
        vec![
            vec![],
            vec![policy(
                "deny",
                "x",
                json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
            )],
            vec![policy(
                "deny",
                "x",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            )],
            vec![policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "c"}}},
                    {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["b"]}]}}
                ]}]}),
            )],
            vec![policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"ports": [{"port": 81}]}]}),
            )],
            vec![policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
            )],
            vec![policy(
                "p",
                "x",
                json!({"podSelector": a, "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
            )],
            vec![policy(
                "p",
                "x",
                json!({"podSelector": a, "policyTypes": ["Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                            "ports": [{"port": "serve-80-tcp"}, {"port": 81, "protocol": "UDP"}]}]}),
            )],
            vec![
                policy(
                    "out",
                    "x",
                    json!({"podSelector": a, "policyTypes": ["Egress"]}),
                ),
                policy(
                    "in",
                    "y",
                    json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "x"}}}]}]}),
                ),
            ],
            vec![policy(
                "p",
                "x",
                json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
            )],
            vec![
                policy(
                    "block",
                    "x",
                    json!({"podSelector": a, "ingress": [{"from": [
                    {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.11/32", "10.244.3.0/24"]}}]}]}),
                ),
                policy(
                    "again",
                    "x",
                    json!({"podSelector": a, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                ),
            ],
            vec![policy(
                "p",
                "x",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]}),
            )],
            vec![policy(
                "p",
                "y",
                json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.244.1.0/24"}}]}]}),
            )],
            vec![policy(
                "p",
                "z",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}],
                "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]}),
            )],
        ]
    }

    /// The compiled rules agree with the semantics on every pair of the 9 pods, on TCP and UDP
    /// ports 80 and 81, for every case: the compiler is checked against the reference.
    #[test]
    fn compiled_rules_decide_as_the_semantics_do() {
        for (i, case) in cases().iter().enumerate() {
            let c = cluster(case);
            let rules = compile(&c, &c.pods);
            for src in &c.pods {
                for dst in &c.pods {
                    if src == dst {
                        continue;
                    }
                    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ips[0], dst.ips[0]) else {
                        unreachable!()
                    };
                    for protocol in [Protocol::Tcp, Protocol::Udp] {
                        for port in [80, 81] {
                            let want = c.decide(src.ips[0], dst.ips[0], port, protocol).allowed();
                            let got = rules.allows(s, d, port, Some(protocol));
                            assert_eq!(
                                got, want,
                                "case {i}: {}/{} -> {}/{} {port}/{protocol}\n{rules:#?}",
                                src.namespace, src.name, dst.namespace, dst.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn only_this_nodes_pods_get_rules() {
        let c = cluster(&cases()[2]);
        let local: Vec<&PodView> = c.pods.iter().filter(|p| p.name == "a").collect();
        let rules = compile(&c, local);
        let x_a: Ipv4Addr = "10.244.1.10".parse().unwrap();
        assert_eq!(rules.ingress_isolated, [x_a].into());
        assert_eq!(rules.egress_isolated, [x_a].into());
        assert!(
            rules.ingress.is_empty() && rules.egress.is_empty(),
            "deny all: {rules:?}"
        );
    }

    #[test]
    fn exceptions_are_cut_out_of_the_block() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let left = subtract(
            net("10.0.0.0/24"),
            &[net("10.0.0.0/26"), net("10.0.0.192/27")],
        );
        assert_eq!(
            left,
            [
                net("10.0.0.64/26"),
                net("10.0.0.128/26"),
                net("10.0.0.224/27")
            ]
        );
        assert!(subtract(net("10.0.0.0/24"), &[net("10.0.0.0/16")]).is_empty());
        assert_eq!(
            subtract(net("10.0.0.0/24"), &[net("10.1.0.0/24")]),
            [net("10.0.0.0/24")]
        );
    }
}
