//! The nftables table `ip podnet_policy` that enforces a node's [`NodeRules`], and the smallest
//! change that takes it from one set of rules to the next.
//!
//! The table is created whole once (and again when something else changed it). After that each
//! change is one `nft` transaction that adds and deletes only the set elements and rules that
//! differ, and moves the generation, which is an element too (the set `generation` and the map
//! `stamp`). Rules are deleted by the handle nft gave them, so a script that adds rules says
//! which, in order: the agent reads their handles from nft's echo.
//!
//! Cost matters at scale: nft 1.0 reads every set's elements from the kernel before it runs a
//! script that touches a rule, an interval set or asks for an echo (0.1 s of CPU with 250 sets
//! of 150 pods), and before any listing. A script of plain element changes skips that (0.01 s).
//! So pods' sets are plain sets of addresses, only a block's set is an interval set, the
//! generation moves by elements, and a pod coming or going is such a script.
//!
//! Four named counters count the packets the rules judged, by direction and verdict. An
//! allowed connection's later packets pass on the generation's conntrack mark and are not
//! counted; every denied packet is.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use podnet_proto::policy::{Direction, Protocol};

use crate::core::nflog;
use crate::core::policy::{Allow, NodeRules, Peers};

/// The nftables table (family `ip`) the agent owns for policy.
pub const TABLE: &str = "podnet_policy";

/// Denied packets sampled per second and direction (to NFLOG, for `drops --watch`).
pub const SAMPLES_PER_S: u32 = 20;

/// The counters' names, by direction and verdict (`allowed` or `denied`).
pub fn counter(direction: Direction, allowed: bool) -> &'static str {
    match (direction, allowed) {
        (Direction::Ingress, true) => "ingress_allowed",
        (Direction::Ingress, false) => "ingress_denied",
        (Direction::Egress, true) => "egress_allowed",
        (Direction::Egress, false) => "egress_denied",
    }
}

/// The chain of a direction's allowing rules.
fn chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress_allow",
        Direction::Egress => "egress_allow",
    }
}

/// One rule of the table, by what it is: an allowing rule by its chain's direction and text,
/// or one of the fixed rules around them.
///
/// `Deny` is the first of the two rules that end a direction's chain (the sample to NFLOG; the
/// drop follows): new allowing rules go before it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    Allow(Direction, String),
    /// The last rule of a direction's chain, which drops what no rule allowed.
    Deny(Direction),
    /// The rules of the `forward` chain (their handles are never needed).
    Frame,
}

/// The chains of the table.
pub const CHAINS: [&str; 3] = ["forward", "ingress_allow", "egress_allow"];

/// What the table holds for some [`NodeRules`], apart from the generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ingress_isolated: BTreeSet<Ipv4Addr>,
    pub egress_isolated: BTreeSet<Ipv4Addr>,
    /// The peer sets, by name: whether an interval set, and the elements.
    pub sets: BTreeMap<String, (bool, BTreeSet<Ipv4Net>)>,
    /// The allowing rules: direction and text.
    pub rules: BTreeSet<(Direction, String)>,
}

impl Plan {
    pub fn of(rules: &NodeRules) -> Plan {
        let mut plan = Plan {
            ingress_isolated: rules.ingress_isolated.clone(),
            egress_isolated: rules.egress_isolated.clone(),
            ..Plan::default()
        };
        for (direction, list) in [
            (Direction::Ingress, &rules.ingress),
            (Direction::Egress, &rules.egress),
        ] {
            for r in list {
                if let Peers::Set {
                    name,
                    nets,
                    interval,
                } = &r.peers
                {
                    plan.sets
                        .insert(name.clone(), (*interval, nets.iter().copied().collect()));
                }
                plan.rules
                    .extend(rule_lines(r, direction).into_iter().map(|l| (direction, l)));
            }
        }
        plan
    }
}

/// An `nft -f` script, and the rules it adds in the order nft echoes them.
#[derive(Debug, Default)]
pub struct Script {
    pub text: String,
    pub added: Vec<Slot>,
}

impl Script {
    fn line(&mut self, line: impl AsRef<str>) {
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }

    fn add_rule(&mut self, slot: Slot, chain: &str, rule: &str) {
        self.line(format!("add rule ip {TABLE} {chain} {rule}"));
        self.added.push(slot);
    }

