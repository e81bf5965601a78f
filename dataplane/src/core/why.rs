//! `podnet-agent why <ip>`: where a packet to that address would go from this node, and why.
//!
//! [`explain`] is a pure function of the node configuration and the route table: it asks the
//! forwarder's own routing rules ([`forward::route`]) and describes the outcome, so the answer
//! can never drift from what the data path does. The admin API adds what only the shell knows
//! (the peer's lease state from the control service) through [`Answer::with_control`].

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use podnet_proto::api::{self, Encap};
use podnet_proto::ethernet::MacAddr;
use podnet_proto::icmp;
use serde::{Deserialize, Serialize};

use crate::core::drops::DropReason;
use crate::core::forward::{self, NodeConfig, Route};
use crate::core::routing::{PeerPath, Routing};
use crate::core::table::{Peer, PeerEncap, RouteTable};

/// What happens to a packet for the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Encapsulated and sent to a peer.
    Forward,
    /// This node's own pod CIDR: the kernel delivers it on the pod bridge, never via `tunl0`.
    Local,
    /// Dropped by the forwarder (with an ICMP error when `icmp` is set).
    Drop,
}

/// The peer a packet is forwarded to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoute {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    /// What the peer receives.
    #[serde(default)]
    pub encap: String,
}

/// The peer's membership as the control service reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLease {
    /// `up`, `down`, or `unknown` when the control service does not know the node.
    pub state: String,
    /// Unix time in milliseconds of the last registration or renewal.
    pub last_heartbeat_ms: Option<u64>,
    /// Milliseconds since then, at the time of the answer.
    pub heartbeat_age_ms: Option<u64>,
}

/// Answer to `/why?ip=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub ip: Ipv4Addr,
    pub verdict: Verdict,
    /// Stable drop reason name (as in the `reason` metric label) when the verdict is `drop`, or
    /// the reason a packet for a local address would be dropped if it reached `tunl0`.
    pub reason: Option<String>,
    /// ICMP error the sender gets, e.g. `host unreachable`.
    pub icmp: Option<String>,
    /// The longest prefix that matched, if any.
    pub prefix: Option<Ipv4Net>,
    pub peer: Option<PeerRoute>,
    /// The node answering.
    pub node: String,
    /// The encapsulation a packet to `ip` is sent in (the peer's), or this node's own.
    pub encap: String,
    pub vni: Option<u32>,
    /// The largest inner packet on that path (the `tunl0` MTU, or less to a peer whose
    /// encapsulation has more overhead): larger packets with DF get fragmentation-needed.
    pub mtu: u16,
    pub table_revision: u64,
    /// `static` or `control`; for `control` and a forwarded address, `lease` says how the peer's
    /// lease looks (absent when the control service could not be asked).
    pub membership: String,
    pub lease: Option<PeerLease>,
    /// A WireGuard peer's tunnel as the data path reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelInfo>,
    /// With a source (`why SRC DST [PORT/PROTO]`): what network policy says at each end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyAnswer>,
    /// One sentence a human can act on.
    pub explanation: String,
}

/// A WireGuard tunnel's state in a `why` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// The peer's public key, short form (its first 8 base64 characters).
    pub key: String,
    /// Milliseconds since the last handshake completed (`None`: none yet).
    pub last_handshake_ms: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// How a packet from this node to `ip` is handled, with the table as it is now and `routing`
