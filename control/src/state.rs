//! The control service's state machine: membership, leases, IPAM and revisions, without I/O.
//!
//! Every method takes `now` (Unix milliseconds) instead of reading a clock, so lease expiry and
//! reclaim are tested without sleeping. [`Registry`] is the persisted part (small, cloned before
//! a change so a failed write can be rolled back); [`History`] keeps recent watch events so a
//! reconnecting agent can resume from its last revision.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use podnet_proto::api::{
    validate_node_name, EventType, NameError, Node, NodeList, NodeState, RegisterRequest,
    WatchEvent,
};
use serde::{Deserialize, Serialize};

use podnet_proto::ethernet::MacAddr;

use crate::ipam::Ipam;
use podnet_proto::policy::PolicyState;

/// Version of the state file layout; bumped on incompatible changes.
pub const STATE_FORMAT: u32 = 1;

/// Lease and reservation timing, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// A node that does not renew within this is marked down and withdrawn.
    pub lease_ttl_ms: u64,
    /// A down node's pod CIDR stays reserved for its name this long after its last heartbeat.
    pub reclaim_after_ms: u64,
}

/// What the store holds: everything needed to hand every node its pod CIDR again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredState {
    pub format: u32,
    pub cluster_cidr: Ipv4Net,
    pub node_prefix: u8,
    /// The IPv6 layout of a dual-stack cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_cidr_v6: Option<Ipv6Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_prefix_v6: Option<u8>,
    pub revision: u64,
    pub nodes: Vec<Node>,
    /// Pods, namespace labels and network policies (absent from files of services that had
    /// none).
    #[serde(default, skip_serializing_if = "PolicyState::is_empty")]
    pub policy: PolicyState,
}

/// The nodes one change wrote and removed, and the revision after it: what the file store
/// appends to its log instead of writing the whole state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDelta {
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put: Vec<Node>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

impl StoredState {
    /// The layout this state was written for.
    pub fn ipam(&self) -> Result<Ipam, crate::ipam::IpamError> {
        Ipam::recorded(
            self.cluster_cidr,
            self.node_prefix,
            self.cluster_cidr_v6,
            self.node_prefix_v6,
        )
    }

    /// Applies `delta`; `nodes` stays ordered by name, as [`Registry::to_stored`] writes it.
    pub fn apply(&mut self, delta: &NodeDelta) {
        for node in &delta.put {
            match self.nodes.binary_search_by(|n| n.name.cmp(&node.name)) {
                Ok(i) => self.nodes[i] = node.clone(),
                Err(i) => self.nodes.insert(i, node.clone()),
            }
        }
        for name in &delta.removed {
            if let Ok(i) = self.nodes.binary_search_by(|n| n.name.cmp(name)) {
                self.nodes.remove(i);
            }
        }
        self.revision = delta.revision;
    }
}

/// A registration the service refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("invalid node name {name:?}: {source}")]
    BadName { name: String, source: NameError },
    #[error("field `vtep_mac`: {0} is a multicast address and cannot be a VTEP")]
    BadVtepMac(MacAddr),
    #[error("field `underlay_ip`: {0} cannot be a node's underlay address (unspecified, broadcast or multicast)")]
    BadUnderlay(Ipv4Addr),
    #[error(
        "node {name:?} is live at {holder_ip} (lease ends in {expires_in_ms} ms); choose another \
         name, or stop that node / DELETE /v1/nodes/{name} first"
    )]
    NameTaken {
        name: String,
        holder_ip: Ipv4Addr,
        expires_in_ms: u64,
    },
    #[error(
        "underlay IP {underlay_ip} is already used by live node {holder:?}; each node needs its \
         own underlay address"
    )]
    UnderlayTaken {
        underlay_ip: Ipv4Addr,
        holder: String,
    },
    #[error(
        "cluster CIDR {cluster} is exhausted: it fits {capacity} nodes with /{prefix} each (the \
         first block is reserved) and all are assigned or reserved; remove nodes with \
         DELETE /v1/nodes/NAME?purge=true or use a larger --cluster-cidr / longer --node-prefix"
    )]
    Exhausted {
        cluster: Ipv4Net,
        prefix: u8,
        capacity: u64,
    },
}

/// The stored state does not fit this service's configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("state format {0} is not supported (this build reads format {STATE_FORMAT})")]
    Format(u32),
    #[error(
        "state was written for cluster CIDR {stored_cidr} with /{stored_prefix} per node but the \
         service was started with {cidr} and /{prefix}; start with the stored values, or move the \
         state file away to start over (every node then gets a new pod CIDR)"
    )]
    Layout {
        stored_cidr: Ipv4Net,
        stored_prefix: u8,
        cidr: Ipv4Net,
        prefix: u8,
    },
    #[error(
        "state was written for IPv6 layout {stored} but the service was started with {ours}; \
         start with the stored --cluster-cidr-v6 and --node-prefix-v6 (or without them if it \
         says none)"
    )]
    LayoutV6 { stored: V6Value, ours: V6Value },
    #[error("node {name:?}: pod CIDR {pod_cidr} is not one of this cluster's node blocks")]
    ForeignCidr { name: String, pod_cidr: Ipv4Net },
    #[error(
        "node {name:?}: IPv6 pod CIDR {found} does not go with its IPv4 block (expected {expected})"
    )]
    ForeignCidrV6 {
        name: String,
        found: V6Value,
        expected: V6Value,
    },
    #[error("node {name:?}: pod CIDR {pod_cidr} is also held by {other:?}")]
    DuplicateCidr {
        name: String,
        other: String,
        pod_cidr: Ipv4Net,
    },
    #[error("node {name:?} appears twice or has an invalid name")]
    BadNode { name: String },
    #[error("stored {what} {key} is invalid ({reason}); restore the state file from a backup")]
    BadRecord {
        what: &'static str,
        key: String,
        reason: String,
    },
}

