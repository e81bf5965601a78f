//! JSON types of the control API (`/v1/nodes`), shared by `podnet-control` and the agent.
//!
//! Plain serde data plus the rules both sides must agree on: what a node name may look like
//! and how a stream of watch events folds into a table of live
//! nodes ([`NodeTable`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::ethernet::MacAddr;

/// Longest node name accepted (a DNS-1123 label).
pub const MAX_NODE_NAME_LEN: usize = 63;

/// How a node receives pod packets on the underlay: what its peers must send it.
///
/// `none` means direct routes on a shared underlay subnet, no tunnel. The control service
/// records every encapsulation alike, so a mixed cluster can be described; an agent that cannot
/// send what a peer receives answers packets for it with ICMP host unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    Ipip,
    Vxlan,
    Wireguard,
    None,
}

impl Encap {
    /// Every encapsulation, in the order the command line lists them.
    pub const ALL: [Encap; 4] = [Encap::Ipip, Encap::Vxlan, Encap::Wireguard, Encap::None];

    /// Bytes the encapsulation adds on an IPv4 underlay (outer headers included): what the
    /// overlay MTU must leave free below the underlay MTU.
    pub const fn overhead(self) -> usize {
        match self {
            Encap::Ipip => crate::ipip::OVERHEAD,
            Encap::Vxlan => crate::vxlan::OVERHEAD,
            Encap::Wireguard => crate::wireguard::OVERHEAD,
            Encap::None => 0,
        }
    }

    /// The name on the command line, in JSON and in the agent's output: the one place the
    /// wire names are written.
    pub const fn name(self) -> &'static str {
        match self {
            Encap::Ipip => "ipip",
            Encap::Vxlan => "vxlan",
            Encap::Wireguard => "wireguard",
            Encap::None => "none",
        }
    }
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Encap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Encap::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                format!("unknown encapsulation {s:?}, expected ipip, vxlan, wireguard or none")
            })
    }
}

/// A WireGuard public key (X25519, 32 bytes), written as `wg` writes it: standard base64,
/// 44 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgKey(pub [u8; 32]);

impl WgKey {
    /// The first 8 characters of the base64 form, as `status` shows a peer's key.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::Engine as _;
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

impl FromStr for WgKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| format!("{s:?} is not a WireGuard key (base64 of 32 bytes, as `wg pubkey` prints it): {e}"))?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "{s:?} is not a WireGuard key: it decodes to {} bytes, a key has 32 (44 base64 characters, as `wg pubkey` prints it)",
                b.len()
            )
        })?;
        Ok(WgKey(key))
    }
}

impl Serialize for WgKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Body of `PUT /v1/nodes/{name}`: join, or renew the lease (heartbeat).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub underlay_ip: Ipv4Addr,
    pub encap: Encap,
    /// Defaults to [`MacAddr::vtep_for`] the underlay IP (`02:00:` + its four bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<MacAddr>,
    /// The node's WireGuard public key: required with `encap` `wireguard`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<WgKey>,
}

/// Answer to a registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The node name, as registered.
    pub node: String,
    pub pod_cidr: Ipv4Net,
    /// The whole overlay: agents route it into their TUN device.
    pub cluster_cidr: Ipv4Net,
    /// The node's IPv6 pod CIDR, when the service runs dual-stack (`--cluster-cidr-v6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// The whole IPv6 overlay, when the service runs dual-stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_cidr_v6: Option<Ipv6Net>,
    /// Renew well before this runs out (the client library renews at a third of it).
    pub lease_ttl_s: u64,
    /// The same lease in milliseconds, for sub-second test settings.
    pub lease_ttl_ms: u64,
    /// Revision of the node record after this registration.
    pub revision: u64,
    /// The service's clock (Unix milliseconds, the clock heartbeat times are on) when it
    /// answered, so a client can relate those times to its own clock without the hosts'
    /// clocks agreeing. Absent from older services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time_ms: Option<u64>,
}

/// Whether a node holds a live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Down,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
        })
    }
}

/// One node as the control service knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub encap: Encap,
    pub vtep_mac: MacAddr,
    pub pod_cidr: Ipv4Net,
    /// Its IPv6 pod CIDR, on a dual-stack cluster: the IPv6 block with the index of its IPv4
    /// block, so it is as stable and as unique as that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// Its WireGuard public key (nodes with encap `wireguard` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<WgKey>,
    pub state: NodeState,
    /// Unix time in milliseconds of the last registration or renewal.
    pub last_heartbeat: u64,
    /// Revision at which this record last changed (renewals alone do not change it).
    pub revision: u64,
}