/// deciding which peers the kernel reaches by direct routes.
pub fn explain(
    config: &NodeConfig,
    routing: &Routing,
    table: &RouteTable,
    ip: Ipv4Addr,
    control: bool,
) -> Answer {
    let mut answer = Answer {
        ip,
        verdict: Verdict::Drop,
        reason: None,
        icmp: None,
        prefix: None,
        peer: None,
        node: config.node.clone(),
        encap: config.encap.name().into(),
        vni: (config.encap == Encap::Vxlan).then(|| config.vni.get()),
        mtu: config.mtu,
        table_revision: table.revision(),
        membership: if control { "control" } else { "static" }.into(),
        lease: None,
        tunnel: None,
        policy: None,
        explanation: String::new(),
    };
    let route = forward::route(config, table, ip);
    // A peer the kernel reaches by a direct route: the packet never gets to tunl0.
    let via_tunl0 = matches!(
        route,
        Route::Peer(_)
            | Route::Unreachable {
                reason: DropReason::PeerEncap,
                ..
            }
    );
    let direct = table
        .lookup(ip)
        .filter(|&i| via_tunl0 && routing.path(table.peer(i)) == PeerPath::Direct);
    if let Some(i) = direct {
        let p = table.peer(i);
        answer.verdict = Verdict::Forward;
        answer.prefix = Some(p.pod_cidr);
        answer.peer = Some(peer_route(p));
        answer.encap = "none".into();
        answer.vni = None;
        answer.explanation = format!(
            "{ip} is in {} held by node {}, on this node's underlay subnet {}: the kernel routes \
             it directly via {} (no encapsulation, the agent's direct route)",
            p.pod_cidr, p.node, routing.underlay_net, p.underlay_ip
        );
        return answer;
    }
    match route {
        Route::Peer(i) => {
            let p = table.peer(i);
            answer.verdict = Verdict::Forward;
            answer.prefix = Some(p.pod_cidr);
            answer.peer = Some(peer_route(p));
            set_encap(&mut answer, config, &p.encap);
            answer.mtu = config.mtu_to(&p.encap).unwrap_or(config.mtu);
            let differs = if p.encap.name() == config.encap.name() {
                String::new()
            } else {
                format!(
                    " (it receives {}, this node {}: each peer is sent what it receives)",
                    p.encap.name(),
                    config.encap.name()
                )
            };
            answer.explanation = format!(
                "{ip} is in {} held by node {}: encapsulated with {} and sent to {} on the \
                 underlay{differs}",
                p.pod_cidr,
                p.node,
                p.encap.name(),
                p.underlay_ip
            );
        }
        Route::Unreachable {
            reason: reason @ DropReason::PeerEncap,
            code,
        } => {
            // route() found the peer, and this node cannot send what it receives.
            let p = table.lookup(ip).map(|i| table.peer(i));
            answer.reason = Some(reason.name().into());
            answer.icmp = Some(icmp_name(code).into());
            if let Some(p) = p {
                let why = match routing.path(p) {
                    PeerPath::Refused(why) => why,
                    _ => config.mtu_to(&p.encap).err().unwrap_or_default().into(),
                };
                answer.prefix = Some(p.pod_cidr);
                answer.peer = Some(peer_route(p));
                set_encap(&mut answer, config, &p.encap);
                answer.explanation = format!(
                    "{ip} is in {} held by node {}, which receives {}; this node cannot send \
                     that ({why}): dropped as {reason}, the sender gets ICMP {}",
                    p.pod_cidr,
                    p.node,
                    p.encap.name(),
                    icmp_name(code)
                );
            }
        }
        Route::Drop(reason) if config.pod_cidr.contains(&ip) => {
            answer.verdict = Verdict::Local;
            answer.reason = Some(reason.name().into());
            answer.prefix = Some(config.pod_cidr);
            answer.explanation = format!(
                "{ip} is in this node's own pod CIDR {}: the kernel delivers it on the pod bridge; \
                 a packet for it that reaches tunl0 is dropped as {reason}",
                config.pod_cidr
            );
        }
        Route::Drop(reason) => {
            // The table sends it back to this node's own underlay address.
            answer.reason = Some(reason.name().into());
            answer.prefix = table.lookup(ip).map(|i| table.peer(i).pod_cidr);
            answer.explanation = format!(
                "{ip} is routed to this node's own underlay address {}: dropped as {reason} \
                 to avoid a loop; two nodes claim the same underlay IP",
                config.underlay_ip
            );
        }
        Route::Unreachable { reason, code } => {
            answer.reason = Some(reason.name().into());
            answer.icmp = Some(icmp_name(code).into());
            answer.explanation = if config.cluster_cidr.contains(&ip) {
                format!(
                    "{ip} is inside the cluster CIDR {} but no node holds a pod CIDR containing it \
                     (table revision {}): dropped as {reason}, the sender gets ICMP {}",
                    config.cluster_cidr,
                    table.revision(),
                    icmp_name(code)
                )
            } else {
                format!(
                    "{ip} is outside the cluster CIDR {}: podnet does not carry it (only the \
                     cluster route points into tunl0); dropped as {reason}, ICMP {}",
                    config.cluster_cidr,
                    icmp_name(code)
                )
            };
        }
    }
    answer
}