/// An IPv6 layout or pod CIDR as an error names it: the value, or `none`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V6Value(pub Option<String>);

impl V6Value {
    fn layout(v6: Option<(Ipv6Net, u8)>) -> V6Value {
        V6Value(v6.map(|(cidr, prefix)| format!("{cidr} with /{prefix} per node")))
    }

    fn cidr(net: Option<Ipv6Net>) -> V6Value {
        V6Value(net.map(|n| n.to_string()))
    }
}

impl std::fmt::Display for V6Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("none"))
    }
}

/// How to take back one [`Registry::register_in_place`].
#[derive(Debug)]
pub struct Undo {
    revision: u64,
    name: String,
    before: Option<Entry>,
    reclaimed: Option<(String, Entry)>,
}

impl Undo {
    /// What the registration changed, for the store: the node, and the down node whose block
    /// it took; `registry` is the registry it was made in.
    pub fn delta(&self, registry: &Registry, done: &Registered) -> NodeDelta {
        NodeDelta {
            revision: registry.revision,
            put: vec![done.node.clone()],
            removed: self.reclaimed.iter().map(|(n, _)| n.clone()).collect(),
        }
    }
}

/// What a registration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    pub node: Node,
    /// The change to announce to watchers; `None` for a plain lease renewal.
    pub event: Option<WatchEvent>,
}

impl Registered {
    /// Whether the store must be written before acknowledging (anything but a renewal).
    pub fn changed(&self) -> bool {
        self.event.is_some()
    }
}

#[derive(Clone, Debug)]
struct Entry {
    node: Node,
    /// Meaningful while the node is up.
    lease_expires: u64,
}

/// Membership, leases and pod CIDR assignments.
#[derive(Clone, Debug)]
pub struct Registry {
    ipam: Ipam,
    timing: Timing,
    revision: u64,
    nodes: BTreeMap<String, Entry>,
    /// The holder of each block, by index: allocation looks here rather than at every node.
    /// Kept in step with `nodes` by [`Registry::put_entry`] and [`Registry::take_entry`].
    blocks: BTreeMap<u32, String>,
    /// Every node by underlay address, kept like `blocks` (and by `register_inner`, the one
    /// place an entry's address changes in place): the check that a registration's address
    /// is free reads the few nodes at it, not every node.
    underlays: BTreeSet<(Ipv4Addr, String)>,
    /// Blocks promised to writes still in flight (the etcd store), never handed out twice.
    held: BTreeSet<u32>,
    /// Start each search for a free block at a point given by the node's name, instead of
    /// at the lowest block (see [`Registry::spread_allocations`]).
    spread: bool,
}

impl Registry {
    pub fn new(ipam: Ipam, timing: Timing) -> Registry {
        Registry {
            ipam,
            timing,
            revision: 0,
            nodes: BTreeMap::new(),
            blocks: BTreeMap::new(),
            underlays: BTreeSet::new(),
            held: BTreeSet::new(),
            spread: false,
        }
    }

    /// Sets `name`'s entry, and its block and address in the indexes; returns the entry it
    /// replaced.
    fn put_entry(&mut self, name: String, entry: Entry) -> Option<Entry> {
        if let Some(index) = self.ipam.index_of(entry.node.pod_cidr) {
            self.blocks.insert(index, name.clone());
        }
        let ip = entry.node.underlay_ip;
        let old = self.nodes.insert(name.clone(), entry);
        if let Some(old) = &old {
            self.release_block(&name, old.node.pod_cidr);
            self.underlays.remove(&(old.node.underlay_ip, name.clone()));
        }
        self.underlays.insert((ip, name));
        old
    }

    /// Removes `name`'s entry and its address, and its block unless another node holds that
    /// now.
    fn take_entry(&mut self, name: &str) -> Option<Entry> {
        let old = self.nodes.remove(name)?;
        self.release_block(name, old.node.pod_cidr);
        self.underlays
            .remove(&(old.node.underlay_ip, name.to_string()));
        Some(old)
    }

    fn release_block(&mut self, name: &str, net: Ipv4Net) {
        let Some(index) = self.ipam.index_of(net) else {
            return;
        };
        let same = |holder: &String| holder == name;
        let stays = self.nodes.get(name).is_some_and(|e| e.node.pod_cidr == net);
        if !stays && self.blocks.get(&index).is_some_and(same) {
            self.blocks.remove(&index);
        }
    }

    /// Rebuilds the registry from the store. Nodes that were up get a fresh lease from `now`:
    /// they could not renew while the service was away.
    pub fn restore(
        ipam: Ipam,
        timing: Timing,
        stored: StoredState,
        now: u64,
    ) -> Result<Registry, RestoreError> {
        if stored.format != STATE_FORMAT {
            return Err(RestoreError::Format(stored.format));
        }
        if stored.cluster_cidr != ipam.cluster() || stored.node_prefix != ipam.node_prefix() {
            return Err(RestoreError::Layout {
                stored_cidr: stored.cluster_cidr,
                stored_prefix: stored.node_prefix,
                cidr: ipam.cluster(),
                prefix: ipam.node_prefix(),
            });
        }
        let stored_v6 = stored.cluster_cidr_v6.zip(stored.node_prefix_v6);
        if stored_v6 != ipam.v6() {
            return Err(RestoreError::LayoutV6 {
                stored: V6Value::layout(stored_v6),
                ours: V6Value::layout(ipam.v6()),
            });
        }
        let mut registry = Registry::new(ipam, timing);
        registry.revision = stored.revision;
        let mut holders: BTreeMap<u32, String> = BTreeMap::new();
        for node in stored.nodes {
            if validate_node_name(&node.name).is_err() || registry.nodes.contains_key(&node.name) {
                return Err(RestoreError::BadNode { name: node.name });
            }
            let index = ipam
                .index_of(node.pod_cidr)
                .ok_or_else(|| RestoreError::ForeignCidr {
                    name: node.name.clone(),
                    pod_cidr: node.pod_cidr,
                })?;
            if node.pod_cidr_v6 != ipam.block_v6(index) {
                return Err(RestoreError::ForeignCidrV6 {
                    name: node.name,
                    found: V6Value::cidr(node.pod_cidr_v6),
                    expected: V6Value::cidr(ipam.block_v6(index)),
                });
            }
            if let Some(other) = holders.insert(index, node.name.clone()) {
                return Err(RestoreError::DuplicateCidr {
                    name: node.name,
                    other,
                    pod_cidr: node.pod_cidr,
                });
            }
            let lease_expires = now + timing.lease_ttl_ms;
            registry.put_entry(
                node.name.clone(),
                Entry {
                    node,
                    lease_expires,
                },
            );
        }
        Ok(registry)
    }

