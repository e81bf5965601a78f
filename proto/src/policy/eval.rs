//! Kubernetes' semantics over a snapshot of pods, namespaces and policies: is a pod isolated
//! in a direction, and which policies allow a connection at each end.
//!
//! This is the reference the agent's rules are compiled from and checked against, and what
//! `podnet-agent why` prints. Traffic from a pod's own node is the enforcer's concern (always
//! allowed), not a question for the policies.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::model::{
    Direction, Labels, NamedPort, NetworkPolicy, Peer, PolicyPort, PortRef, Protocol,
    NAMESPACE_NAME_LABEL,
};

/// A pod as policies see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
}

/// One end of a connection: a known pod, or an address outside every pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    Pod(&'a PodView, IpAddr),
    External(IpAddr),
}

impl Endpoint<'_> {
    fn ip(&self) -> IpAddr {
        match self {
            Endpoint::Pod(_, ip) | Endpoint::External(ip) => *ip,
        }
    }

    fn pod(&self) -> Option<&PodView> {
        match self {
            Endpoint::Pod(p, _) => Some(p),
            Endpoint::External(_) => None,
        }
    }
}

/// What one end of a connection decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not a pod (an address outside the cluster's pods): nothing to enforce here.
    NotAPod,
    /// No policy isolates the pod in this direction.
    Unisolated,
    /// Allowed by these policies (`NS/NAME`), each of which has a matching rule.
    Allowed(Vec<String>),
    /// Isolated by these policies, none of which allows the connection.
    Denied(Vec<String>),
}

impl Decision {
    pub fn allows(&self) -> bool {
        !matches!(self, Decision::Denied(_))
    }
}

/// Both ends' decisions: the source's egress and the destination's ingress. A connection
/// passes only if both allow it; its replies then pass too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub egress: Decision,
    pub ingress: Decision,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// A snapshot of everything policies refer to.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub pods: Vec<PodView>,
    /// Labels set on namespaces; every namespace also carries its own name under
    /// [`NAMESPACE_NAME_LABEL`], listed here or not.
    pub namespaces: BTreeMap<String, Labels>,
    pub policies: Vec<NetworkPolicy>,
}

impl Cluster {
    /// The labels of namespace `ns`, its name label included.
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
        labels
    }

    /// The endpoint at `ip`: the pod that has it, or an outside address.
    pub fn endpoint(&self, ip: IpAddr) -> Endpoint<'_> {
        match self.pods.iter().find(|p| p.ips.contains(&ip)) {
            Some(p) => Endpoint::Pod(p, ip),
            None => Endpoint::External(ip),
        }
    }

    /// Whether `policy` selects `pod` (same namespace, pod selector matches).
    pub fn selects(policy: &NetworkPolicy, pod: &PodView) -> bool {
        policy.namespace() == pod.namespace && policy.spec.pod_selector.matches(&pod.labels)
    }

    /// The policies that isolate `pod` for `direction`.
    pub fn isolating<'a>(
        &'a self,
        pod: &'a PodView,
        direction: Direction,
    ) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
        self.policies
            .iter()
            .filter(move |p| p.applies_to(direction) && Cluster::selects(p, pod))
    }

    /// Whether `peer` (written in `policy`) covers the endpoint `other`.
    pub fn peer_matches(&self, policy: &NetworkPolicy, peer: &Peer, other: &Endpoint) -> bool {
        if let Some(block) = &peer.ip_block {
            let ip = other.ip();
            return block.parsed().is_some_and(|(cidr, except)| {
                cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
            });
        }
        let Some(pod) = other.pod() else {
            return false;
        };
        let namespace_ok = match &peer.namespace_selector {
            Some(s) => s.matches(&self.namespace_labels(&pod.namespace)),
            None => pod.namespace == policy.namespace(),
        };
        namespace_ok
            && peer
                .pod_selector
                .as_ref()
                .is_none_or(|s| s.matches(&pod.labels))
    }

    /// Whether `conn` matches `peers` and `ports` of one rule of `policy`.
    fn rule_matches(
        &self,
        policy: &NetworkPolicy,
        peers: Option<&[Peer]>,
        ports: Option<&[PolicyPort]>,
        conn: &Conn,
    ) -> bool {
        let peers_ok = match peers {
            None | Some([]) => true,
            Some(peers) => peers
                .iter()
                .any(|p| self.peer_matches(policy, p, &conn.other)),
        };
        let ports_ok = match ports {
            None | Some([]) => true,
            Some(ports) => ports
                .iter()
                .any(|p| port_matches(p, conn.dst, conn.port, conn.protocol)),
        };
        peers_ok && ports_ok
    }

    /// The decision of `pod` for a connection in `direction` with `other`, to `port`/`protocol`
    /// of the destination.
    pub fn decide_for(
        &self,
        pod: &PodView,
        direction: Direction,
        other: &Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> Decision {
        // Named ports resolve against the destination pod: this one for ingress, the other
        // end for egress.
        let dst = match direction {
            Direction::Ingress => Some(pod),
            Direction::Egress => other.pod(),
        };
        let conn = Conn {
            other: *other,
            dst,
            port,
            protocol,
        };
        let mut isolating = Vec::new();
        let mut allowing = Vec::new();
        for policy in self.isolating(pod, direction) {
            isolating.push(policy.key());
            let allows =
                match direction {
                    Direction::Ingress => policy.spec.ingress.iter().flatten().any(|r| {
                        self.rule_matches(policy, r.from.as_deref(), r.ports.as_deref(), &conn)
                    }),
                    Direction::Egress => policy.spec.egress.iter().flatten().any(|r| {
                        self.rule_matches(policy, r.to.as_deref(), r.ports.as_deref(), &conn)
                    }),
                };
            if allows {
                allowing.push(policy.key());
            }
        }
        match (isolating.is_empty(), allowing.is_empty()) {
            (true, _) => Decision::Unisolated,
            (false, false) => Decision::Allowed(allowing),
            (false, true) => Decision::Denied(isolating),
        }
    }

    /// Both ends' decisions for a connection from `src` to `dst`:`port`/`protocol`.
    pub fn decide(&self, src: IpAddr, dst: IpAddr, port: u16, protocol: Protocol) -> Verdict {
        let (from, to) = (self.endpoint(src), self.endpoint(dst));
        let end = |me: &Endpoint, direction, other: &Endpoint| match me.pod() {
            Some(pod) => self.decide_for(pod, direction, other, port, protocol),
            None => Decision::NotAPod,
        };
        Verdict {
            egress: end(&from, Direction::Egress, &to),
            ingress: end(&to, Direction::Ingress, &from),
        }
    }
}

