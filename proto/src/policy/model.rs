//! The document types, in Kubernetes' JSON shape.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The API group and version of every document podnet accepts.
pub const API_VERSION: &str = "networking.k8s.io/v1";
/// The label every namespace carries with its own name, as Kubernetes sets it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Labels of a pod or a namespace.
pub type Labels = BTreeMap<String, String>;

/// One `NetworkPolicy` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NetworkPolicySpec,
}

fn api_version() -> String {
    API_VERSION.to_string()
}

fn kind() -> String {
    "NetworkPolicy".to_string()
}

/// The part of Kubernetes' object metadata a policy needs. Other fields (`uid`,
/// `resourceVersion`, ... as `kubectl get -o yaml` prints them) are read and ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// `default` when omitted, as `kubectl apply` without `-n` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

impl NetworkPolicy {
    /// The policy's namespace (`default` when the document names none).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `NAMESPACE/NAME`, as the CLI and the agent's output name a policy.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }

    /// Whether the policy isolates the pods it selects for `direction`: the listed
    /// `policyTypes`, or by default ingress always and egress when there are egress rules.
    pub fn applies_to(&self, direction: Direction) -> bool {
        match &self.spec.policy_types {
            Some(types) => types.contains(&direction),
            None => match direction {
                Direction::Ingress => true,
                Direction::Egress => self.spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
            },
        }
    }
}

/// What a policy says. Unknown fields are refused (a misspelt `podSelecter` must not silently
/// select every pod).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    /// The pods of the policy's namespace it applies to; empty selects all of them.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<Direction>>,
}

/// A direction of traffic relative to the selected pod, as `policyTypes` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// The lowercase name metrics and the CLI use.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Traffic a selected pod accepts: from any of `from` (all sources when absent or empty), to
/// any of `ports` (all ports when absent or empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PolicyPort>>,
}

/// Traffic a selected pod may send: to any of `to`, on any of `ports` (absent or empty: all).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PolicyPort>>,
}

/// The other end of a rule: pods by label (in the policy's namespace, or in the namespaces the
/// namespace selector picks; both given means both must match), or addresses by CIDR.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// Addresses in `cidr` but in none of `except`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// A port, a named port or a port range (`port`..=`endPort`) of one protocol (TCP when
/// omitted). Without `port`, every port of the protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

impl PolicyPort {
    /// The protocol, TCP when omitted. Only meaningful after validation, which refuses any
    /// other name than TCP, UDP and SCTP.
    pub fn protocol(&self) -> Protocol {
        self.protocol
            .as_deref()
            .and_then(Protocol::from_name)
            .unwrap_or(Protocol::Tcp)
    }
}

/// A port number or the name of a port a pod declares (Kubernetes' `IntOrString`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(i64),
    Name(String),
}

impl<'de> Deserialize<'de> for PortRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortRef;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (80) or the name of a port the pod declares (\"http\")")
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortRef, E> {
                Ok(PortRef::Number(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRef, E> {
                i64::try_from(v)
                    .map(PortRef::Number)
                    .map_err(|_| E::custom(format!("{v} is not a port; use 1 to 65535")))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortRef, E> {
                Ok(PortRef::Name(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The transport protocols a policy can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The name as a policy writes it (`TCP`).
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The protocol a policy names, exactly as Kubernetes spells it (upper case).
    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A port a pod declares by name (`PODNET_PORTS=http:8080/TCP`), for policies that name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// Kubernetes' label selector: every `matchLabels` pair and every expression must hold. An
/// empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: Labels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist` (validation refuses anything else).
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_read_as_kubernetes_writes_them() {
        // As `kubectl get -o json` prints it: metadata fields podnet does not use, a status.
        let text = r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": "shop", "uid": "1", "resourceVersion": "7"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                  "ports": [{"port": "http"}, {"port": 443, "protocol": "TCP"}]}]}}"#;
        let p: NetworkPolicy = serde_json::from_str(text).unwrap();
        assert_eq!(p.key(), "shop/web");
        assert_eq!(p.validate(), Ok(()));
        let ports = p.spec.ingress.as_ref().unwrap()[0].ports.clone().unwrap();
        assert_eq!(ports[0].port, Some(PortRef::Name("http".into())));
        assert_eq!(ports[1].port, Some(PortRef::Number(443)));
        assert!(p.applies_to(Direction::Ingress) && !p.applies_to(Direction::Egress));
        // Written back, it reads the same.
        let again: NetworkPolicy =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn a_misspelt_spec_field_is_refused() {
        let text = r#"{"metadata": {"name": "p"}, "spec": {"podSelecter": {}}}"#;
        let e = serde_json::from_str::<NetworkPolicy>(text).unwrap_err();
        assert!(e.to_string().contains("unknown field `podSelecter`"), "{e}");
    }

    #[test]
    fn a_port_is_a_number_or_a_name() {
        let port = |v: serde_json::Value| serde_json::from_value::<PortRef>(v);
        assert_eq!(port(serde_json::json!(80)).unwrap(), PortRef::Number(80));
        assert_eq!(
            port(serde_json::json!("http")).unwrap(),
            PortRef::Name("http".into())
        );
        let e = port(serde_json::json!([80])).unwrap_err().to_string();
        assert!(
            e.contains("a port number (80) or the name of a port"),
            "{e}"
        );
    }

    #[test]
    fn the_namespace_defaults_to_default() {
        let p: NetworkPolicy = serde_json::from_str(r#"{"metadata": {"name": "p"}}"#).unwrap();
        assert_eq!(p.key(), "default/p");
        assert_eq!(
            (p.api_version.as_str(), p.kind.as_str()),
            (API_VERSION, "NetworkPolicy")
        );
    }
}