    pub fn to_stored(&self) -> StoredState {
        StoredState {
            format: STATE_FORMAT,
            cluster_cidr: self.ipam.cluster(),
            node_prefix: self.ipam.node_prefix(),
            cluster_cidr_v6: self.ipam.v6().map(|(cidr, _)| cidr),
            node_prefix_v6: self.ipam.v6().map(|(_, prefix)| prefix),
            revision: self.revision,
            nodes: self.nodes.values().map(|e| e.node.clone()).collect(),
            policy: PolicyState::default(),
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn list(&self) -> NodeList {
        NodeList {
            revision: self.revision,
            nodes: self.nodes.values().map(|e| e.node.clone()).collect(),
            server_time_ms: None,
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name).map(|e| &e.node)
    }

    /// Live nodes, for a watch that starts without a revision.
    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .values()
            .map(|e| &e.node)
            .filter(|n| n.state == NodeState::Up)
    }

    /// Counts of (up, down) nodes.
    pub fn counts(&self) -> (usize, usize) {
        let up = self.live().count();
        (up, self.nodes.len() - up)
    }

    /// Joins a node or renews its lease.
    pub fn register(
        &mut self,
        name: &str,
        req: &RegisterRequest,
        now: u64,
    ) -> Result<Registered, RegisterError> {
        self.register_inner(name, req, now).map(|(done, _)| done)
    }

    /// [`Registry::register`] in place, with the undo for when the store does not take the
    /// change: no copy of the registry per registration.
    pub fn register_in_place(
        &mut self,
        name: &str,
        req: &RegisterRequest,
        now: u64,
    ) -> Result<(Registered, Undo), RegisterError> {
        let revision = self.revision;
        let before = self.nodes.get(name).cloned();
        let (done, reclaimed) = self.register_inner(name, req, now)?;
        let undo = Undo {
            revision,
            name: name.to_string(),
            before,
            reclaimed,
        };
        Ok((done, undo))
    }

    /// Takes back a registration made by [`Registry::register_in_place`].
    pub fn undo(&mut self, undo: Undo) {
        self.revision = undo.revision;
        self.take_entry(&undo.name);
        if let Some(entry) = undo.before {
            self.put_entry(undo.name, entry);
        }
        if let Some((name, entry)) = undo.reclaimed {
            self.put_entry(name, entry);
        }
    }

    /// The registration, and the down node whose block it reclaimed.
    fn register_inner(
        &mut self,
        name: &str,
        req: &RegisterRequest,
        now: u64,
    ) -> Result<(Registered, Option<(String, Entry)>), RegisterError> {
        validate_node_name(name).map_err(|source| RegisterError::BadName {
            name: name.to_string(),
            source,
        })?;
        let ip = req.underlay_ip;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(RegisterError::BadUnderlay(ip));
        }
        let vtep_mac = match req.vtep_mac {
            Some(mac) if mac.is_multicast() => return Err(RegisterError::BadVtepMac(mac)),
            Some(mac) => mac,
            None => MacAddr::vtep_for(ip),
        };
        let holder = self
            .underlays
            .range((ip, String::new())..)
            .take_while(|(at, _)| *at == ip)
            .map(|(_, holder)| holder)
            .find(|&holder| {
                holder != name
                    && self
                        .nodes
                        .get(holder)
                        .is_some_and(|e| e.node.state == NodeState::Up)
            });
        if let Some(holder) = holder {
            return Err(RegisterError::UnderlayTaken {
                underlay_ip: ip,
                holder: holder.clone(),
            });
        }
        let lease_expires = now + self.timing.lease_ttl_ms;

        if let Some(entry) = self.nodes.get_mut(name) {
            let node = &mut entry.node;
            let kind = match node.state {
                NodeState::Up if node.underlay_ip != ip => {
                    return Err(RegisterError::NameTaken {
                        name: name.to_string(),
                        holder_ip: node.underlay_ip,
                        expires_in_ms: entry.lease_expires.saturating_sub(now),
                    });
                }
                NodeState::Up
                    if node.encap == req.encap
                        && node.vtep_mac == vtep_mac
                        && node.wireguard_public_key == req.wireguard_public_key =>
                {
                    None
                }
                NodeState::Up => Some(EventType::Modified),
                NodeState::Down => Some(EventType::Added),
            };
            entry.lease_expires = lease_expires;
            node.last_heartbeat = now;
            let Some(kind) = kind else {
                let done = Registered {
                    node: node.clone(),
                    event: None,
                };
                return Ok((done, None));
            };
            self.revision += 1;
            if node.underlay_ip != ip {
                self.underlays.remove(&(node.underlay_ip, name.to_string()));
                self.underlays.insert((ip, name.to_string()));
            }
            node.underlay_ip = ip;
            node.encap = req.encap;
            node.vtep_mac = vtep_mac;
            node.wireguard_public_key = req.wireguard_public_key;
            node.state = NodeState::Up;
            node.revision = self.revision;
            let node = node.clone();
            let done = Registered {
                event: Some(event(kind, &node)),
                node,
            };
            return Ok((done, None));
        }

        let (index, reclaimed) = self.allocate(name, now)?;
        self.revision += 1;
        let node = Node {
            name: name.to_string(),
            underlay_ip: ip,
            encap: req.encap,
            vtep_mac,
            pod_cidr: self.ipam.block(index),
            pod_cidr_v6: self.ipam.block_v6(index),
            wireguard_public_key: req.wireguard_public_key,
            state: NodeState::Up,
            last_heartbeat: now,
            revision: self.revision,
        };
        self.put_entry(
            name.to_string(),
            Entry {
                node: node.clone(),
                lease_expires,
            },
        );
        let done = Registered {
            event: Some(event(EventType::Added, &node)),
            node,
        };
        Ok((done, reclaimed))
    }