fn peer_route(p: &Peer) -> PeerRoute {
    PeerRoute {
        node: p.node.clone(),
        underlay_ip: p.underlay_ip,
        vtep_mac: p.vtep_mac,
        encap: p.encap.name().into(),
    }
}

fn icmp_name(code: u8) -> &'static str {
    match code {
        icmp::code::NET_UNREACHABLE => "net unreachable",
        icmp::code::HOST_UNREACHABLE => "host unreachable",
        icmp::code::FRAG_NEEDED => "fragmentation needed",
        _ => "destination unreachable",
    }
}

impl Answer {
    /// Adds the peer's lease as the control service reports it (`node` is `None` when the
    /// service does not know the peer), at wall-clock time `now_ms`.
    pub fn with_control(mut self, node: Option<&api::Node>, now_ms: u64) -> Self {
        self.lease = Some(match node {
            Some(n) => PeerLease {
                state: n.state.to_string(),
                last_heartbeat_ms: Some(n.last_heartbeat),
                heartbeat_age_ms: Some(now_ms.saturating_sub(n.last_heartbeat)),
            },
            None => PeerLease {
                state: "unknown".into(),
                last_heartbeat_ms: None,
                heartbeat_age_ms: None,
            },
        });
        self
    }
}

/// The answer names the peer's encapsulation, with a VNI only where that is VXLAN (a VNI means
/// nothing to IP-in-IP or WireGuard, whatever this node runs).
fn set_encap(answer: &mut Answer, config: &NodeConfig, encap: &PeerEncap) {
    answer.encap = encap.name().into();
    answer.vni = (*encap == PeerEncap::Vxlan).then(|| config.vni.get());
}

/// Human-readable `podnet-agent why`.
/// What network policy says of a connection, at each end, in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyAnswer {
    pub src: Ipv4Addr,
    /// `PORT/PROTO`, or `any` when none was given.
    pub port: String,
    pub allowed: bool,
    pub egress: String,
    pub ingress: String,
}

impl PolicyAnswer {
    /// The verdict of `decide` for `src` to `dst` on `port` (`None`: any port, asked as TCP 0).
    pub fn new(
        cluster: &podnet_proto::policy::Cluster,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        port: Option<(u16, podnet_proto::policy::Protocol)>,
    ) -> PolicyAnswer {
        use podnet_proto::policy::{Decision, Protocol};
        let (number, protocol) = port.unwrap_or((0, Protocol::Tcp));
        let v = cluster.decide(src.into(), dst.into(), number, protocol);
        let words = |d: &Decision, who: &str| match d {
            Decision::NotAPod => format!("{who} is not a pod: no policy applies"),
            Decision::Unisolated => "no policy isolates it: allowed".to_string(),
            Decision::Allowed(by) => format!("allowed by {}", by.join(", ")),
            Decision::Denied(by) => format!(
                "denied: isolated by {}, and none of them allows it",
                by.join(", ")
            ),
        };
        PolicyAnswer {
            src,
            port: port.map_or("any".to_string(), |(n, p)| format!("{n}/{p}")),
            allowed: v.allowed(),
            egress: words(&v.egress, &src.to_string()),
            ingress: words(&v.ingress, &dst.to_string()),
        }
    }
}