    /// `add` or `delete` of the networks `nets` of a peer set (plain sets hold addresses).
    fn nets<'a>(
        &mut self,
        verb: &str,
        set: &str,
        interval: bool,
        nets: impl IntoIterator<Item = &'a Ipv4Net>,
    ) {
        let nets = nets.into_iter();
        if interval {
            self.elements(verb, set, nets);
        } else {
            self.elements(verb, set, nets.map(|n| n.addr()));
        }
    }

    /// The generation: the set `generation` holds it, the map `stamp` gives it (to every
    /// packet's IP version, 4: the map is a constant an element change can move).
    fn generation(&mut self, verb: &str, generation: u32) {
        self.line(format!(
            "{verb} element ip {TABLE} generation {{ {generation} }}"
        ));
        let value = if verb == "add" {
            format!(" : {generation}")
        } else {
            String::new()
        };
        self.line(format!("{verb} element ip {TABLE} stamp {{ 4{value} }}"));
    }

    /// `add` or `delete` of `elements` of set `set` (nothing when there are none).
    fn elements<T: std::fmt::Display>(
        &mut self,
        verb: &str,
        set: &str,
        elements: impl IntoIterator<Item = T>,
    ) {
        let list: Vec<String> = elements.into_iter().map(|e| e.to_string()).collect();
        if !list.is_empty() {
            self.line(format!(
                "{verb} element ip {TABLE} {set} {{ {} }}",
                list.join(", ")
            ));
        }
    }
}

/// The whole table for `plan` under `generation`, replacing whatever table of that name there
/// was (one transaction).
pub fn create(plan: &Plan, generation: u32) -> Script {
    let mut s = Script::default();
    s.line(format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\nadd table ip {TABLE}"
    ));
    for direction in [Direction::Ingress, Direction::Egress] {
        for allowed in [true, false] {
            s.line(format!(
                "add counter ip {TABLE} {}",
                counter(direction, allowed)
            ));
        }
        s.line(format!("add chain ip {TABLE} {}", chain(direction)));
    }
    for set in ["ingress_isolated", "egress_isolated"] {
        s.line(format!("add set ip {TABLE} {set} {{ type ipv4_addr; }}"));
    }
    s.elements("add", "ingress_isolated", &plan.ingress_isolated);
    s.elements("add", "egress_isolated", &plan.egress_isolated);
    for (name, (interval, nets)) in &plan.sets {
        add_set(&mut s, name, *interval, nets);
    }
    s.line(format!("add set ip {TABLE} generation {{ type mark; }}"));
    s.line(format!(
        "add map ip {TABLE} stamp {{ typeof ip version : ct mark; }}"
    ));
    s.generation("add", generation);
    s.line(format!(
        "add chain ip {TABLE} forward {{ type filter hook forward priority filter - 5; policy accept; }}"
    ));
    s.add_rule(Slot::Frame, "forward", "ct mark @generation accept");
    // Conntrack calls a packet invalid when it fits no connection; from or to an isolated pod
    // such a packet has no connection to be judged by, so it goes.
    let egress_denied = counter(Direction::Egress, false);
    let ingress_denied = counter(Direction::Ingress, false);
    for rule in [
        "ct state related accept".to_string(),
        format!("ct state invalid ip saddr @egress_isolated counter name \"{egress_denied}\" drop"),
        format!(
            "ct state invalid ip daddr @ingress_isolated counter name \"{ingress_denied}\" drop"
        ),
        "ct original ip saddr @egress_isolated jump egress_allow".to_string(),
        "ct original ip daddr @ingress_isolated jump ingress_allow".to_string(),
    ] {
        s.add_rule(Slot::Frame, "forward", &rule);
    }
    s.add_rule(
        Slot::Frame,
        "forward",
        "ct mark set ip version map @stamp accept",
    );
    for (direction, rule) in &plan.rules {
        s.add_rule(
            Slot::Allow(*direction, rule.clone()),
            chain(*direction),
            rule,
        );
    }
    for direction in [Direction::Ingress, Direction::Egress] {
        // A sample of what is denied goes to NFLOG for `drops --watch`; the limit is on a rule
        // of its own, since a rule whose limit is spent does not match and would let the
        // packet fall through to the accept.
        let name = direction.name();
        s.add_rule(
            Slot::Deny(direction),
            chain(direction),
            &format!(
                "limit rate {SAMPLES_PER_S}/second burst {SAMPLES_PER_S} packets log prefix \"{name}\" group {}",
                nflog::GROUP
            ),
        );
        s.add_rule(
            Slot::Frame,
            chain(direction),
            &format!(
                "counter counter name \"{}\" drop comment \"denied\"",
                counter(direction, false)
            ),
        );
    }
    s
}