    /// A free block, else the block of the down node whose reservation ran out longest ago
    /// (returned with that node's entry, which is removed).
    #[allow(clippy::type_complexity)]
    fn allocate(
        &mut self,
        name: &str,
        now: u64,
    ) -> Result<(u32, Option<(String, Entry)>), RegisterError> {
        let with_held;
        let taken = if self.held.is_empty() {
            &self.blocks
        } else {
            let mut all = self.blocks.clone();
            all.extend(self.held.iter().map(|&i| (i, String::new())));
            with_held = all;
            &with_held
        };
        let free = if self.spread {
            self.ipam
                .free_from(taken, spread_start(name, self.ipam.capacity()))
        } else {
            self.ipam.first_free(taken)
        };
        if let Some(index) = free {
            return Ok((index, None));
        }
        let reclaimable = self
            .nodes
            .values()
            .filter(|e| e.node.state == NodeState::Down && self.reservation_over(&e.node, now))
            .min_by_key(|e| e.node.last_heartbeat)
            .map(|e| e.node.name.clone());
        match reclaimable {
            Some(name) => {
                let entry = self.take_entry(&name).expect("name taken from the map");
                let index = self
                    .ipam
                    .index_of(entry.node.pod_cidr)
                    .expect("validated on insert");
                Ok((index, Some((name, entry))))
            }
            None => Err(RegisterError::Exhausted {
                cluster: self.ipam.cluster(),
                prefix: self.ipam.node_prefix(),
                capacity: self.ipam.capacity(),
            }),
        }
    }

    fn reservation_over(&self, node: &Node, now: u64) -> bool {
        now >= node
            .last_heartbeat
            .saturating_add(self.timing.reclaim_after_ms)
    }

    /// Graceful leave: the node goes down and is withdrawn; its pod CIDR stays reserved like
    /// after a lapsed lease unless `purge` releases it now. `None` if there is no such node.
    pub fn remove(&mut self, name: &str, purge: bool) -> Option<Option<WatchEvent>> {
        let entry = self.nodes.get_mut(name)?;
        let event = if entry.node.state == NodeState::Up {
            self.revision += 1;
            entry.node.state = NodeState::Down;
            entry.node.revision = self.revision;
            Some(event(EventType::Deleted, &entry.node))
        } else {
            None
        };
        if purge {
            self.take_entry(name);
        }
        Some(event)
    }

    /// Marks nodes whose lease lapsed as down (one `deleted` event each) and forgets down nodes
    /// whose reservation ran out. Returns the events and whether anything changed.
    pub fn expire(&mut self, now: u64) -> (Vec<WatchEvent>, bool) {
        let mut events = Vec::new();
        for entry in self.nodes.values_mut() {
            if entry.node.state == NodeState::Up && now >= entry.lease_expires {
                self.revision += 1;
                entry.node.state = NodeState::Down;
                entry.node.revision = self.revision;
                events.push(event(EventType::Deleted, &entry.node));
            }
        }
        let reclaim_after = self.timing.reclaim_after_ms;
        let forgotten: Vec<String> = self
            .nodes
            .values()
            .filter(|e| {
                e.node.state == NodeState::Down
                    && now >= e.node.last_heartbeat.saturating_add(reclaim_after)
            })
            .map(|e| e.node.name.clone())
            .collect();
        for name in &forgotten {
            self.take_entry(name);
        }
        let changed = !events.is_empty() || !forgotten.is_empty();
        (events, changed)
    }

    /// What `next` (this registry after some changes) changed: the nodes written or new, and
    /// the names gone. One ordered walk of both maps, no copy of the unchanged nodes.
    pub fn delta(&self, next: &Registry) -> NodeDelta {
        let mut delta = NodeDelta {
            revision: next.revision,
            put: Vec::new(),
            removed: Vec::new(),
        };
        let mut before = self.nodes.iter().peekable();
        let mut after = next.nodes.iter().peekable();
        loop {
            match (before.peek(), after.peek()) {
                (None, None) => break,
                (Some((old, _)), Some((new, _))) if old < new => {
                    delta.removed.push((*old).clone());
                    before.next();
                }
                (Some((old, a)), Some((new, b))) if old == new => {
                    if a.node != b.node {
                        delta.put.push(b.node.clone());
                    }
                    before.next();
                    after.next();
                }
                (_, Some((_, b))) => {
                    delta.put.push(b.node.clone());
                    after.next();
                }
                (Some((old, _)), None) => {
                    delta.removed.push((*old).clone());
                    before.next();
                }
            }
        }
        delta
    }