/// Answer to `GET /v1/nodes`: every known node, live or down, sorted by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    pub revision: u64,
    pub nodes: Vec<Node>,
    /// The service's clock when it answered (see [`RegisterResponse::server_time_ms`]), so
    /// heartbeat ages can be told on it. Absent from older services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time_ms: Option<u64>,
}

/// Kind of change in a watch stream (Kubernetes watch style).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// A node became live: new, or back after its lease lapsed.
    Added,
    /// A live node changed its underlay IP, encapsulation or VTEP MAC.
    Modified,
    /// A node left or its lease lapsed: withdraw it from forwarding tables.
    Deleted,
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventType::Added => "added",
            EventType::Modified => "modified",
            EventType::Deleted => "deleted",
        })
    }
}

/// One line of the NDJSON stream of `GET /v1/nodes?watch=true`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub revision: u64,
    pub node: Node,
}

/// Body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Short machine-readable kind, e.g. `conflict`, `bad_request`.
    pub error: String,
    /// What went wrong and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(detail) => write!(f, "{}: {}", self.error, detail),
            None => f.write_str(&self.error),
        }
    }
}

/// The live nodes an agent forwards to, folded from a list and the watch events after it.
///
/// Agents persist it so a restart while the control service is away still forwards, and resume
/// their watch from `revision`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTable {
    pub revision: u64,
    /// Live (`up`) nodes by name.
    pub nodes: BTreeMap<String, Node>,
}

impl NodeTable {
    /// The live part of a full list.
    pub fn from_list(list: NodeList) -> NodeTable {
        let nodes = list
            .nodes
            .into_iter()
            .filter(|n| n.state == NodeState::Up)
            .map(|n| (n.name.clone(), n))
            .collect();
        NodeTable {
            revision: list.revision,
            nodes,
        }
    }

    /// Folds one event in and returns whether the set of live nodes changed. Events older
    /// than the table are ignored; applying the same event twice is harmless (a resumed watch
    /// may repeat one, and a watch without `since` starts with every live node as `added`, all
    /// at the current revision).
    pub fn apply(&mut self, event: &WatchEvent) -> bool {
        if event.revision < self.revision {
            return false;
        }
        self.revision = event.revision;
        let live = event.kind != EventType::Deleted && event.node.state == NodeState::Up;
        if live {
            if self.nodes.get(&event.node.name) == Some(&event.node) {
                return false;
            }
            self.nodes
                .insert(event.node.name.clone(), event.node.clone());
            true
        } else {
            self.nodes.remove(&event.node.name).is_some()
        }
    }

    /// Live nodes other than `own`, the peers an agent forwards to.
    pub fn peers<'a>(&'a self, own: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.values().filter(move |n| n.name != own)
    }
}

/// Why a node name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("node name is empty")]
    Empty,
    #[error("node name is {0} characters long, at most {MAX_NODE_NAME_LEN} are allowed")]
    TooLong(usize),
    #[error("node name contains {0:?}; use lowercase letters, digits and '-'")]
    BadChar(char),
    #[error("node name must start and end with a lowercase letter or digit")]
    BadEdge,
}

