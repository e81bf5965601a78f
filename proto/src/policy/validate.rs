//! The checks a document must pass before it changes anything, with Kubernetes' rules for
//! names, labels, selectors, CIDRs and ports. The first failure is reported with the path of
//! the field (`spec.ingress[0].ports[1].endPort`) and what to write instead.

use ipnet::IpNet;

use super::model::{
    IpBlock, LabelSelector, NetworkPolicy, Peer, PolicyPort, PortRef, Protocol, API_VERSION,
};

/// Why a document was refused: the field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

fn refuse(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Longest DNS-1123 label (namespaces, label names).
const MAX_LABEL: usize = 63;
/// Longest DNS-1123 subdomain (policy names, label key prefixes).
const MAX_SUBDOMAIN: usize = 253;
/// Longest IANA service name (named ports).
const MAX_PORT_NAME: usize = 15;

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_SUBDOMAIN && s.split('.').all(is_dns_label)
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, the name part of a label key and a label value.
fn is_label_word(s: &str) -> bool {
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    edge(s.bytes().next())
        && edge(s.bytes().last())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A namespace name: a DNS-1123 label.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    if is_dns_label(ns) {
        Ok(())
    } else {
        Err(format!(
            "{ns:?} is not a namespace name: use at most {MAX_LABEL} lowercase letters, digits \
             and '-', starting and ending with a letter or digit"
        ))
    }
}

/// A pod or policy name: a DNS-1123 subdomain.
pub fn check_object_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("a name is required".into())
    } else if name.len() > MAX_SUBDOMAIN {
        Err(format!(
            "the name is {} characters long, at most {MAX_SUBDOMAIN} are allowed",
            name.len()
        ))
    } else if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: use lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit"
        ))
    }
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain, the name at most 63 characters.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !is_dns_subdomain(p) {
            return Err(format!(
                "label key {key:?}: the prefix {p:?} must be a DNS subdomain (example.com)"
            ));
        }
    }
    if name.len() > MAX_LABEL || !is_label_word(name) {
        return Err(format!(
            "label key {key:?}: the name must be at most {MAX_LABEL} letters, digits, '-', '_' \
             or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_` and `.`.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || (value.len() <= MAX_LABEL && is_label_word(value)) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?}: use at most {MAX_LABEL} letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ))
    }
}

/// A port name (an IANA service name): at most 15 lowercase letters, digits and `-`, with at
/// least one letter, no `-` at either end and no `--`.
pub fn check_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PORT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a port name: use at most {MAX_PORT_NAME} lowercase letters, digits \
             and single '-', with at least one letter"
        ))
    }
}

fn check_labels(field: &str, labels: &super::model::Labels) -> Result<(), PolicyError> {
    for (k, v) in labels {
        check_label_key(k).map_err(|r| refuse(field, r))?;
        check_label_value(v).map_err(|r| refuse(format!("{field}.{k}"), r))?;
    }
    Ok(())
}