    /// Every node, live and down, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().map(|e| &e.node)
    }

    /// Whether a registration of `name` with `req` would only renew a live lease (no change to
    /// record), checked without the copy a full [`Registry::register`] needs.
    pub fn is_renewal(&self, name: &str, req: &RegisterRequest) -> bool {
        let mac = req
            .vtep_mac
            .unwrap_or_else(|| MacAddr::vtep_for(req.underlay_ip));
        self.node(name).is_some_and(|n| {
            n.state == NodeState::Up
                && n.underlay_ip == req.underlay_ip
                && n.encap == req.encap
                && n.vtep_mac == mac
                && n.wireguard_public_key == req.wireguard_public_key
        })
    }

    /// Renews a live lease that [`Registry::is_renewal`] said changes nothing, in place: no
    /// copy of the registry, no event, nothing to persist. Returns the node.
    pub fn renew(&mut self, name: &str, now: u64) -> Option<&Node> {
        let ttl = self.timing.lease_ttl_ms;
        let entry = self.nodes.get_mut(name)?;
        entry.lease_expires = now + ttl;
        entry.node.last_heartbeat = now;
        Some(&entry.node)
    }

    /// Lets replicas that allocate at once pick different blocks: each search for a free
    /// block starts where the node's name hashes to. Without it the lowest free block is
    /// taken, and every replica would race for the same one.
    pub fn spread_allocations(&mut self) {
        self.spread = true;
    }

    /// Keeps `net` from being handed out while a write that claims it is in flight.
    pub fn hold(&mut self, net: Ipv4Net) {
        if let Some(index) = self.ipam.index_of(net) {
            self.held.insert(index);
        }
    }

    /// The write that claimed `net` ended (written or not).
    pub fn release(&mut self, net: Ipv4Net) {
        if let Some(index) = self.ipam.index_of(net) {
            self.held.remove(&index);
        }
    }

    /// Sets a node as a replicated store holds it (the etcd store's local mirror): its lease
    /// is the store's, so `lease_expires` here only feeds the "lease ends in" of a refusal and
    /// the time a node without a lease gets to renew ([`Registry::lease_over`]).
    pub fn mirror_put(&mut self, node: Node, lease_expires: u64) {
        self.put_entry(
            node.name.clone(),
            Entry {
                node,
                lease_expires,
            },
        );
    }

    /// Whether `name`'s lease in this registry ran out by `now` (a node it does not hold has
    /// none).
    pub fn lease_over(&self, name: &str, now: u64) -> bool {
        self.nodes.get(name).is_none_or(|e| now >= e.lease_expires)
    }

    /// Forgets a node the replicated store no longer holds.
    pub fn mirror_remove(&mut self, name: &str) {
        self.take_entry(name);
    }

    /// The replicated store's revision this mirror has caught up with.
    pub fn set_revision(&mut self, revision: u64) {
        self.revision = revision;
    }

    /// When the next lease runs out, for a sweeper that wants to sleep exactly that long.
    pub fn next_expiry(&self) -> Option<u64> {
        self.nodes
            .values()
            .filter(|e| e.node.state == NodeState::Up)
            .map(|e| e.lease_expires)
            .min()
    }
}

/// Where the search for a free block starts for `name` (1..=capacity): FNV-1a of the name.
fn spread_start(name: &str, capacity: u64) -> u32 {
    let hash = fnv1a(name.bytes());
    (1 + hash % capacity.max(1)) as u32
}

/// 64-bit FNV-1a: a fixed, cheap hash for spreading and telling contents apart (not secure).
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn event(kind: EventType, node: &Node) -> WatchEvent {
    WatchEvent {
        kind,
        revision: node.revision,
        node: node.clone(),
    }
}

/// The requested revision is older than the retained history (or newer than the service
/// knows): the client must list again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("revision {requested} cannot be resumed: history holds revisions after {floor} up to {current}; list again")]
pub struct Gone {
    pub requested: u64,
    pub floor: u64,
    pub current: u64,
}

/// The last few watch events, for resuming watches.
#[derive(Clone, Debug)]
pub struct History {
    events: VecDeque<WatchEvent>,
    /// Every event after this revision is retained.
    floor: u64,
    current: u64,
    capacity: usize,
}

impl History {
    /// An empty history starting at `revision` (the registry's revision when loaded).
    pub fn new(revision: u64, capacity: usize) -> History {
        History {
            events: VecDeque::new(),
            floor: revision,
            current: revision,
            capacity: capacity.max(1),
        }
    }

    pub fn push(&mut self, event: WatchEvent) {
        self.current = self.current.max(event.revision);
        if self.events.len() == self.capacity {
            if let Some(old) = self.events.pop_front() {
                self.floor = old.revision;
            }
        }
        self.events.push_back(event);
    }

    /// The store moved on to `revision` without an event for watchers (a change to other
    /// keys): a watch may resume from there.
    pub fn advance_to(&mut self, revision: u64) {
        self.current = self.current.max(revision);
    }