/// Checks a node name: a DNS-1123 label (`[a-z0-9]([a-z0-9-]*[a-z0-9])?`, at most 63 characters),
/// the same rule Kubernetes applies to node names, so names work in URLs and file names as is.
pub fn validate_node_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::BadChar(c));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::BadEdge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_encapsulation_has_one_name_in_json_on_the_command_line_and_in_output() {
        for e in Encap::ALL {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{}\"", e.name()));
            assert_eq!(serde_json::from_str::<Encap>(&json).unwrap(), e);
            assert_eq!(e.name().parse::<Encap>(), Ok(e));
            assert_eq!(e.to_string(), e.name());
        }
        let err = "gre".parse::<Encap>().unwrap_err();
        assert!(err.contains("ipip, vxlan, wireguard or none"), "{err}");
        let overheads = Encap::ALL.map(Encap::overhead);
        assert_eq!(overheads, [20, 50, 60, 0]);
    }

    fn node(name: &str, state: NodeState, revision: u64) -> Node {
        Node {
            wireguard_public_key: None,
            name: name.to_string(),
            underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
            encap: Encap::Vxlan,
            vtep_mac: MacAddr::vtep_for(Ipv4Addr::new(198, 18, 0, 1)),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            pod_cidr_v6: None,
            state,
            last_heartbeat: 1_700_000_000_000,
            revision,
        }
    }

    #[test]
    fn node_names_follow_dns_labels() {
        assert_eq!(validate_node_name("h1"), Ok(()));
        assert_eq!(validate_node_name("node-7-a"), Ok(()));
        assert_eq!(validate_node_name(&"a".repeat(63)), Ok(()));
        assert_eq!(validate_node_name(""), Err(NameError::Empty));
        assert_eq!(
            validate_node_name(&"a".repeat(64)),
            Err(NameError::TooLong(64))
        );
        assert_eq!(validate_node_name("H1"), Err(NameError::BadChar('H')));
        assert_eq!(validate_node_name("a.b"), Err(NameError::BadChar('.')));
        assert_eq!(validate_node_name("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(validate_node_name("-a"), Err(NameError::BadEdge));
        assert_eq!(validate_node_name("a-"), Err(NameError::BadEdge));
    }

    #[test]
    fn wire_names_are_lowercase() {
        let ev = WatchEvent {
            kind: EventType::Added,
            revision: 3,
            node: node("h1", NodeState::Up, 3),
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "added");
        assert_eq!(json["node"]["encap"], "vxlan");
        assert_eq!(json["node"]["state"], "up");
        assert_eq!(json["node"]["pod_cidr"], "10.244.1.0/24");
        assert_eq!(json["node"]["vtep_mac"], "02:00:c6:12:00:01");
        let back: WatchEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);

        let req: RegisterRequest =
            serde_json::from_str(r#"{"underlay_ip":"198.18.0.2","encap":"ipip"}"#).unwrap();
        assert_eq!(req.encap, Encap::Ipip);
        assert_eq!(req.vtep_mac, None);
        assert!(serde_json::from_str::<RegisterRequest>(
            r#"{"underlay_ip":"198.18.0.2","encap":"IPIP"}"#
        )
        .is_err());
    }

    /// `server_time_ms` is optional both ways: answers of older services (without it) parse,
    /// and it is sent only when known.
    #[test]
    fn service_time_is_optional_on_the_wire() {
        let old: NodeList = serde_json::from_str(r#"{"revision":1,"nodes":[]}"#).unwrap();
        assert_eq!(old.server_time_ms, None);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"revision":1,"nodes":[]}"#
        );
        let new = NodeList {
            server_time_ms: Some(1_700_000_000_123),
            ..old
        };
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains(r#""server_time_ms":1700000000123"#), "{text}");
        let lease = r#"{"node":"h1","pod_cidr":"10.244.1.0/24","cluster_cidr":"10.244.0.0/16",
            "lease_ttl_s":20,"lease_ttl_ms":20000,"revision":3}"#;
        let lease: RegisterResponse = serde_json::from_str(lease).unwrap();
        assert_eq!(lease.server_time_ms, None);
    }

    #[test]
    fn table_folds_events_and_skips_repeats() {
        let mut table = NodeTable::from_list(NodeList {
            revision: 5,
            nodes: vec![node("h1", NodeState::Up, 2), node("h2", NodeState::Down, 5)],
            server_time_ms: None,
        });
        assert_eq!(table.nodes.keys().collect::<Vec<_>>(), ["h1"]);

        let added = WatchEvent {
            kind: EventType::Added,
            revision: 6,
            node: node("h3", NodeState::Up, 6),
        };
        assert!(table.apply(&added));
        assert!(!table.apply(&added), "a repeated event changes nothing");
        assert_eq!(table.revision, 6);
        assert_eq!(
            table
                .peers("h1")
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["h3"]
        );

        let deleted = WatchEvent {
            kind: EventType::Deleted,
            revision: 7,
            node: node("h1", NodeState::Down, 7),
        };
        assert!(table.apply(&deleted));
        assert_eq!(table.nodes.keys().collect::<Vec<_>>(), ["h3"]);
        assert_eq!(table.revision, 7);
        assert!(
            !table.apply(&added),
            "an event older than the table is ignored"
        );
        assert_eq!(table.revision, 7);

        // A watch without `since` opens with every live node as `added` at one revision.
        let mut fresh = NodeTable::default();
        for name in ["a", "b"] {
            let ev = WatchEvent {
                kind: EventType::Added,
                revision: 9,
                node: node(name, NodeState::Up, 3),
            };
            assert!(fresh.apply(&ev));
        }
        assert_eq!(fresh.nodes.len(), 2);
    }
}