impl NetworkPolicy {
    /// Checks the whole document as the Kubernetes API server would, so a policy podnet
    /// accepts is one `kubectl apply` accepts, and a refused one changes nothing.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.api_version != API_VERSION {
            return Err(refuse(
                "apiVersion",
                format!("{:?} is not supported; use {API_VERSION}", self.api_version),
            ));
        }
        if self.kind != "NetworkPolicy" {
            return Err(refuse(
                "kind",
                format!("{:?} is not a NetworkPolicy", self.kind),
            ));
        }
        check_object_name(&self.metadata.name).map_err(|r| refuse("metadata.name", r))?;
        if let Some(ns) = &self.metadata.namespace {
            check_namespace(ns).map_err(|r| refuse("metadata.namespace", r))?;
        }
        check_labels("metadata.labels", &self.metadata.labels)?;
        let spec = &self.spec;
        check_selector("spec.podSelector", &spec.pod_selector)?;
        for (i, rule) in spec.ingress.iter().flatten().enumerate() {
            let at = format!("spec.ingress[{i}]");
            check_peers(&format!("{at}.from"), rule.from.as_deref())?;
            check_ports(&format!("{at}.ports"), rule.ports.as_deref())?;
        }
        for (i, rule) in spec.egress.iter().flatten().enumerate() {
            let at = format!("spec.egress[{i}]");
            check_peers(&format!("{at}.to"), rule.to.as_deref())?;
            check_ports(&format!("{at}.ports"), rule.ports.as_deref())?;
        }
        if let Some(types) = &spec.policy_types {
            for (i, t) in types.iter().enumerate() {
                if types[..i].contains(t) {
                    return Err(refuse(
                        format!("spec.policyTypes[{i}]"),
                        format!("{t:?} is listed twice"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_selector(field: &str, s: &LabelSelector) -> Result<(), PolicyError> {
    check_labels(&format!("{field}.matchLabels"), &s.match_labels)?;
    for (i, r) in s.match_expressions.iter().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        check_label_key(&r.key).map_err(|e| refuse(format!("{at}.key"), e))?;
        match r.operator.as_str() {
            "In" | "NotIn" if r.values.is_empty() => {
                return Err(refuse(
                    format!("{at}.values"),
                    format!("operator {} needs at least one value", r.operator),
                ))
            }
            "Exists" | "DoesNotExist" if !r.values.is_empty() => {
                return Err(refuse(
                    format!("{at}.values"),
                    format!("operator {} takes no values", r.operator),
                ))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(refuse(
                    format!("{at}.operator"),
                    format!("{other:?} is not an operator; use In, NotIn, Exists or DoesNotExist"),
                ))
            }
        }
        for (j, v) in r.values.iter().enumerate() {
            check_label_value(v).map_err(|e| refuse(format!("{at}.values[{j}]"), e))?;
        }
    }
    Ok(())
}

fn check_peers(field: &str, peers: Option<&[Peer]>) -> Result<(), PolicyError> {
    for (i, p) in peers.unwrap_or_default().iter().enumerate() {
        let at = format!("{field}[{i}]");
        let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
        match (&p.ip_block, selectors) {
            (Some(_), true) => {
                return Err(refuse(
                    at,
                    "ipBlock may not be combined with podSelector or namespaceSelector; \
                     write them as two peers",
                ))
            }
            (None, false) => {
                return Err(refuse(
                    at,
                    "a peer needs podSelector, namespaceSelector or ipBlock",
                ))
            }
            (Some(b), false) => check_ip_block(&format!("{at}.ipBlock"), b)?,
            (None, true) => {
                if let Some(s) = &p.pod_selector {
                    check_selector(&format!("{at}.podSelector"), s)?;
                }
                if let Some(s) = &p.namespace_selector {
                    check_selector(&format!("{at}.namespaceSelector"), s)?;
                }
            }
        }
    }
    Ok(())
}

impl IpBlock {
    /// The block and its exceptions, parsed (`None` if validation would refuse it).
    pub fn parsed(&self) -> Option<(IpNet, Vec<IpNet>)> {
        let cidr = self.cidr.parse::<IpNet>().ok()?.trunc();
        let except = self
            .except
            .iter()
            .map(|e| e.parse::<IpNet>().ok().map(|n| n.trunc()))
            .collect::<Option<Vec<_>>>()?;
        Some((cidr, except))
    }
}

fn check_ip_block(field: &str, b: &IpBlock) -> Result<(), PolicyError> {
    let cidr: IpNet = b.cidr.parse().map_err(|_| {
        refuse(
            format!("{field}.cidr"),
            format!("{:?} is not a CIDR (write it as 10.0.0.0/16)", b.cidr),
        )
    })?;
    for (i, e) in b.except.iter().enumerate() {
        let at = format!("{field}.except[{i}]");
        let except: IpNet = e.parse().map_err(|_| {
            refuse(
                &at,
                format!("{e:?} is not a CIDR (write it as 10.0.1.0/24)"),
            )
        })?;
        if except.prefix_len() <= cidr.prefix_len() || !cidr.contains(&except.network()) {
            return Err(refuse(
                at,
                format!(
                    "{e} is not inside cidr {}: an exception must be a strict subset of it",
                    b.cidr
                ),
            ));
        }
    }
    Ok(())
}

fn check_ports(field: &str, ports: Option<&[PolicyPort]>) -> Result<(), PolicyError> {
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        let at = format!("{field}[{i}]");
        if let Some(name) = &p.protocol {
            if Protocol::from_name(name).is_none() {
                return Err(refuse(
                    format!("{at}.protocol"),
                    format!("unsupported protocol {name:?}; use TCP, UDP or SCTP"),
                ));
            }
        }
        let start = match &p.port {
            None => None,
            Some(PortRef::Number(n)) => {
                if !(1..=65535).contains(n) {
                    return Err(refuse(
                        format!("{at}.port"),
                        format!("{n} is not a port; use 1 to 65535"),
                    ));
                }
                Some(*n)
            }
            Some(PortRef::Name(name)) => {
                check_port_name(name).map_err(|r| refuse(format!("{at}.port"), r))?;
                None
            }
        };
        if let Some(end) = p.end_port {
            let Some(start) = start else {
                return Err(refuse(
                    format!("{at}.endPort"),
                    "endPort needs a numeric port to start the range",
                ));
            };
            if end < start || end > 65535 {
                return Err(refuse(
                    format!("{at}.endPort"),
                    format!("{end} must be at least port ({start}) and at most 65535"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{
        EgressRule, IngressRule, NetworkPolicySpec, ObjectMeta, Requirement,
    };

    fn policy(spec: NetworkPolicySpec) -> NetworkPolicy {
        NetworkPolicy {
            api_version: API_VERSION.into(),
            kind: "NetworkPolicy".into(),
            metadata: ObjectMeta {
                name: "p".into(),
                namespace: Some("x".into()),
                ..Default::default()
            },
            spec,
        }
    }

    fn ingress_port(p: PolicyPort) -> NetworkPolicy {
        policy(NetworkPolicySpec {
            ingress: Some(vec![IngressRule {
                from: None,
                ports: Some(vec![p]),
            }]),
            ..Default::default()
        })
    }

    fn egress_peer(p: Peer) -> NetworkPolicy {
        policy(NetworkPolicySpec {
            egress: Some(vec![EgressRule {
                to: Some(vec![Peer::default(), p]),
                ports: None,
            }]),
            ..Default::default()
        })
    }

    fn field(p: &NetworkPolicy) -> String {
        p.validate().expect_err("refused").field
    }

    #[test]
    fn a_plain_policy_passes() {
        let mut p = ingress_port(PolicyPort {
            protocol: Some("UDP".into()),
            port: Some(PortRef::Number(53)),
            end_port: Some(60),
        });
        p.metadata.name = "allow-dns.v1".into();
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn names_follow_kubernetes_rules() {
        let mut p = policy(Default::default());
        p.metadata.name = "a".repeat(254);
        let e = p.validate().unwrap_err();
        assert_eq!(e.field, "metadata.name");
        assert!(e.reason.contains("254 characters"), "{e}");
        p.metadata.name = "Deny_All".into();
        assert_eq!(field(&p), "metadata.name");
        p.metadata.name = "ok".into();
        p.metadata.namespace = Some("a.b".into());
        assert_eq!(field(&p), "metadata.namespace");
        p.metadata.namespace = None;
        p.api_version = "networking.k8s.io/v1beta1".into();
        assert_eq!(field(&p), "apiVersion");
    }

    #[test]
    fn ports_protocols_and_ranges() {
        let port = |protocol: Option<&str>, port: Option<PortRef>, end_port| PolicyPort {
            protocol: protocol.map(String::from),
            port,
            end_port,
        };
        let cases = [
            (
                port(Some("ICMP"), None, None),
                "spec.ingress[0].ports[0].protocol",
            ),
            (
                port(Some("tcp"), None, None),
                "spec.ingress[0].ports[0].protocol",
            ),
            (
                port(None, Some(PortRef::Number(0)), None),
                "spec.ingress[0].ports[0].port",
            ),
            (
                port(None, Some(PortRef::Number(65536)), None),
                "spec.ingress[0].ports[0].port",
            ),
            (
                port(None, Some(PortRef::Name("HTTP".into())), None),
                "spec.ingress[0].ports[0].port",
            ),
            (
                port(None, Some(PortRef::Name("a--b".into())), None),
                "spec.ingress[0].ports[0].port",
            ),
            (
                port(None, Some(PortRef::Name("1234".into())), None),
                "spec.ingress[0].ports[0].port",
            ),
            (
                port(None, None, Some(90)),
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                port(None, Some(PortRef::Name("http".into())), Some(90)),
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                port(None, Some(PortRef::Number(80)), Some(79)),
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                port(None, Some(PortRef::Number(80)), Some(70000)),
                "spec.ingress[0].ports[0].endPort",
            ),
        ];
        for (p, want) in cases {
            assert_eq!(field(&ingress_port(p.clone())), want, "{p:?}");
        }
        let ok = port(Some("SCTP"), Some(PortRef::Name("metrics-2".into())), None);
        assert_eq!(ingress_port(ok).validate(), Ok(()));
    }

    #[test]
    fn peers_and_ip_blocks() {
        let block = |cidr: &str, except: &[&str]| IpBlock {
            cidr: cidr.into(),
            except: except.iter().map(|e| e.to_string()).collect(),
        };
        let ip = |b| Peer {
            ip_block: Some(b),
            ..Default::default()
        };
        // to[0] is an empty peer (`{}`), which Kubernetes refuses too.
        let e = egress_peer(ip(block("10.0.0.0/16", &[])))
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "spec.egress[0].to[0]");

        let mut p = egress_peer(ip(block("10.0.0.0/16", &[])));
        let alone = |p: &mut NetworkPolicy, peer: Peer| {
            p.spec.egress.as_mut().unwrap()[0].to = Some(vec![peer]);
        };
        alone(
            &mut p,
            ip(block("10.0.0.0/16", &["10.0.1.0/24", "10.0.2.0/24"])),
        );
        assert_eq!(p.validate(), Ok(()));
        let cases = [
            (
                block("10.0.0.0/33", &[]),
                "spec.egress[0].to[0].ipBlock.cidr",
            ),
            (
                block("10.0.0.0/16", &["10.1.0.0/24"]),
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                block("10.0.0.0/16", &["10.0.0.0/16"]),
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                block("10.0.0.0/16", &["10.0.0.0/8"]),
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                block("10.0.0.0/16", &["10.0.1.0/24", "x"]),
                "spec.egress[0].to[0].ipBlock.except[1]",
            ),
        ];
        for (b, want) in cases {
            alone(&mut p, ip(b.clone()));
            assert_eq!(field(&p), want, "{b:?}");
        }
        let mut both = ip(block("10.0.0.0/16", &[]));
        both.pod_selector = Some(LabelSelector::default());
        alone(&mut p, both);
        assert_eq!(field(&p), "spec.egress[0].to[0]");
    }

    #[test]
    fn malformed_selectors() {
        let expr = |op: &str, values: &[&str]| Requirement {
            key: "app".into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let with = |r: Requirement| {
            policy(NetworkPolicySpec {
                pod_selector: LabelSelector {
                    match_expressions: vec![r],
                    ..Default::default()
                },
                ..Default::default()
            })
        };
        let base = "spec.podSelector.matchExpressions[0]";
        assert_eq!(field(&with(expr("In", &[]))), format!("{base}.values"));
        assert_eq!(
            field(&with(expr("Exists", &["a"]))),
            format!("{base}.values")
        );
        assert_eq!(field(&with(expr("in", &["a"]))), format!("{base}.operator"));
        assert_eq!(
            field(&with(expr("NotIn", &["bad value"]))),
            format!("{base}.values[0]")
        );
        let mut bad_key = expr("Exists", &[]);
        bad_key.key = "-app".into();
        assert_eq!(field(&with(bad_key)), format!("{base}.key"));
        assert_eq!(with(expr("NotIn", &["a", ""])).validate(), Ok(()));

        let mut p = policy(Default::default());
        p.spec
            .pod_selector
            .match_labels
            .insert("example.com/app".into(), "web".into());
        assert_eq!(p.validate(), Ok(()));
        p.spec
            .pod_selector
            .match_labels
            .insert("a".repeat(64), "web".into());
        assert_eq!(field(&p), "spec.podSelector.matchLabels");
    }

    #[test]
    fn policy_types_once_each() {
        use crate::policy::model::Direction::{Egress, Ingress};
        let mut p = policy(Default::default());
        p.spec.policy_types = Some(vec![Ingress, Egress]);
        assert_eq!(p.validate(), Ok(()));
        p.spec.policy_types = Some(vec![Egress, Egress]);
        assert_eq!(field(&p), "spec.policyTypes[1]");
    }
}