    /// The events after `revision`, or [`Gone`] when they are no longer all retained.
    pub fn since(&self, revision: u64) -> Result<Vec<WatchEvent>, Gone> {
        if revision < self.floor || revision > self.current {
            return Err(Gone {
                requested: revision,
                floor: self.floor,
                current: self.current,
            });
        }
        Ok(self
            .events
            .iter()
            .filter(|e| e.revision > revision)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_proto::api::Encap;

    const TTL: u64 = 20_000;
    const RECLAIM: u64 = 3_600_000;

    fn registry(cidr: &str) -> Registry {
        Registry::new(
            Ipam::new(cidr.parse().unwrap(), 24).unwrap(),
            Timing {
                lease_ttl_ms: TTL,
                reclaim_after_ms: RECLAIM,
            },
        )
    }

    fn req(last: u8) -> RegisterRequest {
        RegisterRequest {
            wireguard_public_key: None,
            underlay_ip: Ipv4Addr::new(198, 18, 0, last),
            encap: Encap::Vxlan,
            vtep_mac: None,
        }
    }

    fn cidr(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn nodes_get_distinct_cidrs_starting_after_the_reserved_block() {
        let mut reg = registry("10.244.0.0/16");
        let a = reg.register("h1", &req(1), 0).unwrap();
        let b = reg.register("h2", &req(2), 0).unwrap();
        let c = reg.register("h3", &req(3), 0).unwrap();
        assert_eq!(a.node.pod_cidr, cidr("10.244.1.0/24"));
        assert_eq!(b.node.pod_cidr, cidr("10.244.2.0/24"));
        assert_eq!(c.node.pod_cidr, cidr("10.244.3.0/24"));
        assert_eq!(a.node.vtep_mac.to_string(), "02:00:c6:12:00:01");
        assert_eq!(reg.revision(), 3);
        assert_eq!(c.event.unwrap().kind, EventType::Added);
    }

    #[test]
    fn renewal_keeps_cidr_and_revision() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        let again = reg.register("h1", &req(1), 5_000).unwrap();
        assert!(!again.changed(), "a heartbeat is not a change");
        assert_eq!(again.node.pod_cidr, cidr("10.244.1.0/24"));
        assert_eq!(again.node.last_heartbeat, 5_000);
        assert_eq!(reg.revision(), 1);
        // The lease now runs from the renewal.
        assert!(reg.expire(5_000 + TTL - 1).0.is_empty());
        assert_eq!(reg.expire(5_000 + TTL).0.len(), 1);
    }

    #[test]
    fn changing_encap_is_a_modification() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        let mut r = req(1);
        r.encap = Encap::Ipip;
        let done = reg.register("h1", &r, 10).unwrap();
        let ev = done.event.unwrap();
        assert_eq!(ev.kind, EventType::Modified);
        assert_eq!(ev.revision, 2);
        assert_eq!(ev.node.encap, Encap::Ipip);
        r.vtep_mac = Some("02:AA:00:00:00:01".parse().unwrap());
        let done = reg.register("h1", &r, 20).unwrap();
        assert_eq!(done.node.vtep_mac.to_string(), "02:aa:00:00:00:01");
        assert_eq!(done.event.unwrap().kind, EventType::Modified);
    }

    #[test]
    fn a_new_wireguard_key_is_a_modification_and_the_same_key_a_renewal() {
        let mut reg = registry("10.244.0.0/16");
        let mut r = req(1);
        r.encap = Encap::Wireguard;
        r.wireguard_public_key = Some(podnet_proto::api::WgKey([1; 32]));
        reg.register("h1", &r, 0).unwrap();
        assert!(reg.is_renewal("h1", &r));
        assert!(reg.register("h1", &r, 10).unwrap().event.is_none());
        r.wireguard_public_key = Some(podnet_proto::api::WgKey([2; 32]));
        assert!(!reg.is_renewal("h1", &r));
        let ev = reg.register("h1", &r, 20).unwrap().event.unwrap();
        assert_eq!(ev.kind, EventType::Modified);
        assert_eq!(ev.node.wireguard_public_key, r.wireguard_public_key);
    }

    #[test]
    fn live_name_at_another_underlay_ip_conflicts() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        let err = reg.register("h1", &req(9), 1_000).unwrap_err();
        assert_eq!(
            err,
            RegisterError::NameTaken {
                name: "h1".into(),
                holder_ip: Ipv4Addr::new(198, 18, 0, 1),
                expires_in_ms: TTL - 1_000
            }
        );
        assert_eq!(reg.revision(), 1, "a refused registration changes nothing");
        // Once the lease lapsed, the name may move, keeping its CIDR.
        reg.expire(TTL);
        let moved = reg.register("h1", &req(9), TTL + 1).unwrap();
        assert_eq!(moved.node.pod_cidr, cidr("10.244.1.0/24"));
        assert_eq!(moved.node.underlay_ip, Ipv4Addr::new(198, 18, 0, 9));
        assert_eq!(moved.event.unwrap().kind, EventType::Added);
    }

    #[test]
    fn two_live_nodes_cannot_share_an_underlay_ip() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        assert_eq!(
            reg.register("h2", &req(1), 0).unwrap_err(),
            RegisterError::UnderlayTaken {
                underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
                holder: "h1".into()
            }
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut reg = registry("10.244.0.0/16");
        assert!(matches!(
            reg.register("H1", &req(1), 0),
            Err(RegisterError::BadName { .. })
        ));
        let mut r = req(1);
        r.vtep_mac = Some("01:00:5e:00:00:01".parse().unwrap());
        assert!(matches!(
            reg.register("h1", &r, 0),
            Err(RegisterError::BadVtepMac(_))
        ));
        let r = RegisterRequest {
            underlay_ip: Ipv4Addr::new(224, 0, 0, 1),
            ..req(1)
        };
        assert!(matches!(
            reg.register("h1", &r, 0),
            Err(RegisterError::BadUnderlay(_))
        ));
        assert_eq!(reg.revision(), 0);
    }