fn add_set(s: &mut Script, name: &str, interval: bool, nets: &BTreeSet<Ipv4Net>) {
    let flags = if interval { " flags interval;" } else { "" };
    s.line(format!(
        "add set ip {TABLE} {name} {{ type ipv4_addr;{flags} }}"
    ));
    s.nets("add", name, interval, nets);
}

/// Why an update cannot be written: a rule it must delete or place was never given a handle.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("no handle for the policy rule {0:?}")]
pub struct NoHandle(pub Slot);

/// The change from the table of `old` under generation `was` to that of `new` under
/// `generation`: elements, sets and rules added and deleted, and the generation moved.
/// `handles` are those of the table's rules; new rules go before their chain's denying rule.
pub fn update(
    old: &Plan,
    new: &Plan,
    was: u32,
    generation: u32,
    handles: &BTreeMap<Slot, u64>,
) -> Result<Script, NoHandle> {
    let handle = |slot: Slot| handles.get(&slot).copied().ok_or(NoHandle(slot));
    let mut s = Script::default();
    for (set, was, now) in [
        (
            "ingress_isolated",
            &old.ingress_isolated,
            &new.ingress_isolated,
        ),
        (
            "egress_isolated",
            &old.egress_isolated,
            &new.egress_isolated,
        ),
    ] {
        s.elements("delete", set, was.difference(now));
        s.elements("add", set, now.difference(was));
    }
    for (name, (interval, nets)) in &new.sets {
        match old.sets.get(name) {
            // Deletions first: an interval set refuses an element that overlaps one still in.
            Some((_, had)) => {
                s.nets("delete", name, *interval, had.difference(nets));
                s.nets("add", name, *interval, nets.difference(had));
            }
            None => add_set(&mut s, name, *interval, nets),
        }
    }
    for (direction, rule) in old.rules.difference(&new.rules) {
        let h = handle(Slot::Allow(*direction, rule.clone()))?;
        s.line(format!(
            "delete rule ip {TABLE} {} handle {h}",
            chain(*direction)
        ));
    }
    for (direction, rule) in new.rules.difference(&old.rules) {
        let deny = handle(Slot::Deny(*direction))?;
        s.line(format!(
            "insert rule ip {TABLE} {} position {deny} {rule}",
            chain(*direction)
        ));
        s.added.push(Slot::Allow(*direction, rule.clone()));
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        s.line(format!("delete set ip {TABLE} {name}"));
    }
    s.generation("delete", was);
    s.generation("add", generation);
    Ok(s)
}

/// The handles of the rules nft's JSON echo (`nft -j --echo --handle`) says it added, in order.
pub fn echoed_handles(echo: &str) -> Result<Vec<u64>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(echo).map_err(|e| format!("nft's echo is not JSON ({e}): {echo}"))?;
    let items = doc["nftables"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .filter_map(|item| {
            ["add", "insert"]
                .iter()
                .find_map(|verb| item.get(verb)?.get("rule"))
        })
        .map(|rule| {
            rule["handle"]
                .as_u64()
                .ok_or_else(|| format!("nft echoed a rule without a handle: {rule}"))
        })
        .collect()
}

/// The chains of the table, from `nft -j list chains ip`.
pub fn chains(listed: &str) -> Result<BTreeSet<String>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(listed).map_err(|e| format!("nft's chain list is not JSON ({e})"))?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let c = item.get("chain")?;
            (c["table"] == TABLE).then(|| c["name"].as_str().map(str::to_string))?
        })
        .collect())
}

/// The named counters' packets, by name, from `nft -j list counters`.
pub fn counters(listed: &str) -> Result<BTreeMap<String, u64>, String> {
    let doc: serde_json::Value = serde_json::from_str(listed)
        .map_err(|e| format!("nft's counter list is not JSON ({e})"))?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let c = item.get("counter")?;
            Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?))
        })
        .collect())
}