/// A connection seen from one end: the other end, the destination pod (if it is one), and the
/// destination port and protocol.
struct Conn<'a> {
    other: Endpoint<'a>,
    dst: Option<&'a PodView>,
    port: u16,
    protocol: Protocol,
}

/// Whether `entry` covers `port`/`protocol`; a named port resolves against `dst`'s declared
/// ports and matches nothing when the destination is not a pod or does not declare it.
pub fn port_matches(
    entry: &PolicyPort,
    dst: Option<&PodView>,
    port: u16,
    protocol: Protocol,
) -> bool {
    if entry.protocol() != protocol {
        return false;
    }
    match &entry.port {
        None => true,
        Some(PortRef::Number(start)) => {
            let end = entry.end_port.unwrap_or(*start);
            (*start..=end).contains(&i64::from(port))
        }
        Some(PortRef::Name(name)) => dst.is_some_and(|pod| {
            pod.ports
                .iter()
                .any(|p| &p.name == name && p.protocol == protocol && p.port == port)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::policy::fixtures::{probe_cluster, NAMESPACES, PODS};

    /// The probe layout with `policies` (JSON documents, each checked as the service would).
    fn cluster(policies: &[serde_json::Value]) -> Cluster {
        let policies = policies
            .iter()
            .map(|p| {
                let policy: NetworkPolicy = serde_json::from_value(p.clone()).expect("a policy");
                policy.validate().expect("a valid policy");
                policy
            })
            .collect();
        probe_cluster(policies)
    }

    fn ip_of(c: &Cluster, name: &str) -> IpAddr {
        let (ns, pod) = name.split_once('/').unwrap();
        c.pods
            .iter()
            .find(|p| p.namespace == ns && p.name == pod)
            .unwrap()
            .ips[0]
    }

    fn names() -> Vec<String> {
        NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
            .collect()
    }

    /// Compares the 9x9 matrix (a pod to itself left out: that never leaves the pod) on
    /// `port`/`protocol` with `expect(from, to)`, and prints the whole matrix on a mismatch.
    fn check(c: &Cluster, port: u16, protocol: Protocol, expect: impl Fn(&str, &str) -> bool) {
        let all = names();
        let mut wrong = Vec::new();
        let mut grid = String::new();
        for from in &all {
            grid.push_str(&format!("\n{from} "));
            for to in &all {
                if from == to {
                    grid.push('-');
                    continue;
                }
                let got = c
                    .decide(ip_of(c, from), ip_of(c, to), port, protocol)
                    .allowed();
                grid.push(if got { '.' } else { 'X' });
                if got != expect(from, to) {
                    wrong.push(format!("{from} -> {to}: got {got}"));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{port}/{protocol}: {wrong:?}\nrows from, columns to ({}):{grid}",
            all.join(" ")
        );
    }

    fn policy(ns: &str, spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "p", "namespace": ns}, "spec": spec})
    }

    fn named(name: &str, ns: &str, spec: serde_json::Value) -> serde_json::Value {
        let mut p = policy(ns, spec);
        p["metadata"]["name"] = json!(name);
        p
    }

    fn in_ns(name: &str, ns: &str) -> bool {
        name.starts_with(&format!("{ns}/"))
    }

    fn x_a_ingress_from(from: serde_json::Value) -> Cluster {
        cluster(&[policy(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": from}]}),
        )])
    }

    #[test]
    fn no_policy_allows_everything() {
        let c = cluster(&[]);
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            check(&c, 80, protocol, |_, _| true);
        }
        let v = c.decide(ip_of(&c, "x/a"), ip_of(&c, "y/b"), 80, Protocol::Tcp);
        assert_eq!(v.egress, Decision::Unisolated);
        assert_eq!(v.ingress, Decision::Unisolated);
    }

    #[test]
    fn deny_all_ingress() {
        let c = cluster(&[policy(
            "x",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )]);
        check(&c, 80, Protocol::Tcp, |_, to| !in_ns(to, "x"));
        let v = c.decide(ip_of(&c, "y/a"), ip_of(&c, "x/b"), 80, Protocol::Tcp);
        assert_eq!(v.ingress, Decision::Denied(vec!["x/p".into()]));
        assert_eq!(v.egress, Decision::Unisolated);
    }

    #[test]
    fn deny_all_both_directions() {
        let c = cluster(&[policy(
            "x",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        )]);
        check(&c, 81, Protocol::Udp, |from, to| {
            !in_ns(to, "x") && !in_ns(from, "x")
        });
    }

    #[test]
    fn allow_from_a_pod_selector() {
        let c = x_a_ingress_from(json!([{"podSelector": {"matchLabels": {"pod": "b"}}}]));
        check(&c, 80, Protocol::Tcp, |from, to| {
            to != "x/a" || from == "x/b"
        });
        let v = c.decide(ip_of(&c, "x/b"), ip_of(&c, "x/a"), 80, Protocol::Tcp);
        assert_eq!(v.ingress, Decision::Allowed(vec!["x/p".into()]));
    }

    #[test]
    fn allow_from_a_namespace_selector() {
        let c = x_a_ingress_from(json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]));
        check(&c, 80, Protocol::Tcp, |from, to| {
            to != "x/a" || in_ns(from, "y")
        });
    }

    #[test]
    fn pod_and_namespace_selectors_in_one_peer_are_anded() {
        let c = x_a_ingress_from(json!([{
            "namespaceSelector": {"matchLabels": {"ns": "y"}},
            "podSelector": {"matchLabels": {"pod": "c"}}
        }]));
        check(&c, 80, Protocol::Tcp, |from, to| {
            to != "x/a" || from == "y/c"
        });
    }

    #[test]
    fn two_peers_are_ored() {
        let c = x_a_ingress_from(json!([
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
            {"podSelector": {"matchLabels": {"pod": "c"}}}
        ]));
        check(&c, 80, Protocol::Tcp, |from, to| {
            to != "x/a" || in_ns(from, "y") || from == "x/c"
        });
    }

    #[test]
    fn not_in_and_the_namespace_name_label() {
        let c = x_a_ingress_from(json!([{"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["y"]}
        ]}}]));
        check(&c, 80, Protocol::Tcp, |from, to| {
            to != "x/a" || !in_ns(from, "y")
        });
    }

    #[test]
    fn allow_on_port_81_only() {
        let c = cluster(&[policy(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"ports": [{"port": 81}]}]}),
        )]);
        check(&c, 80, Protocol::Tcp, |_, to| to != "x/a");
        check(&c, 81, Protocol::Tcp, |_, _| true);
        // A ports entry without protocol means TCP: UDP 81 is not allowed.
        check(&c, 81, Protocol::Udp, |_, to| to != "x/a");
    }

    #[test]
    fn allow_on_a_named_port() {
        let c = cluster(&[policy(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
        )]);
        check(&c, 80, Protocol::Tcp, |_, _| true);
        check(&c, 81, Protocol::Tcp, |_, to| to != "x/a");
        check(&c, 80, Protocol::Udp, |_, to| to != "x/a");
    }

    #[test]
    fn egress_to_a_named_port() {
        let c = cluster(&[policy(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                   "egress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
        )]);
        check(&c, 81, Protocol::Udp, |_, _| true);
        check(&c, 80, Protocol::Udp, |from, _| from != "x/a");
        check(&c, 81, Protocol::Tcp, |from, _| from != "x/a");
        // Outside the pods the name resolves to nothing.
        let out = IpAddr::from([192, 0, 2, 1]);
        let v = c.decide(ip_of(&c, "x/a"), out, 81, Protocol::Udp);
        assert_eq!(v.egress, Decision::Denied(vec!["x/p".into()]));
        assert_eq!(v.ingress, Decision::NotAPod);
    }

    #[test]
    fn an_egress_deny_wins_over_an_ingress_allow() {
        let c = cluster(&[
            named(
                "deny-out",
                "x",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}),
            ),
            named(
                "allow-in",
                "y",
                json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "x"}},
                     "podSelector": {"matchLabels": {"pod": "a"}}}
                ]}]}),
            ),
        ]);
        // y/b now admits only x/a, which may not send.
        check(&c, 80, Protocol::Tcp, |from, to| {
            from != "x/a" && to != "y/b"
        });
        let v = c.decide(ip_of(&c, "x/a"), ip_of(&c, "y/b"), 80, Protocol::Tcp);
        assert_eq!(v.egress, Decision::Denied(vec!["x/deny-out".into()]));
        assert_eq!(v.ingress, Decision::Allowed(vec!["y/allow-in".into()]));
    }

    #[test]
    fn a_protocol_only_entry_allows_every_port_of_that_protocol() {
        let c = cluster(&[policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
        )]);
        check(&c, 80, Protocol::Udp, |_, _| true);
        check(&c, 81, Protocol::Udp, |_, _| true);
        check(&c, 80, Protocol::Tcp, |_, to| !in_ns(to, "x"));
    }

    #[test]
    fn an_ip_block_exception_is_allowed_again_by_a_second_policy() {
        let block = named(
            "block",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.11/32"]}}
            ]}]}),
        );
        let c = cluster(std::slice::from_ref(&block));
        check(&c, 80, Protocol::Tcp, |from, to| {
            to != "x/a" || from != "y/b"
        });
        let again = named(
            "again",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}},
                 "podSelector": {"matchLabels": {"pod": "b"}}}
            ]}]}),
        );
        let c = cluster(&[block, again]);
        check(&c, 80, Protocol::Tcp, |_, _| true);
        let v = c.decide(ip_of(&c, "y/b"), ip_of(&c, "x/a"), 80, Protocol::Tcp);
        assert_eq!(v.ingress, Decision::Allowed(vec!["x/again".into()]));
        let v = c.decide(ip_of(&c, "y/a"), ip_of(&c, "x/a"), 80, Protocol::Tcp);
        assert_eq!(v.ingress, Decision::Allowed(vec!["x/block".into()]));
    }

    #[test]
    fn end_port_ranges() {
        let range = |start: u16, end: u16| {
            cluster(&[policy(
                "x",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": start, "endPort": end}]}]}),
            )])
        };
        let c = range(80, 81);
        check(&c, 80, Protocol::Tcp, |_, _| true);
        check(&c, 81, Protocol::Tcp, |_, _| true);
        let c = range(81, 90);
        check(&c, 80, Protocol::Tcp, |_, to| !in_ns(to, "x"));
        check(&c, 81, Protocol::Tcp, |_, _| true);
    }

    #[test]
    fn default_policy_types() {
        // Egress rules without policyTypes isolate both directions; an empty egress list only
        // ingress.
        let both = cluster(&[policy(
            "x",
            json!({"podSelector": {}, "egress": [{"to": [{"namespaceSelector": {}}]}]}),
        )]);
        // x's pods may send to any pod, but nothing may enter x.
        check(&both, 80, Protocol::Tcp, |_, to| !in_ns(to, "x"));
        let p = &both.policies[0];
        assert!(p.applies_to(Direction::Ingress) && p.applies_to(Direction::Egress));
        let ingress_only = cluster(&[policy("x", json!({"podSelector": {}, "egress": []}))]);
        let p = &ingress_only.policies[0];
        assert!(p.applies_to(Direction::Ingress) && !p.applies_to(Direction::Egress));
    }
}