    #[test]
    fn lapsed_lease_withdraws_but_keeps_the_reservation() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        reg.register("h2", &req(2), 0).unwrap();
        reg.register("h2", &req(2), 15_000).unwrap();
        let (events, changed) = reg.expire(TTL);
        assert!(changed);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventType::Deleted);
        assert_eq!(events[0].node.name, "h1");
        assert_eq!(events[0].node.state, NodeState::Down);
        assert_eq!(events[0].revision, 3);
        assert_eq!(reg.counts(), (1, 1));
        // Nothing more to do until h2's lease runs out.
        assert_eq!(reg.expire(TTL + 1), (vec![], false));
        assert_eq!(reg.next_expiry(), Some(15_000 + TTL));

        // A newcomer does not get h1's reserved block.
        let h3 = reg.register("h3", &req(3), TTL + 2).unwrap();
        assert_eq!(h3.node.pod_cidr, cidr("10.244.3.0/24"));
        // h1 comes back (even at a new underlay IP) and gets its CIDR again.
        let back = reg.register("h1", &req(11), TTL + 3).unwrap();
        assert_eq!(back.node.pod_cidr, cidr("10.244.1.0/24"));
        assert_eq!(back.event.unwrap().kind, EventType::Added);
    }

    #[test]
    fn reservations_end_after_reclaim_after() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        reg.expire(TTL);
        assert_eq!(reg.expire(RECLAIM - 1), (vec![], false));
        assert_eq!(reg.expire(RECLAIM), (vec![], true));
        assert!(reg.node("h1").is_none());
        let next = reg.register("h9", &req(9), RECLAIM + 1).unwrap();
        assert_eq!(next.node.pod_cidr, cidr("10.244.1.0/24"));
    }

    #[test]
    fn exhaustion_reports_capacity_and_reclaims_old_reservations() {
        let mut reg = registry("10.244.0.0/22");
        for i in 1..=3 {
            reg.register(&format!("h{i}"), &req(i), 0).unwrap();
        }
        let err = reg.register("h4", &req(4), 0).unwrap_err();
        assert_eq!(
            err,
            RegisterError::Exhausted {
                cluster: cidr("10.244.0.0/22"),
                prefix: 24,
                capacity: 3
            }
        );
        assert!(err.to_string().contains("fits 3 nodes"), "{err}");
        // Down but still reserved: still exhausted.
        reg.expire(TTL);
        assert!(reg.register("h4", &req(4), TTL).is_err());
        // h2's reservation is over (without a sweep having run): h4 takes the oldest one.
        reg.register("h1", &req(1), 100).unwrap();
        reg.register("h3", &req(3), 100).unwrap();
        let h4 = reg.register("h4", &req(4), RECLAIM).unwrap();
        assert_eq!(h4.node.pod_cidr, cidr("10.244.2.0/24"));
        assert!(reg.node("h2").is_none());
    }

    #[test]
    fn graceful_leave_and_purge() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        reg.register("h2", &req(2), 0).unwrap();
        let ev = reg.remove("h1", false).unwrap().unwrap();
        assert_eq!(ev.kind, EventType::Deleted);
        assert_eq!(reg.remove("h1", false), Some(None), "already down");
        assert_eq!(reg.node("h1").unwrap().state, NodeState::Down);
        assert_eq!(reg.remove("nope", false), None);
        assert_eq!(
            reg.remove("h2", true).unwrap().unwrap().kind,
            EventType::Deleted
        );
        assert!(reg.node("h2").is_none());
        let h3 = reg.register("h3", &req(3), 1).unwrap();
        assert_eq!(
            h3.node.pod_cidr,
            cidr("10.244.2.0/24"),
            "purged block is free"
        );
    }

    #[test]
    fn restore_keeps_cidrs_and_revision_and_renews_leases() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        reg.register("h2", &req(2), 0).unwrap();
        reg.expire(TTL);
        let stored = reg.to_stored();
        let json = serde_json::to_string(&stored).unwrap();
        let back: StoredState = serde_json::from_str(&json).unwrap();
        let mut again = Registry::restore(*reg.ipam(), reg.timing(), back, 1_000_000).unwrap();
        assert_eq!(again.revision(), reg.revision());
        assert_eq!(again.list(), reg.list());
        // Leases restart at load time rather than lapsing at once.
        assert_eq!(again.expire(1_000_000 + TTL - 1), (vec![], false));
        let h3 = again.register("h3", &req(3), 1_000_001).unwrap();
        assert_eq!(h3.node.pod_cidr, cidr("10.244.3.0/24"));
    }

    #[test]
    fn restore_refuses_a_different_layout_or_bad_records() {
        let mut reg = registry("10.244.0.0/16");
        reg.register("h1", &req(1), 0).unwrap();
        let stored = reg.to_stored();
        let other = Ipam::new(cidr("10.244.0.0/16"), 25).unwrap();
        assert!(matches!(
            Registry::restore(other, reg.timing(), stored.clone(), 0),
            Err(RestoreError::Layout { .. })
        ));
        let mut dup = stored.clone();
        let mut twin = dup.nodes[0].clone();
        twin.name = "h2".into();
        dup.nodes.push(twin);
        assert!(matches!(
            Registry::restore(*reg.ipam(), reg.timing(), dup, 0),
            Err(RestoreError::DuplicateCidr { .. })
        ));
        let mut foreign = stored.clone();
        foreign.nodes[0].pod_cidr = cidr("10.99.1.0/24");
        assert!(matches!(
            Registry::restore(*reg.ipam(), reg.timing(), foreign, 0),
            Err(RestoreError::ForeignCidr { .. })
        ));
        let mut future = stored;
        future.format = 99;
        assert_eq!(
            Registry::restore(*reg.ipam(), reg.timing(), future, 0).unwrap_err(),
            RestoreError::Format(99)
        );
    }

    fn dual_stack(v4: &Registry) -> Ipam {
        v4.ipam()
            .with_v6("fd00:10:244::/56".parse().unwrap(), 64)
            .unwrap()
    }

    #[test]
    fn a_dual_stack_node_gets_the_v6_block_of_its_v4_index_kept_across_restore() {
        let plain = registry("10.244.0.0/16");
        let ipam = dual_stack(&plain);
        let mut reg = Registry::new(ipam, plain.timing());
        let v6 = |s: &str| Some(s.parse::<Ipv6Net>().unwrap());
        let a = reg.register("h1", &req(1), 0).unwrap();
        let b = reg.register("h2", &req(2), 0).unwrap();
        assert_eq!(a.node.pod_cidr_v6, v6("fd00:10:244:1::/64"));
        assert_eq!(b.node.pod_cidr_v6, v6("fd00:10:244:2::/64"));
        // A block taken back from a purged node goes with its IPv6 half.
        reg.remove("h1", true).unwrap();
        let c = reg.register("h3", &req(3), 0).unwrap();
        assert_eq!(
            (c.node.pod_cidr, c.node.pod_cidr_v6),
            (cidr("10.244.1.0/24"), v6("fd00:10:244:1::/64"))
        );
        // The store keeps the layout and the blocks; a restore gives them back.
        let stored = reg.to_stored();
        let json = serde_json::to_value(&stored).unwrap();
        assert_eq!(json["cluster_cidr_v6"], "fd00:10:244::/56");
        assert_eq!(json["node_prefix_v6"], 64);
        let back = Registry::restore(ipam, reg.timing(), stored.clone(), 0).unwrap();
        assert_eq!(
            back.node("h3").unwrap().pod_cidr_v6,
            v6("fd00:10:244:1::/64")
        );
        // A service started without the IPv6 layout, or with another one, refuses and names
        // both values.
        let err = Registry::restore(*plain.ipam(), reg.timing(), stored.clone(), 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "state was written for IPv6 layout fd00:10:244::/56 with /64 per node but the \
             service was started with none; start with the stored --cluster-cidr-v6 and \
             --node-prefix-v6 (or without them if it says none)"
        );
        let other = plain
            .ipam()
            .with_v6("fd00:10:244::/56".parse().unwrap(), 72)
            .unwrap();
        assert!(matches!(
            Registry::restore(other, reg.timing(), stored.clone(), 0),
            Err(RestoreError::LayoutV6 { .. })
        ));
        // A single-stack state does not load into a dual-stack service either.
        let single = plain.to_stored();
        assert!(matches!(
            Registry::restore(ipam, reg.timing(), single, 0),
            Err(RestoreError::LayoutV6 { .. })
        ));
        // A node whose IPv6 block is not its IPv4 block's (h2 holds 10.244.2.0/24).
        let mut foreign = stored;
        assert_eq!(foreign.nodes[0].name, "h2");
        foreign.nodes[0].pod_cidr_v6 = v6("fd00:10:244:9::/64");
        let err = Registry::restore(ipam, reg.timing(), foreign, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node \"h2\": IPv6 pod CIDR fd00:10:244:9::/64 does not go with its IPv4 block \
             (expected fd00:10:244:2::/64)"
        );
    }

    #[test]
    fn history_resumes_or_says_gone() {
        let mut reg = registry("10.244.0.0/16");
        let mut history = History::new(reg.revision(), 3);
        for i in 1..=5u8 {
            let done = reg.register(&format!("h{i}"), &req(i), 0).unwrap();
            history.push(done.event.unwrap());
        }
        // Revisions 3, 4, 5 retained: resuming from 2 or later works.
        let revs = |v: Vec<WatchEvent>| v.iter().map(|e| e.revision).collect::<Vec<_>>();
        assert_eq!(revs(history.since(2).unwrap()), [3, 4, 5]);
        assert_eq!(revs(history.since(4).unwrap()), [5]);
        assert_eq!(revs(history.since(5).unwrap()), Vec::<u64>::new());
        assert_eq!(
            history.since(1),
            Err(Gone {
                requested: 1,
                floor: 2,
                current: 5
            })
        );
        assert!(history.since(6).is_err(), "a revision from the future");
    }

    #[test]
    fn fresh_history_after_restart_resumes_from_the_loaded_revision() {
        let history = History::new(7, 100);
        assert_eq!(history.since(7).unwrap(), vec![]);
        assert!(history.since(6).is_err());
    }

    proptest::proptest! {
        /// Whatever a step does (join, change, leave, purge, lapse, reclaim of a down node's
        /// block for a newcomer), the delta applied to the stored state before it gives the
        /// stored state after it: the file store's log loses nothing. A registration in place
        /// is undone exactly, and the block index follows every step.
        #[test]
        fn a_delta_applied_to_the_state_before_gives_the_state_after(
            steps in proptest::collection::vec((0u8..6, 1u8..12, 0u64..50_000), 1..60)
        ) {
            // A /28 of /30s: three blocks, so newcomers reclaim down nodes' blocks.
            let mut reg = Registry::new(
                Ipam::new("10.244.0.0/28".parse().unwrap(), 30).unwrap(),
                Timing { lease_ttl_ms: TTL, reclaim_after_ms: 30_000 },
            );
            let mut stored = reg.to_stored();
            let mut now = 0;
            for (op, n, dt) in steps {
                now += dt;
                let name = format!("n{n}");
                let mut next = reg.clone();
                // Op 2 moves the node to another's address, or changes its encapsulation.
                let request = match op {
                    2 => RegisterRequest { encap: Encap::Ipip, ..req(n % 4 + 1) },
                    _ => req(n),
                };
                let up_at_address = reg.nodes().any(|node| {
                    node.underlay_ip == request.underlay_ip
                        && node.state == NodeState::Up
                        && node.name != name
                });
                match op {
                    0..=2 => {
                        // In place, as the file store registers: its delta is the change, and
                        // its undo gives back the registry before it.
                        let mut undone = reg.clone();
                        let result = undone.register_in_place(&name, &request, now);
                        proptest::prop_assert_eq!(
                            matches!(result, Err(RegisterError::UnderlayTaken { .. })),
                            up_at_address
                        );
                        if let Ok((done, undo)) = result {
                            if done.event.is_some() {
                                let mut after = stored.clone();
                                after.apply(&undo.delta(&undone, &done));
                                proptest::prop_assert_eq!(&after, &undone.to_stored());
                            }
                            undone.undo(undo);
                        }
                        proptest::prop_assert_eq!(&undone.to_stored(), &stored);
                        proptest::prop_assert_eq!(&undone.blocks, &reg.blocks);
                        proptest::prop_assert_eq!(&undone.underlays, &reg.underlays);
                        let _ = next.register(&name, &request, now);
                    }
                    3 => { next.remove(&name, false); }
                    4 => { next.remove(&name, true); }
                    _ => { next.expire(now); }
                }
                stored.apply(&reg.delta(&next));
                proptest::prop_assert_eq!(&stored, &next.to_stored());
                // The block index is every node's block, by holder.
                let blocks: BTreeMap<u32, String> = next
                    .nodes()
                    .map(|n| (next.ipam.index_of(n.pod_cidr).unwrap(), n.name.clone()))
                    .collect();
                proptest::prop_assert_eq!(&next.blocks, &blocks);
                let underlays: BTreeSet<(Ipv4Addr, String)> =
                    next.nodes().map(|n| (n.underlay_ip, n.name.clone())).collect();
                proptest::prop_assert_eq!(&next.underlays, &underlays);
                reg = next;
            }
        }
    }
}