/// The rule text of one allowing rule (one per protocol it names).
fn rule_lines(r: &Allow, direction: Direction) -> Vec<String> {
    let (me, other) = match direction {
        Direction::Ingress => ("daddr", "saddr"),
        Direction::Egress => ("saddr", "daddr"),
    };
    let mut head = format!("ct original ip {me} {}", r.pod);
    match &r.peers {
        Peers::Any => {}
        Peers::Set { name, .. } => {
            let _ = write!(head, " ct original ip {other} @{name}");
        }
        Peers::Pod(ip) => {
            let _ = write!(head, " ct original ip {other} {ip}");
        }
    }
    let tail = format!(
        "counter counter name \"{}\" return comment \"{}\"",
        counter(direction, true),
        r.policy
    );
    let Some(ports) = &r.ports else {
        return vec![format!("{head} {tail}")];
    };
    let mut by_protocol: BTreeMap<Protocol, Vec<Option<(u16, u16)>>> = BTreeMap::new();
    for p in ports {
        by_protocol.entry(p.protocol).or_default().push(p.ports);
    }
    by_protocol
        .into_iter()
        .map(|(protocol, ranges)| {
            let proto = protocol.name().to_lowercase();
            if ranges.iter().any(Option::is_none) {
                return format!("{head} meta l4proto {proto} {tail}");
            }
            let list: Vec<String> = ranges
                .into_iter()
                .flatten()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            format!(
                "{head} meta l4proto {proto} ct original proto-dst {{ {} }} {tail}",
                list.join(", ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::{compile, PortRange};

    fn allow(pod: &str, peers: Peers, ports: Option<Vec<PortRange>>) -> Allow {
        Allow {
            pod: pod.parse().unwrap(),
            peers,
            ports,
            policy: "x/p".into(),
        }
    }

    /// A set of pods (a plain set) or, when a net is shorter than /32, a block's.
    fn set(name: &str, nets: &[&str]) -> Peers {
        let nets: Vec<Ipv4Net> = nets.iter().map(|n| n.parse().unwrap()).collect();
        Peers::Set {
            name: name.into(),
            interval: nets.iter().any(|n| n.prefix_len() < 32),
            nets,
        }
    }

    fn rules(ingress: Vec<Allow>) -> NodeRules {
        NodeRules {
            ingress_isolated: ingress.iter().map(|a| a.pod).collect(),
            ingress,
            ..NodeRules::default()
        }
    }

    /// Handles as nft would give them for `script`'s added rules, from `first` on.
    fn handles_of(script: &Script, first: u64, into: &mut BTreeMap<Slot, u64>) {
        for (i, slot) in script.added.iter().enumerate() {
            into.insert(slot.clone(), first + i as u64);
        }
    }

    #[test]
    fn the_whole_table() {
        let tcp80 = Some(vec![PortRange {
            protocol: Protocol::Tcp,
            ports: Some((80, 81)),
        }]);
        let plan = Plan::of(&rules(vec![
            allow("10.244.1.10", set("peers_1", &["10.244.2.10/32"]), tcp80),
            allow(
                "10.244.1.10",
                Peers::Pod("10.244.3.3".parse().unwrap()),
                None,
            ),
        ]));
        let s = create(&plan, 42);
        let text = &s.text;
        assert!(text.starts_with("add table ip podnet_policy\ndelete table ip podnet_policy\n"));
        for line in [
            "add element ip podnet_policy ingress_isolated { 10.244.1.10 }",
            "add set ip podnet_policy peers_1 { type ipv4_addr; }",
            "add element ip podnet_policy peers_1 { 10.244.2.10 }",
            "add element ip podnet_policy generation { 42 }",
            "add element ip podnet_policy stamp { 4 : 42 }",
            "add rule ip podnet_policy forward ct mark @generation accept",
            "add rule ip podnet_policy forward ct mark set ip version map @stamp accept",
            "add rule ip podnet_policy ingress_allow ct original ip daddr 10.244.1.10 \
             ct original ip saddr @peers_1 meta l4proto tcp ct original proto-dst { 80-81 } \
             counter counter name \"ingress_allowed\" return comment \"x/p\"",
            "add rule ip podnet_policy ingress_allow ct original ip daddr 10.244.1.10 \
             ct original ip saddr 10.244.3.3 counter counter name \"ingress_allowed\" return comment \"x/p\"",
            "add rule ip podnet_policy egress_allow counter counter name \"egress_denied\" drop comment \"denied\"",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
        }
        // No set without elements gets an empty element list.
        assert!(!text.contains("{  }"), "{text}");
        // Every added rule is accounted for, in order: the denying rules come last.
        assert_eq!(
            s.added.len(),
            text.lines().filter(|l| l.starts_with("add rule")).count()
        );
        assert_eq!(s.added[0], Slot::Frame);
        assert_eq!(
            s.added[s.added.len() - 4..],
            [
                Slot::Deny(Direction::Ingress),
                Slot::Frame,
                Slot::Deny(Direction::Egress),
                Slot::Frame
            ]
        );
        assert!(text.contains(
            "add rule ip podnet_policy ingress_allow limit rate 20/second burst 20 packets \
             log prefix \"ingress\" group 47\n"
        ));
    }

    /// A pod coming changes the elements of the sets that select it, and no rule.
    #[test]
    fn a_pod_event_changes_only_elements() {
        let before = Plan::of(&rules(vec![allow(
            "10.244.1.10",
            set("peers_1", &["10.244.2.10/32"]),
            None,
        )]));
        let after = Plan::of(&rules(vec![allow(
            "10.244.1.10",
            set("peers_1", &["10.244.2.10/32", "10.244.2.11/32"]),
            None,
        )]));
        let mut handles = BTreeMap::new();
        handles_of(&create(&before, 1), 1, &mut handles);
        let s = update(&before, &after, 1, 2, &handles).unwrap();
        assert_eq!(
            s.text,
            "add element ip podnet_policy peers_1 { 10.244.2.11 }\n\
             delete element ip podnet_policy generation { 1 }\n\
             delete element ip podnet_policy stamp { 4 }\n\
             add element ip podnet_policy generation { 2 }\n\
             add element ip podnet_policy stamp { 4 : 2 }\n"
        );
        // Nothing to learn a handle of: the agent runs it without an echo.
        assert!(s.added.is_empty());
    }

    /// A policy replaced: its rule and set go by handle and name, the new ones go before the
    /// denying rule, deletions before additions.
    #[test]
    fn a_policy_change_touches_its_own_rules() {
        let keep = allow("10.244.1.10", Peers::Any, None);
        let before = Plan::of(&rules(vec![
            keep.clone(),
            allow("10.244.1.11", set("peers_1", &["10.244.0.0/16"]), None),
        ]));
        let after = Plan::of(&rules(vec![
            keep,
            allow("10.244.1.12", set("peers_2", &["10.244.2.0/24"]), None),
        ]));
        let mut handles = BTreeMap::new();
        let created = create(&before, 1);
        handles_of(&created, 10, &mut handles);
        let old_rule = before
            .rules
            .iter()
            .find(|(_, r)| r.contains("@peers_1"))
            .unwrap()
            .clone();
        let deny = handles[&Slot::Deny(Direction::Ingress)];
        let s = update(&before, &after, 1, 2, &handles).unwrap();
        let lines: Vec<&str> = s.text.lines().collect();
        let at = |prefix: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix}\n{}", s.text))
        };
        assert!(lines.contains(&"delete element ip podnet_policy ingress_isolated { 10.244.1.11 }"));
        assert!(lines.contains(&"add element ip podnet_policy ingress_isolated { 10.244.1.12 }"));
        let delete_rule = format!(
            "delete rule ip podnet_policy ingress_allow handle {}",
            handles[&Slot::Allow(old_rule.0, old_rule.1)]
        );
        assert!(at(&delete_rule) < at("delete set ip podnet_policy peers_1"));
        assert!(
            lines.contains(&"add set ip podnet_policy peers_2 { type ipv4_addr; flags interval; }")
        );
        assert!(at("add set ip podnet_policy peers_2") < at("insert rule"));
        assert!(lines[at("insert rule")].starts_with(&format!(
            "insert rule ip podnet_policy ingress_allow position {deny} ct original ip daddr 10.244.1.12"
        )));
        assert_eq!(s.added.len(), 1);
        // The rule both plans hold is not touched.
        assert_eq!(
            lines.iter().filter(|l| l.contains("10.244.1.10")).count(),
            0
        );
    }

    /// What nft 1.0 echoes for an update: the element, the inserted rule, and a replaced one
    /// as a delete and an add (which keep their handle).
    #[test]
    fn handles_from_nfts_echo() {
        let echo = r#"{"nftables": [
            {"add": {"element": {"family": "ip", "table": "podnet_policy", "name": "x", "elem": {"set": ["10.244.1.3"]}}}},
            {"add": {"set": {"family": "ip", "name": "p2", "table": "podnet_policy", "type": "ipv4_addr", "handle": 11}}},
            {"insert": {"rule": {"family": "ip", "table": "podnet_policy", "chain": "ingress_allow", "handle": 12, "expr": []}}},
            {"delete": {"rule": {"family": "ip", "table": "podnet_policy", "chain": "forward", "handle": 5, "expr": []}}},
            {"add": {"rule": {"family": "ip", "table": "podnet_policy", "chain": "forward", "handle": 5, "expr": []}}}
        ]}"#;
        assert_eq!(echoed_handles(echo).unwrap(), [12, 5]);
        assert!(echoed_handles("add rule ...").is_err());
        assert!(echoed_handles(r#"{"nftables": [{"add": {"rule": {}}}]}"#).is_err());
    }

    #[test]
    fn chains_from_nfts_list() {
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "podnet", "name": "postrouting", "handle": 1}},
            {"chain": {"family": "ip", "table": "podnet_policy", "name": "forward", "handle": 9}},
            {"chain": {"family": "ip", "table": "podnet_policy", "name": "egress_allow", "handle": 6}}]}"#;
        assert_eq!(
            chains(listed).unwrap(),
            ["egress_allow".to_string(), "forward".to_string()].into()
        );
        assert!(chains("").is_err());
    }

    #[test]
    fn counters_from_nfts_list() {
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "ip", "name": "ingress_denied", "table": "podnet_policy", "handle": 14, "packets": 7, "bytes": 420}}]}"#;
        assert_eq!(
            counters(listed).unwrap(),
            [("ingress_denied".to_string(), 7)].into()
        );
    }

    #[test]
    fn a_missing_handle_is_an_error() {
        let plan = Plan::of(&rules(vec![allow("10.244.1.10", Peers::Any, None)]));
        assert_eq!(
            update(&plan, &Plan::default(), 1, 2, &BTreeMap::new()).unwrap_err(),
            NoHandle(Slot::Allow(
                Direction::Ingress,
                plan.rules.first().unwrap().1.clone()
            ))
        );
    }

    /// Over the probe layout, a pod added to a namespace that policies select changes only set
    /// elements (and the generation).
    #[test]
    fn a_new_pod_in_the_probe_layout_touches_no_rule() {
        use podnet_proto::policy::NetworkPolicy;
        let p: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}
        }))
        .unwrap();
        let mut c = podnet_proto::policy::fixtures::probe_cluster(vec![p]);
        let local: Vec<_> = c
            .pods
            .iter()
            .filter(|p| p.namespace == "x")
            .cloned()
            .collect();
        let before = Plan::of(&compile(&c, &local));
        let mut new = c.pods.iter().find(|p| p.namespace == "y").unwrap().clone();
        new.name = "d".into();
        new.ips = vec!["10.244.3.99".parse().unwrap()];
        c.pods.push(new);
        let after = Plan::of(&compile(&c, &local));
        assert_eq!(before.rules, after.rules);
        let mut handles = BTreeMap::new();
        handles_of(&create(&before, 1), 1, &mut handles);
        let s = update(&before, &after, 1, 2, &handles).unwrap();
        let changes: Vec<&str> = s
            .text
            .lines()
            .filter(|l| !l.contains(" generation ") && !l.contains(" stamp "))
            .collect();
        assert_eq!(changes.len(), 1, "{}", s.text);
        assert!(changes[0].starts_with("add element ip podnet_policy peers_"));
        assert!(changes[0].ends_with("{ 10.244.3.99 }"), "{}", s.text);
        assert!(s.added.is_empty());
    }
}