pub fn format(a: &Answer) -> String {
    let mut out = String::new();
    let verdict = match (&a.verdict, &a.peer, &a.reason) {
        (Verdict::Forward, Some(p), _) => format!("forward to {}", p.node),
        (Verdict::Local, ..) => "local (pod bridge)".into(),
        (_, _, Some(r)) => format!("drop ({r})"),
        _ => "drop".into(),
    };
    let _ = writeln!(out, "{}: {verdict}", a.ip);
    let prefix = a
        .prefix
        .map(|p| p.to_string())
        .unwrap_or_else(|| "none".into());
    let _ = writeln!(
        out,
        "  match:       {prefix} (longest prefix, table revision {})",
        a.table_revision
    );
    if let Some(p) = &a.peer {
        let _ = writeln!(
            out,
            "  peer:        {} underlay {} VTEP MAC {}",
            p.node, p.underlay_ip, p.vtep_mac
        );
    }
    let vni = a.vni.map(|v| format!(" vni {v}")).unwrap_or_default();
    let _ = writeln!(
        out,
        "  encap:       {}{vni}, overlay MTU {} (from {})",
        a.encap, a.mtu, a.node
    );
    if let Some(l) = &a.lease {
        let age = l
            .heartbeat_age_ms
            .map(|ms| format!(", last heartbeat {:.1}s ago", ms as f64 / 1000.0))
            .unwrap_or_default();
        let _ = writeln!(out, "  lease:       {}{age}", l.state);
    } else if a.verdict == Verdict::Forward {
        let _ = writeln!(
            out,
            "  lease:       {}",
            if a.membership == "static" {
                "static peer (no control service)"
            } else {
                "control service not reachable"
            }
        );
    }
    if let Some(t) = &a.tunnel {
        let last = match t.last_handshake_ms {
            Some(ms) => format!("last handshake {:.1}s ago", ms as f64 / 1000.0),
            None => "no handshake yet (the first packet starts one)".into(),
        };
        let _ = writeln!(
            out,
            "  wireguard:   peer key {}, {last}, {} B out / {} B in",
            t.key, t.tx_bytes, t.rx_bytes
        );
    }
    if let Some(i) = &a.icmp {
        let _ = writeln!(out, "  icmp:        {i}");
    }
    if let Some(p) = &a.policy {
        let verdict = if p.allowed { "allowed" } else { "denied" };
        let _ = writeln!(
            out,
            "  policy:      {} -> {} {}: {verdict}\n    egress of {}: {}\n    ingress of {}: {}",
            p.src, a.ip, p.port, p.src, p.egress, a.ip, p.ingress
        );
    }
    let _ = writeln!(out, "  why:         {}", a.explanation);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use podnet_proto::vxlan::Vni;

    use super::*;
    use crate::core::drops::Counters;
    use crate::core::forward::Forwarder;

    use crate::core::table::test_peer as peer;

    fn config() -> NodeConfig {
        let underlay_ip = Ipv4Addr::new(198, 18, 0, 1);
        NodeConfig {
            node: "h1".into(),
            underlay_ip,
            vtep_mac: MacAddr::vtep_for(underlay_ip),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            encap: Encap::Vxlan,
            vni: Vni::new(7).unwrap(),
            mtu: 1450,
            send: crate::core::forward::SendPaths::all(1450, 1500),
            icmp_source: "10.244.1.0".parse().unwrap(),
        }
    }

    fn tunnel() -> Routing {
        Routing {
            mode: crate::core::routing::Mode::Tunnel,
            underlay_net: "198.18.0.0/24".parse().unwrap(),
        }
    }

    #[test]
    fn a_direct_peer_is_routed_by_the_kernel_and_a_refused_one_says_why() {
        let mut far = peer("h3", 3);
        far.underlay_ip = "198.18.1.3".parse().unwrap();
        let t = RouteTable::build(1, vec![peer("h2", 2), far]).unwrap();
        let mut routing = tunnel();
        routing.mode = crate::core::routing::Mode::CrossSubnet;
        let a = explain(
            &config(),
            &routing,
            &t,
            "10.244.2.9".parse().unwrap(),
            false,
        );
        assert_eq!((a.verdict, a.encap.as_str()), (Verdict::Forward, "none"));
        assert!(
            a.explanation
                .contains("the kernel routes it directly via 198.18.0.2"),
            "{}",
            a.explanation
        );
        let a = explain(
            &config(),
            &routing,
            &t,
            "10.244.3.9".parse().unwrap(),
            false,
        );
        assert_eq!((a.verdict, a.encap.as_str()), (Verdict::Forward, "vxlan"));
        // --encap none: the far peer is refused, and why says so.
        let mut none = config();
        none.encap = Encap::None;
        let why = "this node runs --encap none".to_string();
        none.send = crate::core::forward::SendPaths {
            ipip: Err(why.clone()),
            vxlan: Err(why.clone()),
            wireguard: Err(why),
        };
        routing.mode = crate::core::routing::Mode::Direct;
        let a = explain(&none, &routing, &t, "10.244.3.9".parse().unwrap(), false);
        assert_eq!(a.reason.as_deref(), Some("peer_encap"));
        assert!(
            a.explanation
                .contains("198.18.1.3 is not on the underlay subnet"),
            "{}",
            a.explanation
        );
        let a = explain(&none, &routing, &t, "10.244.2.9".parse().unwrap(), false);
        assert_eq!(a.verdict, Verdict::Forward);
    }

    fn table() -> RouteTable {
        let mut wide = peer("wide", 3);
        wide.pod_cidr = "10.244.16.0/20".parse().unwrap();
        RouteTable::build(9, vec![peer("h2", 2), wide]).unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_of_another_encapsulation_is_named_with_it_or_with_why_it_is_unreachable() {
        let mut h2 = peer("h2", 2);
        h2.encap = PeerEncap::Ipip;
        let mut h3 = peer("h3", 3);
        h3.encap = PeerEncap::Unsupported("wireguard".into());
        let t = RouteTable::build(4, vec![h2, h3]).unwrap();
        let a = explain(
            &config(),
            &tunnel(),
            &t,
            "10.244.2.9".parse().unwrap(),
            false,
        );
        assert_eq!(a.verdict, Verdict::Forward);
        assert_eq!((a.encap.as_str(), a.vni, a.mtu), ("ipip", None, 1450));
        assert_eq!(a.peer.as_ref().map(|p| p.encap.as_str()), Some("ipip"));
        assert!(
            a.explanation.contains("encapsulated with ipip")
                && a.explanation.contains("it receives ipip, this node vxlan"),
            "{}",
            a.explanation
        );
        let a = explain(
            &config(),
            &tunnel(),
            &t,
            "10.244.3.9".parse().unwrap(),
            false,
        );
        assert_eq!(a.verdict, Verdict::Drop);
        assert_eq!(a.reason.as_deref(), Some("peer_encap"));
        assert_eq!(a.icmp.as_deref(), Some("host unreachable"));
        assert_eq!(a.peer.as_ref().map(|p| p.node.as_str()), Some("h3"));
        assert!(
            a.explanation.contains("which receives wireguard")
                && a.explanation.contains("does not speak"),
            "{}",
            a.explanation
        );
        assert!(format(&a).contains("drop (peer_encap)"), "{}", format(&a));
        // A VXLAN node names the peer's encapsulation without its own VNI.
        assert_eq!((a.encap.as_str(), a.vni), ("wireguard", None));
        assert!(
            format(&a).contains("encap:       wireguard, overlay MTU"),
            "{}",
            format(&a)
        );
    }

    #[test]
    fn a_remote_address_names_the_peer_and_the_encapsulation() {
        let a = explain(&config(), &tunnel(), &table(), ip("10.244.2.77"), false);
        assert_eq!(a.verdict, Verdict::Forward);
        assert_eq!(a.prefix, Some("10.244.2.0/24".parse().unwrap()));
        let p = a.peer.as_ref().unwrap();
        assert_eq!(p.node, "h2");
        assert_eq!(p.underlay_ip, ip("198.18.0.2"));
        assert_eq!(p.vtep_mac.to_string(), "02:00:c6:12:00:02");
        assert_eq!((a.encap.as_str(), a.vni, a.mtu), ("vxlan", Some(7), 1450));
        assert_eq!(a.table_revision, 9);
        assert_eq!(a.reason, None);
        let text = format(&a);
        assert!(text.starts_with("10.244.2.77: forward to h2\n"), "{text}");
        assert!(text.contains("vxlan vni 7, overlay MTU 1450"), "{text}");
        assert!(text.contains("static peer"), "{text}");
    }

    #[test]
    fn the_longest_prefix_is_reported() {
        let a = explain(&config(), &tunnel(), &table(), ip("10.244.31.1"), false);
        assert_eq!(a.peer.unwrap().node, "wide");
        assert_eq!(a.prefix, Some("10.244.16.0/20".parse().unwrap()));
    }

    #[test]
    fn unroutable_addresses_get_the_forwarders_reason() {
        let c = config();
        let t = table();
        for (addr, verdict, reason, icmp) in [
            ("10.244.1.5", Verdict::Local, "own_cidr", None),
            (
                "10.244.200.1",
                Verdict::Drop,
                "no_route",
                Some("host unreachable"),
            ),
            (
                "192.0.2.1",
                Verdict::Drop,
                "outside_cluster",
                Some("net unreachable"),
            ),
        ] {
            let a = explain(&c, &tunnel(), &t, ip(addr), true);
            assert_eq!(a.verdict, verdict, "{addr}");
            assert_eq!(a.reason.as_deref(), Some(reason), "{addr}");
            assert_eq!(a.icmp.as_deref(), icmp, "{addr}");
            assert!(a.peer.is_none(), "{addr}");
            assert!(a.explanation.contains(reason), "{addr}: {}", a.explanation);
        }
    }

    #[test]
    fn a_table_entry_for_our_own_underlay_is_a_loop() {
        let mut me = peer("ghost", 1);
        me.pod_cidr = "10.244.50.0/24".parse().unwrap();
        let t = RouteTable::build(1, vec![me]).unwrap();
        let a = explain(&config(), &tunnel(), &t, ip("10.244.50.1"), false);
        assert_eq!(a.verdict, Verdict::Drop);
        assert_eq!(a.reason.as_deref(), Some("own_cidr"));
        assert_eq!(a.prefix, Some("10.244.50.0/24".parse().unwrap()));
    }

    /// `why` and the forwarder agree on every address of a sweep: same peer, same drop reason.
    #[test]
    fn agrees_with_the_forwarder() {
        let c = config();
        let t = table();
        let f = Forwarder::new(c.clone(), Arc::new(Counters::new()));
        for third in [0u8, 1, 2, 3, 15, 16, 31, 32, 255] {
            for host in [0u8, 1, 255] {
                let dst = Ipv4Addr::new(10, 244, third, host);
                let mut packet = [
                    0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 244, 1, 2, 0, 0, 0, 0,
                ];
                packet[16..20].copy_from_slice(&dst.octets());
                let sum = podnet_proto::checksum::checksum(&packet);
                packet[10..12].copy_from_slice(&sum.to_be_bytes());
                let a = explain(&c, &tunnel(), &t, dst, false);
                match f.classify(&t, &packet) {
                    Route::Peer(i) => {
                        assert_eq!(a.peer.unwrap().node, t.peer(i).node, "{dst}")
                    }
                    Route::Drop(r) | Route::Unreachable { reason: r, .. } => {
                        assert_eq!(a.reason.as_deref(), Some(r.name()), "{dst}")
                    }
                }
            }
        }
    }

    #[test]
    fn control_lease_shows_state_and_age() {
        let node = api::Node {
            wireguard_public_key: None,
            name: "h2".into(),
            underlay_ip: ip("198.18.0.2"),
            encap: api::Encap::Vxlan,
            vtep_mac: MacAddr::vtep_for(ip("198.18.0.2")),
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
            pod_cidr_v6: None,
            state: api::NodeState::Up,
            last_heartbeat: 10_000,
            revision: 3,
        };
        let a = explain(&config(), &tunnel(), &table(), ip("10.244.2.1"), true)
            .with_control(Some(&node), 12_500);
        let l = a.lease.as_ref().unwrap();
        assert_eq!(l.state, "up");
        assert_eq!(l.heartbeat_age_ms, Some(2_500));
        assert!(format(&a).contains("lease:       up, last heartbeat 2.5s ago"));
        let gone = a.with_control(None, 0);
        assert_eq!(gone.lease.unwrap().state, "unknown");
        // Round trip through JSON, as the CLI reads it.
        let a = explain(&config(), &tunnel(), &table(), ip("10.244.9.1"), true);
        let back: Answer = serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }
}
