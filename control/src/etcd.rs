//! The etcd store (`serve --store etcd`): any number of replicas serve one etcd cluster.
//!
//! Keys under the prefix (`--etcd-prefix`, default `/podnet`):
//! - `config`: the cluster layout, written once. A replica started with another layout refuses
//!   to start and names the value that differs.
//! - `nodes/NAME`: the node record (the API's `Node` as JSON). Its etcd mod revision is the
//!   record's revision, so the revisions agents see are etcd revisions.
//! - `cidrs/A.B.C.D-LEN`: the name holding that pod CIDR. A new claim is written in the same
//!   transaction as the node record, on `create_revision == 0`, so two replicas racing can
//!   never hand one CIDR to two nodes.
//! - `alive/NAME`: bound to the node's etcd lease (TTL `--lease-ttl`, in whole seconds).
//!   A renewal keeps the lease alive. When it lapses, etcd deletes the key, every replica sees
//!   that in its watch, and the first one to write marks the node down.
//! - `pods/NS/NAME`, `namespaces/NS` and `policies/NS/NAME`: network policy's records (a
//!   `PodRecord`, a namespace's labels, a `NetworkPolicy`, as JSON), one key each, so a change
//!   writes only the records it changes.
//!
//! Each replica keeps a mirror of these keys ([`Mirror`] plus the [`Registry`]), fed by one
//! etcd watch. Lists, node reads and watch streams are served from the mirror, so they keep
//! working while etcd is unreachable. A change is planned on a copy of the registry with the
//! same rules as the file store ([`plan`]). It is then written as one transaction that
//! compares every key it read at the revision it was read. If another replica got there
//! first, the mirror catches up and the change is planned again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, ConnectOptions, EventType as KvEvent, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};
use ipnet::{Ipv4Net, Ipv6Net};
use podnet_proto::api::{EventType, Node, NodeState, WatchEvent};
use serde::{Deserialize, Serialize};

use crate::etcd_tls::{self, EtcdTls, Material};
use crate::ipam::Ipam;
use crate::policy::PolicyBook;
use crate::state::{Registry, StoredState, Timing, STATE_FORMAT};
use podnet_proto::policy::{Labels, NetworkPolicy, PodRecord, PolicyState};

/// A single etcd call may take this long; then the write is answered 503.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// etcd refuses transactions with more operations than its `--max-txn-ops` (128 by default):
/// a sweep writes at most this many nodes per transaction (three operations each).
pub const SWEEP_BATCH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd unavailable at {endpoints}: {reason}")]
    Unavailable { endpoints: String, reason: String },
    #[error(
        "etcd prefix {prefix} holds a cluster with {what} {stored}, but this replica was started \
         with {ours}: every replica of one cluster takes the same --cluster-cidr, --node-prefix \
         and their -v6 forms (or give this one another --etcd-prefix)"
    )]
    ConfigMismatch {
        prefix: String,
        what: &'static str,
        stored: String,
        ours: String,
    },
    #[error("etcd key {key} is not what podnet writes there ({reason}); was the prefix used by something else?")]
    Corrupt { key: String, reason: String },
    #[error("--etcd-endpoints: {0}")]
    Endpoints(String),
    #[error("etcd TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Copy(String),
}

/// What [`Etcd::copy_in`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyReport {
    /// Keys written by this run.
    pub written: usize,
    /// Keys an earlier, cut-short run had written already.
    pub present: usize,
    /// An earlier run had finished the copy.
    pub done_before: bool,
}

/// The `copy` key: which state is being copied in, and whether all of it is.
#[derive(Serialize, Deserialize)]
struct CopyMarker {
    digest: String,
    done: bool,
}

/// FNV-1a over every key and value: tells one state's copy from another's.
fn digest(puts: &[(String, Vec<u8>)]) -> String {
    let bytes = puts
        .iter()
        .flat_map(|(k, v)| k.bytes().chain([0]).chain(v.iter().copied()).chain([0]));
    format!("{:016x}", crate::state::fnv1a(bytes))
}

/// The layout stored once under `config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Layout {
    format: u32,
    cluster_cidr: Ipv4Net,
    node_prefix: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_cidr_v6: Option<Ipv6Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_prefix_v6: Option<u8>,
}

impl Layout {
    fn of(ipam: &Ipam) -> Layout {
        Layout {
            format: STATE_FORMAT,
            cluster_cidr: ipam.cluster(),
            node_prefix: ipam.node_prefix(),
            cluster_cidr_v6: ipam.v6().map(|(cidr, _)| cidr),
            node_prefix_v6: ipam.v6().map(|(_, prefix)| prefix),
        }
    }

    fn ipam(&self) -> Result<Ipam, crate::ipam::IpamError> {
        Ipam::recorded(
            self.cluster_cidr,
            self.node_prefix,
            self.cluster_cidr_v6,
            self.node_prefix_v6,
        )
    }
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
enum Key<'a> {
    Node(&'a str),
    Cidr(Ipv4Net),
    Alive(&'a str),
    /// A policy record, by its kind and `NS/NAME` (or `NS`).
    Record(RecordKind, &'a str),
}

/// The kinds of network policy records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum RecordKind {
    Pod,
    Namespace,
    Policy,
}

impl RecordKind {
    const ALL: [RecordKind; 3] = [RecordKind::Pod, RecordKind::Namespace, RecordKind::Policy];

    fn dir(self) -> &'static str {
        match self {
            RecordKind::Pod => "pods",
            RecordKind::Namespace => "namespaces",
            RecordKind::Policy => "policies",
        }
    }
}

/// The key names under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// Where `store migrate` and `store restore` record what they are copying in.
    fn copy(&self) -> String {
        format!("{}/copy", self.prefix)
    }

    fn node(&self, name: &str) -> String {
        format!("{}/nodes/{name}", self.prefix)
    }

    fn cidr(&self, net: Ipv4Net) -> String {
        format!(
            "{}/cidrs/{}-{}",
            self.prefix,
            net.network(),
            net.prefix_len()
        )
    }

    fn alive(&self, name: &str) -> String {
        format!("{}/alive/{name}", self.prefix)
    }

    fn record(&self, kind: RecordKind, key: &str) -> String {
        format!("{}/{}/{key}", self.prefix, kind.dir())
    }

    fn parse<'a>(&self, key: &'a str) -> Option<Key<'a>> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "nodes" => Some(Key::Node(name)),
            "alive" => Some(Key::Alive(name)),
            dir if RecordKind::ALL.iter().any(|k| k.dir() == dir) => {
                let kind = RecordKind::ALL.into_iter().find(|k| k.dir() == dir)?;
                Some(Key::Record(kind, name))
            }
            "cidrs" => {
                let (ip, len) = name.split_once('-')?;
                Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?)
                    .ok()
                    .map(Key::Cidr)
            }
            _ => None,
        }
    }
}

/// What the mirror knows of etcd beyond the node records the [`Registry`] holds.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    /// Mod revision of each node record, by name.
    node_revs: HashMap<String, i64>,
    /// Holder and mod revision of each claimed pod CIDR.
    claims: HashMap<Ipv4Net, (String, i64)>,
    /// The lease of each live node's `alive` key, by name.
    leases: HashMap<String, i64>,
    /// Mod revision of each policy record, by etcd key.
    record_revs: HashMap<String, i64>,
}

impl Mirror {
    /// The lease keeping `name` alive, if its `alive` key exists.
    pub fn lease(&self, name: &str) -> Option<i64> {
        self.leases.get(name).copied()
    }

    /// Nodes the registry holds as up whose lease is gone: the sweep marks them down. Not
    /// before one lease TTL after this replica read the node's record (loaded, or written
    /// since), so a node copied in without an `alive` key (`store migrate`), or whose lease ran
    /// out while no replica ran, gets as long to renew as after a file store's restart.
    pub fn lapsed<'a>(&'a self, registry: &'a Registry, now: u64) -> impl Iterator<Item = &'a str> {
        registry
            .live()
            .filter(move |n| {
                !self.leases.contains_key(&n.name) && registry.lease_over(&n.name, now)
            })
            .map(|n| n.name.as_str())
    }
}

/// One key change seen in etcd: a put (with its value) or a delete.
#[derive(Clone, Debug)]
pub struct Change {
    pub key: String,
    /// `None` for a delete.
    pub value: Option<Vec<u8>>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// What a node record change means to watchers.
fn transition(prev: Option<&Node>, next: Option<&Node>) -> Option<EventType> {
    fn up(n: Option<&Node>) -> Option<&Node> {
        n.filter(|n| n.state == NodeState::Up)
    }
    match (up(prev), up(next)) {
        (None, Some(_)) => Some(EventType::Added),
        (Some(_), None) => Some(EventType::Deleted),
        (Some(a), Some(b)) if !same_route(a, b) => Some(EventType::Modified),
        _ => None,
    }
}

/// Whether two records route alike (what agents act on).
fn same_route(a: &Node, b: &Node) -> bool {
    (
        a.underlay_ip,
        a.encap,
        a.vtep_mac,
        a.pod_cidr,
        a.wireguard_public_key,
    ) == (
        b.underlay_ip,
        b.encap,
        b.vtep_mac,
        b.pod_cidr,
        b.wireguard_public_key,
    )
}

/// Applies changes seen in etcd to the mirror and returns the events for watchers, in order.
/// A record podnet cannot read is logged and skipped: one bad key must not stop the mirror.
pub fn apply(
    keys: &Keys,
    registry: &mut Registry,
    mirror: &mut Mirror,
    changes: &[Change],
    lease_ends: u64,
) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    for change in changes {
        let revision = change.mod_revision.max(0) as u64;
        match keys.parse(&change.key) {
            Some(Key::Node(name)) => {
                let prev = registry.node(name).cloned();
                let next = match &change.value {
                    None => None,
                    Some(value) => match serde_json::from_slice::<Node>(value) {
                        Ok(node) if node.name == name => Some(Node { revision, ..node }),
                        Ok(node) => {
                            tracing::warn!(key = %change.key, "etcd node record names {:?}, skipped", node.name);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(key = %change.key, "etcd node record unreadable, skipped: {e}");
                            continue;
                        }
                    },
                };
                let kind = transition(prev.as_ref(), next.as_ref());
                match next {
                    Some(node) => {
                        mirror
                            .node_revs
                            .insert(name.to_string(), change.mod_revision);
                        registry.mirror_put(node.clone(), lease_ends);
                        if let Some(kind) = kind {
                            events.push(WatchEvent {
                                kind,
                                revision,
                                node,
                            });
                        }
                    }
                    None => {
                        mirror.node_revs.remove(name);
                        registry.mirror_remove(name);
                        if let (Some(kind), Some(prev)) = (kind, prev) {
                            events.push(WatchEvent {
                                kind,
                                revision,
                                node: Node {
                                    state: NodeState::Down,
                                    revision,
                                    ..prev
                                },
                            });
                        }
                    }
                }
            }
            Some(Key::Cidr(net)) => match &change.value {
                Some(holder) => {
                    let holder = String::from_utf8_lossy(holder).into_owned();
                    mirror.claims.insert(net, (holder, change.mod_revision));
                }
                None => {
                    mirror.claims.remove(&net);
                }
            },
            Some(Key::Alive(name)) => match change.value {
                Some(_) => {
                    mirror.leases.insert(name.to_string(), change.lease);
                }
                None => {
                    mirror.leases.remove(name);
                }
            },
            // Kept by apply_records.
            Some(Key::Record(..)) | None => {}
        }
        registry.set_revision(registry.revision().max(revision));
    }
    events
}

/// Applies the policy record changes among `changes` to `book`; whether it changed. Its
/// revision becomes that of the last change, so agents waiting for a newer one wake. A record
/// podnet cannot read is logged and skipped, like a node record.
pub fn apply_records(
    keys: &Keys,
    book: &mut PolicyBook,
    mirror: &mut Mirror,
    changes: &[Change],
) -> bool {
    let mut state = book.state().clone();
    let mut changed = false;
    for change in changes {
        let Some(Key::Record(kind, name)) = keys.parse(&change.key) else {
            continue;
        };
        let read = match &change.value {
            None => Ok(None),
            Some(v) => read_record(&mut state, kind, name, v).map(Some),
        };
        match read {
            Err(e) => {
                tracing::warn!(key = %change.key, "etcd policy record unreadable, skipped: {e}");
                continue;
            }
            Ok(Some(())) => {
                mirror
                    .record_revs
                    .insert(change.key.clone(), change.mod_revision);
            }
            Ok(None) => {
                mirror.record_revs.remove(&change.key);
                match kind {
                    RecordKind::Pod => drop(state.pods.remove(name)),
                    RecordKind::Namespace => drop(state.namespaces.remove(name)),
                    RecordKind::Policy => drop(state.policies.remove(name)),
                }
            }
        }
        changed = true;
        state.revision = state.revision.max(change.mod_revision.max(0) as u64);
    }
    if changed {
        *book = PolicyBook::from_mirror(state);
    }
    changed
}

/// Reads one record into `state`, checked as the API checks it.
fn read_record(
    state: &mut PolicyState,
    kind: RecordKind,
    name: &str,
    value: &[u8],
) -> Result<(), String> {
    match kind {
        RecordKind::Pod => {
            let pod: PodRecord = serde_json::from_slice(value).map_err(|e| e.to_string())?;
            pod.validate()?;
            if pod.key() != name {
                return Err(format!("the record is for pod {}", pod.key()));
            }
            state.pods.insert(name.to_string(), pod);
        }
        RecordKind::Namespace => {
            let labels: Labels = serde_json::from_slice(value).map_err(|e| e.to_string())?;
            state.namespaces.insert(name.to_string(), labels);
        }
        RecordKind::Policy => {
            let policy: NetworkPolicy = serde_json::from_slice(value).map_err(|e| e.to_string())?;
            policy.validate().map_err(|e| e.to_string())?;
            if policy.key() != name {
                return Err(format!("the record is for policy {}", policy.key()));
            }
            state.policies.insert(name.to_string(), policy);
        }
    }
    Ok(())
}

/// The writes that turn the policy records `prev` (the mirror) into `next`: a put for every
/// record that changed, a delete for every one that went, each compared at the revision the
/// mirror read it at.
pub fn plan_records(keys: &Keys, mirror: &Mirror, prev: &PolicyState, next: &PolicyState) -> Plan {
    let mut plan = Plan::default();
    let mut diff =
        |kind: RecordKind, name: &str, before: Option<Vec<u8>>, after: Option<Vec<u8>>| {
            if before == after {
                return;
            }
            let key = keys.record(kind, name);
            let expect = match mirror.record_revs.get(&key) {
                Some(rev) => Expect::ModRevision(*rev),
                None => Expect::Absent,
            };
            plan.compares.push((key.clone(), expect));
            match after {
                Some(value) => plan.puts.push((key, value)),
                None => plan.deletes.push(key),
            }
        };
    fn json<T: Serialize>(v: Option<&T>) -> Option<Vec<u8>> {
        v.map(|v| serde_json::to_vec(v).expect("records serialize"))
    }
    let names = |a: Vec<&String>, b: Vec<&String>| -> BTreeSet<String> {
        a.into_iter().chain(b).cloned().collect()
    };
    for name in names(prev.pods.keys().collect(), next.pods.keys().collect()) {
        diff(
            RecordKind::Pod,
            &name,
            json(prev.pods.get(&name)),
            json(next.pods.get(&name)),
        );
    }
    for name in names(
        prev.namespaces.keys().collect(),
        next.namespaces.keys().collect(),
    ) {
        let (a, b) = (prev.namespaces.get(&name), next.namespaces.get(&name));
        diff(RecordKind::Namespace, &name, json(a), json(b));
    }
    for name in names(
        prev.policies.keys().collect(),
        next.policies.keys().collect(),
    ) {
        let (a, b) = (prev.policies.get(&name), next.policies.get(&name));
        diff(RecordKind::Policy, &name, json(a), json(b));
    }
    plan
}

/// The events that take watchers from `old` to `new` (read afresh at `revision`).
pub fn differences(old: &Registry, new: &Registry, revision: u64) -> Vec<WatchEvent> {
    let names: BTreeSet<&str> = old
        .nodes()
        .chain(new.nodes())
        .map(|n| n.name.as_str())
        .collect();
    names
        .into_iter()
        .filter_map(|name| {
            let (before, after) = (old.node(name), new.node(name));
            let kind = transition(before, after)?;
            let node = match (kind, after) {
                (EventType::Deleted, _) | (_, None) => Node {
                    state: NodeState::Down,
                    ..before?.clone()
                },
                (_, Some(after)) => after.clone(),
            };
            Some(WatchEvent {
                kind,
                revision,
                node: Node { revision, ..node },
            })
        })
        .collect()
}

/// What a key must look like for a transaction to go through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Absent,
    ModRevision(i64),
}

/// The etcd transaction that turns one registry into another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub compares: Vec<(String, Expect)>,
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
    /// The node that goes (or must stay) up: its `alive` key is put with a fresh lease.
    pub alive: Option<String>,
    /// Leases of nodes that went down or away, revoked after the write.
    pub revoke: Vec<i64>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty() && self.alive.is_none()
    }
}

/// Plans the writes that turn `prev` (the mirror) into `next`. `registering` is the node a
/// registration is for; it gets a fresh lease when it goes up, or when its lease is gone
/// (`dead_lease`: etcd just said so, before the mirror saw the key go). A node that goes down
/// gets `now` as its last heartbeat: renewals are lease keepalives that write no record, so
/// the time it was seen to lapse is the best one known, and its reservation runs from there.
pub fn plan(
    keys: &Keys,
    prev: &Registry,
    mirror: &Mirror,
    next: &Registry,
    registering: Option<&str>,
    dead_lease: Option<i64>,
    now: u64,
) -> Plan {
    let mut plan = Plan::default();
    let node_expect = |name: &str| match mirror.node_revs.get(name) {
        Some(rev) => Expect::ModRevision(*rev),
        None => Expect::Absent,
    };
    let claim_expect = |net: &Ipv4Net| match mirror.claims.get(net) {
        Some((_, rev)) => Expect::ModRevision(*rev),
        None => Expect::Absent,
    };
    let held_after: HashMap<Ipv4Net, &str> = next
        .nodes()
        .map(|n| (n.pod_cidr, n.name.as_str()))
        .collect();
    let names: BTreeSet<&str> = prev
        .nodes()
        .chain(next.nodes())
        .map(|n| n.name.as_str())
        .collect();
    for name in names {
        let before = prev.node(name);
        let lease = mirror.lease(name).filter(|l| Some(*l) != dead_lease);
        match next.node(name) {
            Some(after) => {
                let unchanged =
                    before.is_some_and(|b| same_route(b, after) && b.state == after.state);
                if !unchanged {
                    let mut record = after.clone();
                    record.revision = 0;
                    if after.state == NodeState::Down
                        && before.is_some_and(|b| b.state == NodeState::Up)
                    {
                        record.last_heartbeat = now;
                    }
                    let key = keys.node(name);
                    plan.compares.push((key.clone(), node_expect(name)));
                    plan.puts.push((key, record_json(&record)));
                    if before.map(|b| b.pod_cidr) != Some(after.pod_cidr) {
                        let key = keys.cidr(after.pod_cidr);
                        plan.compares
                            .push((key.clone(), claim_expect(&after.pod_cidr)));
                        plan.puts.push((key, name.as_bytes().to_vec()));
                    }
                }
                let went_up = before.is_none_or(|b| b.state != NodeState::Up);
                if after.state == NodeState::Up
                    && registering == Some(name)
                    && (went_up || lease.is_none())
                {
                    plan.alive = Some(name.to_string());
                }
                if after.state == NodeState::Down {
                    if let Some(lease) = lease {
                        plan.revoke.push(lease);
                        plan.deletes.push(keys.alive(name));
                    }
                }
            }
            None => {
                let key = keys.node(name);
                plan.compares.push((key.clone(), node_expect(name)));
                plan.deletes.push(key);
                if let Some(before) = before {
                    if !held_after.contains_key(&before.pod_cidr) {
                        let key = keys.cidr(before.pod_cidr);
                        plan.compares
                            .push((key.clone(), claim_expect(&before.pod_cidr)));
                        plan.deletes.push(key);
                    }
                }
                if let Some(lease) = lease {
                    plan.revoke.push(lease);
                    plan.deletes.push(keys.alive(name));
                }
            }
        }
    }
    plan
}

fn record_json(node: &Node) -> Vec<u8> {
    serde_json::to_vec(node).expect("nodes always serialize")
}

/// How a planned transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written at this revision.
    Applied(u64),
    /// A compared key had moved: another replica wrote first. The mirror must reach this
    /// revision before planning again.
    Conflict(u64),
}

/// Everything read from etcd at one revision.
pub struct Loaded {
    pub registry: Registry,
    pub book: PolicyBook,
    pub mirror: Mirror,
    pub revision: u64,
}

/// A connection to the etcd cluster and the key names under the prefix.
#[derive(Clone)]
pub struct Etcd {
    connection: Arc<Connection>,
    keys: Keys,
    endpoints: String,
    lease_ttl_s: i64,
}

/// The client, and the TLS files it was made with: when a call fails and the files changed
/// since, the client is made again with the new ones.
struct Connection {
    endpoints: Vec<String>,
    tls: Option<EtcdTls>,
    current: Mutex<(etcd_client::Client, Option<Material>)>,
    /// Why the files on disk were last found unusable: said once, not at every failed call.
    unusable: Mutex<Option<String>>,
}

impl Connection {
    /// A client (lazy: it dials at its first call).
    async fn client(
        endpoints: &[String],
        material: Option<&Material>,
    ) -> Result<etcd_client::Client, etcd_client::Error> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member that lost its leader refuses at once rather than hanging the call, and
            // ends our watch, so the replica can tell "etcd unavailable".
            .with_require_leader(true);
        if let Some(material) = material {
            options = options.with_tls(material.options());
        }
        etcd_client::Client::connect(endpoints, Some(options)).await
    }

    fn get(&self) -> etcd_client::Client {
        self.current.lock().expect("etcd client lock").0.clone()
    }

    /// After a failed call: when the TLS files changed on disk, the next calls dial with them.
    async fn refresh(&self) {
        let Some(tls) = &self.tls else { return };
        let material = match tls.read() {
            Ok(m) => m,
            Err(e) => return self.unusable(format!("keeping the loaded ones: {e}")),
        };
        if self.current.lock().expect("etcd client lock").1.as_ref() == Some(&material) {
            return;
        }
        match Connection::client(&self.endpoints, Some(&material)).await {
            Ok(client) => {
                tracing::info!("etcd TLS files changed on disk; dialling with the new ones");
                *self.current.lock().expect("etcd client lock") = (client, Some(material));
                *self.unusable.lock().expect("etcd client lock") = None;
            }
            Err(e) => self.unusable(format!("they changed, but do not load: {e}")),
        }
    }

    fn unusable(&self, why: String) {
        let mut last = self.unusable.lock().expect("etcd client lock");
        if last.as_deref() != Some(why.as_str()) {
            tracing::warn!("etcd TLS files not usable, {why}");
            *last = Some(why);
        }
    }
}

impl Etcd {
    /// Connects (lazily: an unreachable cluster fails the first call, not this one).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        lease_ttl: Duration,
        tls: Option<EtcdTls>,
    ) -> Result<Etcd, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Endpoints(
                "no endpoint given; pass --etcd-endpoints http://HOST:2379[,...]".into(),
            ));
        }
        for url in endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(EtcdError::Endpoints(format!(
                    "{url:?} is not a URL like http://198.18.0.1:2379"
                )));
            }
        }
        if !prefix.starts_with('/') || prefix.trim_end_matches('/').is_empty() {
            return Err(EtcdError::Endpoints(format!(
                "--etcd-prefix {prefix:?} must be a key path like /podnet"
            )));
        }
        etcd_tls::check_endpoints(endpoints, tls.as_ref()).map_err(EtcdError::Endpoints)?;
        let material = tls
            .as_ref()
            .map(EtcdTls::read)
            .transpose()
            .map_err(EtcdError::Tls)?;
        let joined = endpoints.join(",");
        let client = Connection::client(endpoints, material.as_ref())
            .await
            .map_err(|e| EtcdError::Unavailable {
                endpoints: joined.clone(),
                reason: e.to_string(),
            })?;
        Ok(Etcd {
            connection: Arc::new(Connection {
                endpoints: endpoints.to_vec(),
                tls,
                current: Mutex::new((client, material)),
                unusable: Mutex::new(None),
            }),
            keys: Keys::new(prefix),
            endpoints: joined,
            // etcd counts leases in whole seconds.
            lease_ttl_s: lease_ttl.as_millis().div_ceil(1000).max(1) as i64,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> EtcdError {
        EtcdError::Unavailable {
            endpoints: self.endpoints.clone(),
            reason: e.to_string(),
        }
    }

    /// A failed call's error with its causes and what to do; the TLS files are read again,
    /// so a certificate replaced on disk is used from the next call on.
    async fn failed(&self, e: &etcd_client::Error) -> EtcdError {
        let mut reason = podnet_control_client::tls::causes(e);
        let tls = self.connection.tls.as_ref();
        let dial = etcd_tls::Dial {
            https: tls.is_some(),
            client_cert: tls.is_some_and(|t| t.client.is_some()),
        };
        if let Some(advice) = etcd_tls::advice(&reason, dial) {
            reason.push_str(". ");
            reason.push_str(advice);
        }
        self.connection.refresh().await;
        self.unavailable(reason)
    }

    fn client(&self) -> etcd_client::Client {
        self.connection.get()
    }

    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(self.failed(&e).await),
            Err(_) => Err(self.timed_out().await),
        }
    }

    async fn timed_out(&self) -> EtcdError {
        self.connection.refresh().await;
        self.unavailable(format!("no answer within {CALL_TIMEOUT:?}"))
    }

    /// Stores the cluster layout if this is the first replica, or checks it against the
    /// stored one; then reads every key into a fresh registry and mirror. Returns them with
    /// the etcd revision they were read at.
    pub async fn load(
        &self,
        ipam: Ipam,
        timing: Timing,
        lease_ends: u64,
    ) -> Result<Loaded, EtcdError> {
        let ours = Layout::of(&ipam);
        let key = self.keys.config();
        let value = serde_json::to_vec(&ours).expect("layouts serialize");
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let mut kv = self.client().kv_client();
        let resp = self.call(kv.txn(txn)).await?;
        if !resp.succeeded() {
            let stored = resp
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    etcd_client::TxnOpResponse::Get(get) => {
                        get.kvs().first().map(|kv| kv.value().to_vec())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            let stored: Layout =
                serde_json::from_slice(&stored).map_err(|e| EtcdError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            check_layout(&self.keys.prefix, &stored, &ours)?;
        }
        let resp = self
            .call(kv.get(self.keys.all(), Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let changes: Vec<Change> = resp
            .kvs()
            .iter()
            .map(|kv| Change {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: Some(kv.value().to_vec()),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            })
            .collect();
        let mut registry = Registry::new(ipam, timing);
        registry.spread_allocations();
        let mut mirror = Mirror::default();
        apply(&self.keys, &mut registry, &mut mirror, &changes, lease_ends);
        let mut book = PolicyBook::default();
        apply_records(&self.keys, &mut book, &mut mirror, &changes);
        let revision = revision.max(0) as u64;
        registry.set_revision(revision);
        // Read afresh: the revision it was read at covers every record, deleted ones too.
        let mut state = book.state().clone();
        state.revision = revision;
        Ok(Loaded {
            registry,
            book: PolicyBook::from_mirror(state),
            mirror,
            revision,
        })
    }

    /// Writes `plan` as one transaction.
    pub async fn commit(&self, plan: &Plan) -> Result<Outcome, EtcdError> {
        let mut ops: Vec<TxnOp> = Vec::new();
        let mut granted = None;
        if let Some(name) = &plan.alive {
            let mut lease = self.client().lease_client();
            let grant = self.call(lease.grant(self.lease_ttl_s, None)).await?;
            granted = Some(grant.id());
            ops.push(TxnOp::put(
                self.keys.alive(name),
                Vec::new(),
                Some(PutOptions::new().with_lease(grant.id())),
            ));
        }
        let compares: Vec<Compare> = plan
            .compares
            .iter()
            .map(|(key, expect)| match expect {
                Expect::Absent => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Expect::ModRevision(rev) => {
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev)
                }
            })
            .collect();
        ops.extend(
            plan.puts
                .iter()
                .map(|(key, value)| TxnOp::put(key.as_str(), value.clone(), None)),
        );
        ops.extend(
            plan.deletes
                .iter()
                .map(|key| TxnOp::delete(key.as_str(), None)),
        );
        let mut kv = self.client().kv_client();
        let resp = self
            .call(kv.txn(Txn::new().when(compares).and_then(ops)))
            .await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(id) = granted {
                    self.revoke(id).await;
                }
                return Err(e);
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision()).max(0) as u64;
        if !resp.succeeded() {
            if let Some(id) = granted {
                self.revoke(id).await;
            }
            return Ok(Outcome::Conflict(revision));
        }
        for &id in &plan.revoke {
            self.revoke(id).await;
        }
        Ok(Outcome::Applied(revision))
    }

    /// Revokes a lease no key needs any more; failures only leave it to run out.
    async fn revoke(&self, id: i64) {
        let mut lease = self.client().lease_client();
        if let Err(e) = self.call(lease.revoke(id)).await {
            tracing::debug!(lease = id, "lease not revoked (it runs out by itself): {e}");
        }
    }

    /// Renews a node's lease: `Ok(false)` when etcd no longer has it.
    pub async fn keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let mut lease = self.client().lease_client();
        match tokio::time::timeout(CALL_TIMEOUT, lease.keep_alive(id)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) if e.contains("not found") => {
                Ok(false)
            }
            Ok(Err(e)) => Err(self.failed(&e).await),
            Err(_) => Err(self.timed_out().await),
        }
    }

    /// A linearizable read, which needs a quorum: `Ok` means etcd can take writes.
    pub async fn probe(&self) -> Result<(), EtcdError> {
        let mut kv = self.client().kv_client();
        self.call(kv.get(self.keys.config(), None)).await.map(drop)
    }

    /// The cluster layout stored under the prefix, `None` when it holds no cluster.
    async fn layout(&self) -> Result<Option<Layout>, EtcdError> {
        let key = self.keys.config();
        let mut kv = self.client().kv_client();
        let resp = self.call(kv.get(key.as_str(), None)).await?;
        let Some(found) = resp.kvs().first() else {
            return Ok(None);
        };
        let layout: Layout =
            serde_json::from_slice(found.value()).map_err(|e| EtcdError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        Ok(Some(layout))
    }

    /// Copies `state` in as the replicas keep it: the layout, node records with their pod CIDR
    /// claims, and the policy records; no `alive` keys, since a replica gives every node that
    /// is up one lease TTL from its start to renew. Resumable: a copy cut short and run again
    /// writes only what is missing, and nothing twice. Refuses a prefix that holds a cluster
    /// other than one this same state was being copied into.
    pub async fn copy_in(
        &self,
        state: &StoredState,
        timing: Timing,
        batch: usize,
    ) -> Result<CopyReport, EtcdError> {
        let ipam = state
            .ipam()
            .map_err(|e| EtcdError::Copy(format!("the state's layout: {e}")))?;
        let registry = Registry::restore(ipam, timing, state.clone(), 0)
            .map_err(|e| EtcdError::Copy(format!("the state does not load: {e}")))?;
        let mut plan = plan(
            &self.keys,
            &Registry::new(ipam, timing),
            &Mirror::default(),
            &registry,
            None,
            None,
            0,
        );
        let records = plan_records(
            &self.keys,
            &Mirror::default(),
            &PolicyState::default(),
            &state.policy,
        );
        plan.puts.extend(records.puts);
        let layout = Layout::of(&ipam);
        plan.puts.insert(
            0,
            (
                self.keys.config(),
                serde_json::to_vec(&layout).expect("layouts serialize"),
            ),
        );
        let digest = digest(&plan.puts);
        let marker = |done: bool| {
            serde_json::to_vec(&CopyMarker {
                digest: digest.clone(),
                done,
            })
            .expect("markers serialize")
        };

        let mut kv = self.client().kv_client();
        let resp = self
            .call(kv.get(self.keys.all(), Some(GetOptions::new().with_prefix())))
            .await?;
        let existing: HashMap<String, Vec<u8>> = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect();
        let copy_key = self.keys.copy();
        match existing
            .get(&copy_key)
            .map(|v| serde_json::from_slice::<CopyMarker>(v))
        {
            None if existing.is_empty() => {}
            None => {
                let nodes = existing
                    .keys()
                    .filter(|k| matches!(self.keys.parse(k), Some(Key::Node(_))))
                    .count();
                return Err(EtcdError::Copy(format!(
                    "etcd prefix {} already holds a podnet cluster ({nodes} nodes): copy into an \
                     empty prefix (--etcd-prefix), or remove that cluster's keys first",
                    self.keys.prefix
                )));
            }
            Some(Ok(m)) if m.digest == digest && m.done => {
                return Ok(CopyReport {
                    written: 0,
                    present: plan.puts.len(),
                    done_before: true,
                });
            }
            Some(Ok(m)) if m.digest == digest => {}
            Some(_) => {
                return Err(EtcdError::Copy(format!(
                    "etcd prefix {} holds another copy, begun from a different state: copy into \
                     an empty prefix, or remove its keys first",
                    self.keys.prefix
                )));
            }
        }
        let mut todo = Vec::new();
        for (key, value) in &plan.puts {
            match existing.get(key) {
                Some(v) if v == value => {}
                Some(_) => {
                    return Err(EtcdError::Copy(format!(
                        "{key} holds something other than the state being copied; copy into an \
                         empty prefix"
                    )))
                }
                None => todo.push((key.clone(), value.clone())),
            }
        }
        let present = plan.puts.len() - todo.len();
        if !existing.contains_key(&copy_key) {
            self.put_absent(&[(copy_key.clone(), marker(false))])
                .await?;
        }
        for chunk in todo.chunks(batch.clamp(1, SWEEP_BATCH * 3)) {
            self.put_absent(chunk).await?;
        }
        let mut kv = self.client().kv_client();
        self.call(kv.put(copy_key.as_str(), marker(true), None))
            .await?;
        Ok(CopyReport {
            written: todo.len(),
            present,
            done_before: false,
        })
    }

    /// Puts keys that must not exist yet, in one transaction.
    async fn put_absent(&self, puts: &[(String, Vec<u8>)]) -> Result<(), EtcdError> {
        let compares: Vec<Compare> = puts
            .iter()
            .map(|(k, _)| Compare::create_revision(k.as_str(), CompareOp::Equal, 0))
            .collect();
        let ops: Vec<TxnOp> = puts
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None))
            .collect();
        let mut kv = self.client().kv_client();
        let resp = self
            .call(kv.txn(Txn::new().when(compares).and_then(ops)))
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(EtcdError::Copy(format!(
                "someone else wrote under {} during the copy (at {}): stop every replica and \
                 copy again",
                self.keys.prefix, puts[0].0
            )))
        }
    }

    /// Everything under the prefix as one state, in the file store's form (for `store dump`).
    pub async fn copy_out(&self, timing: Timing) -> Result<Option<StoredState>, EtcdError> {
        let Some(layout) = self.layout().await? else {
            return Ok(None);
        };
        let ipam = layout
            .ipam()
            .map_err(|e| EtcdError::Copy(format!("the stored layout: {e}")))?;
        let loaded = self.load(ipam, timing, 0).await?;
        let mut state = loaded.registry.to_stored();
        state.policy = loaded.book.state().clone();
        Ok(Some(state))
    }

    /// Watches every key under the prefix from `revision` on.
    pub async fn watch(&self, revision: u64) -> Result<WatchStream, EtcdError> {
        let mut watch = self.client().watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision as i64);
        let (_watcher, stream) = self
            .call(watch.watch(self.keys.all(), Some(options)))
            .await?;
        Ok(stream)
    }
}

/// The key changes of one watch response.
pub fn changes(resp: &etcd_client::WatchResponse) -> Vec<Change> {
    resp.events()
        .iter()
        .filter_map(|ev| {
            let kv = ev.kv()?;
            Some(Change {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: match ev.event_type() {
                    KvEvent::Put => Some(kv.value().to_vec()),
                    KvEvent::Delete => None,
                },
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            })
        })
        .collect()
}

fn check_layout(prefix: &str, stored: &Layout, ours: &Layout) -> Result<(), EtcdError> {
    let mismatch = |what, stored: String, ours: String| EtcdError::ConfigMismatch {
        prefix: prefix.to_string(),
        what,
        stored,
        ours,
    };
    if stored.format != ours.format {
        return Err(mismatch(
            "state format",
            stored.format.to_string(),
            format!("format {} (this build)", ours.format),
        ));
    }
    if stored.cluster_cidr != ours.cluster_cidr {
        return Err(mismatch(
            "cluster CIDR",
            stored.cluster_cidr.to_string(),
            format!("--cluster-cidr {}", ours.cluster_cidr),
        ));
    }
    if stored.node_prefix != ours.node_prefix {
        return Err(mismatch(
            "node prefix",
            format!("/{}", stored.node_prefix),
            format!("--node-prefix {}", ours.node_prefix),
        ));
    }
    let none = || "none".to_string();
    if stored.cluster_cidr_v6 != ours.cluster_cidr_v6 {
        return Err(mismatch(
            "IPv6 cluster CIDR",
            stored.cluster_cidr_v6.map_or_else(none, |c| c.to_string()),
            ours.cluster_cidr_v6.map_or_else(
                || "no --cluster-cidr-v6".to_string(),
                |c| format!("--cluster-cidr-v6 {c}"),
            ),
        ));
    }
    if stored.node_prefix_v6 != ours.node_prefix_v6 {
        return Err(mismatch(
            "IPv6 node prefix",
            stored.node_prefix_v6.map_or_else(none, |p| format!("/{p}")),
            ours.node_prefix_v6
                .map_or_else(none, |p| format!("--node-prefix-v6 {p}")),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_proto::api::{Encap, RegisterRequest};

    fn keys() -> Keys {
        Keys::new("/podnet/")
    }

    fn empty() -> Registry {
        Registry::new(
            Ipam::new("10.244.0.0/16".parse().unwrap(), 24).unwrap(),
            Timing {
                lease_ttl_ms: 3_000,
                reclaim_after_ms: 60_000,
            },
        )
    }

    fn req(last: u8) -> RegisterRequest {
        RegisterRequest {
            wireguard_public_key: None,
            underlay_ip: format!("198.18.0.{last}").parse().unwrap(),
            encap: Encap::Vxlan,
            vtep_mac: None,
        }
    }

    fn put(key: String, value: Vec<u8>, rev: i64, lease: i64) -> Change {
        Change {
            key,
            value: Some(value),
            mod_revision: rev,
            lease,
        }
    }

    /// What etcd would report after `plan` was written at `rev` with lease `lease`.
    fn written(plan: &Plan, rev: i64, lease: i64) -> Vec<Change> {
        let k = keys();
        let mut out: Vec<Change> = plan
            .puts
            .iter()
            .map(|(key, value)| put(key.clone(), value.clone(), rev, 0))
            .collect();
        out.extend(plan.deletes.iter().map(|key| Change {
            key: key.clone(),
            value: None,
            mod_revision: rev,
            lease: 0,
        }));
        if let Some(name) = &plan.alive {
            out.push(put(k.alive(name), Vec::new(), rev, lease));
        }
        out
    }

    /// The mirror after h1 joined: its record and claim written at revision 5, lease 9.
    fn joined_h1(k: &Keys) -> (Registry, Mirror) {
        let (mut reg, mut mirror) = (empty(), Mirror::default());
        let mut next = reg.clone();
        next.register("h1", &req(1), 1_000).unwrap();
        let joined = plan(k, &reg, &mirror, &next, Some("h1"), None, 1_000);
        apply(k, &mut reg, &mut mirror, &written(&joined, 5, 9), 0);
        (reg, mirror)
    }

    #[test]
    fn keys_parse_back() {
        let k = keys();
        assert_eq!(k.parse(&k.node("h1")), Some(Key::Node("h1")));
        assert_eq!(k.parse(&k.alive("h1")), Some(Key::Alive("h1")));
        let net: Ipv4Net = "10.244.7.0/24".parse().unwrap();
        assert_eq!(k.cidr(net), "/podnet/cidrs/10.244.7.0-24");
        assert_eq!(k.parse(&k.cidr(net)), Some(Key::Cidr(net)));
        assert_eq!(k.parse("/podnet/config"), None);
        assert_eq!(k.parse("/podnetx/nodes/h1"), None);
        assert_eq!(k.parse("/other/nodes/h1"), None);
    }

    /// A join claims its CIDR only if nobody holds it (create_revision == 0), writes the
    /// record only if it is still as read, and asks for a lease; the mirror turns what etcd
    /// wrote into one `added` event at etcd's revision.
    #[test]
    fn a_join_claims_its_cidr_on_create_revision_zero_and_is_announced_at_the_etcd_revision() {
        let k = keys();
        let (prev, mirror) = (empty(), Mirror::default());
        let mut next = prev.clone();
        next.register("h1", &req(1), 1_000).unwrap();
        let plan = plan(&k, &prev, &mirror, &next, Some("h1"), None, 1_000);
        assert_eq!(
            plan.compares,
            [
                (k.node("h1"), Expect::Absent),
                ("/podnet/cidrs/10.244.1.0-24".to_string(), Expect::Absent),
            ]
        );
        assert_eq!(plan.alive.as_deref(), Some("h1"));
        assert!(plan.deletes.is_empty() && plan.revoke.is_empty());

        let (mut reg, mut mirror) = (prev, mirror);
        let events = apply(&k, &mut reg, &mut mirror, &written(&plan, 42, 7), 0);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].kind, EventType::Added);
        assert_eq!(events[0].revision, 42);
        assert_eq!(events[0].node.revision, 42);
        assert_eq!(reg.revision(), 42);
        assert_eq!(mirror.lease("h1"), Some(7));
        assert!(reg.is_renewal("h1", &req(1)));

        // A second replica that had not seen h1 plans the same claim: its compare on the
        // claim fails in etcd, so it can never hand 10.244.1.0/24 to another name.
        let mut other = empty();
        other.register("h2", &req(2), 1_000).unwrap();
        let raced = super::plan(
            &k,
            &empty(),
            &Mirror::default(),
            &other,
            Some("h2"),
            None,
            1_000,
        );
        assert!(raced
            .compares
            .contains(&("/podnet/cidrs/10.244.1.0-24".to_string(), Expect::Absent)));
        // Planned again on the caught-up mirror, it takes the next block and compares h1's
        // claim nowhere.
        let mut next = reg.clone();
        next.register("h2", &req(2), 1_000).unwrap();
        let again = super::plan(&k, &reg, &mirror, &next, Some("h2"), None, 1_000);
        assert_eq!(
            next.node("h2").unwrap().pod_cidr.to_string(),
            "10.244.2.0/24"
        );
        assert!(again
            .compares
            .contains(&("/podnet/cidrs/10.244.2.0-24".to_string(), Expect::Absent)));
    }

    /// A lapsed lease: the sweep writes the node down (compared at the revision it read) with
    /// the time it saw the lapse, and watchers get one `deleted` event.
    #[test]
    fn a_lapsed_lease_is_written_down_once_and_announced() {
        let k = keys();
        let (mut reg, mut mirror) = joined_h1(&k);
        // etcd deletes the alive key when the lease runs out.
        let gone = Change {
            key: k.alive("h1"),
            value: None,
            mod_revision: 6,
            lease: 0,
        };
        assert!(apply(&k, &mut reg, &mut mirror, &[gone], 0).is_empty());
        assert_eq!(mirror.lapsed(&reg, 0).collect::<Vec<_>>(), ["h1"]);

        let mut next = reg.clone();
        next.remove("h1", false);
        let down = plan(&k, &reg, &mirror, &next, None, None, 9_999);
        assert_eq!(down.compares, [(k.node("h1"), Expect::ModRevision(5))]);
        assert!(down.alive.is_none() && down.revoke.is_empty());
        let record: Node = serde_json::from_slice(&down.puts[0].1).unwrap();
        assert_eq!(record.state, NodeState::Down);
        assert_eq!(record.last_heartbeat, 9_999);
        let events = apply(&k, &mut reg, &mut mirror, &written(&down, 7, 0), 0);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].kind, events[0].revision, events[0].node.state),
            (EventType::Deleted, 7, NodeState::Down)
        );
        assert_eq!(mirror.lapsed(&reg, 0).count(), 0);
    }

    /// A node record without an `alive` key (copied in by `store migrate`, or whose lease ran
    /// out while no replica ran) is up for one lease TTL from when the replica read it, then
    /// lapses like any other.
    #[test]
    fn an_up_node_without_a_lease_gets_one_ttl_from_its_load_to_renew() {
        let k = keys();
        let mut joined = empty();
        joined.register("h1", &req(1), 0).unwrap();
        let (mut reg, mut mirror) = (empty(), Mirror::default());
        let node = joined.node("h1").unwrap();
        let record = put(k.node("h1"), record_json(node), 3, 0);
        apply(&k, &mut reg, &mut mirror, &[record], 20_000);
        assert_eq!(mirror.lapsed(&reg, 19_999).count(), 0, "still in its grace");
        assert_eq!(mirror.lapsed(&reg, 20_000).collect::<Vec<_>>(), ["h1"]);
    }

    /// A graceful leave with purge deletes the record, the claim and the alive key, and
    /// revokes the lease; a renewal that changes nothing plans nothing.
    #[test]
    fn purge_releases_everything_and_a_plain_renewal_writes_nothing() {
        let k = keys();
        let (mut reg, mut mirror) = joined_h1(&k);

        let mut renewed = reg.clone();
        renewed.register("h1", &req(1), 2_000).unwrap();
        assert!(plan(&k, &reg, &mirror, &renewed, Some("h1"), None, 2_000).is_empty());
        // Unless etcd just said the lease is gone: then the alive key gets a fresh one.
        let revived = plan(&k, &reg, &mirror, &renewed, Some("h1"), Some(9), 2_000);
        assert_eq!(revived.alive.as_deref(), Some("h1"));
        assert!(revived.puts.is_empty());

        let mut gone = reg.clone();
        gone.remove("h1", true);
        let purge = plan(&k, &reg, &mirror, &gone, None, None, 3_000);
        assert_eq!(
            purge.deletes,
            [
                k.node("h1"),
                k.cidr("10.244.1.0/24".parse().unwrap()),
                k.alive("h1")
            ]
        );
        assert_eq!(purge.revoke, [9]);
        let events = apply(&k, &mut reg, &mut mirror, &written(&purge, 8, 0), 0);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventType::Deleted);
        assert!(reg.node("h1").is_none());
    }

    #[test]
    fn a_record_podnet_cannot_read_is_skipped_not_fatal() {
        let k = keys();
        let (mut reg, mut mirror) = (empty(), Mirror::default());
        let events = apply(
            &k,
            &mut reg,
            &mut mirror,
            &[put(k.node("h1"), b"{not json".to_vec(), 3, 0)],
            0,
        );
        assert!(events.is_empty());
        assert!(reg.node("h1").is_none());
    }

    #[test]
    fn a_different_layout_names_the_value_that_differs() {
        let ours = Layout::of(&Ipam::new("10.244.0.0/16".parse().unwrap(), 24).unwrap());
        let stored = Layout {
            node_prefix: 26,
            ..ours.clone()
        };
        let err = check_layout("/podnet", &stored, &ours)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node prefix /26") && err.contains("--node-prefix 24"),
            "{err}"
        );
        let stored = Layout {
            cluster_cidr: "10.0.0.0/8".parse().unwrap(),
            ..ours.clone()
        };
        let err = check_layout("/podnet", &stored, &ours)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster CIDR 10.0.0.0/8"), "{err}");
        assert!(check_layout("/podnet", &ours, &ours).is_ok());
        // Dual-stack: a replica without the stored IPv6 layout, or with another one.
        let v6 = |cidr: &str, prefix| {
            let ipam = Ipam::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
            Layout::of(&ipam.with_v6(cidr.parse().unwrap(), prefix).unwrap())
        };
        let dual = v6("fd00:10:244::/56", 64);
        assert!(check_layout("/podnet", &dual, &dual).is_ok());
        let err = check_layout("/podnet", &dual, &ours)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("IPv6 cluster CIDR fd00:10:244::/56")
                && err.contains("no --cluster-cidr-v6"),
            "{err}"
        );
        let err = check_layout("/podnet", &dual, &v6("fd00:10:244::/56", 72))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("IPv6 node prefix /64") && err.contains("--node-prefix-v6 72"),
            "{err}"
        );
        // A layout written before IPv6 existed reads as single-stack.
        let old: Layout =
            serde_json::from_str(r#"{"format":1,"cluster_cidr":"10.244.0.0/16","node_prefix":24}"#)
                .unwrap();
        assert_eq!(old, ours);
        assert_eq!(old.ipam().unwrap().v6(), None);
    }

    #[test]
    fn policy_records_are_written_one_key_each_and_read_back() {
        let k = keys();
        let (mut book, mut mirror) = (PolicyBook::default(), Mirror::default());
        let pod = |name: &str, ip: &str| -> PodRecord {
            serde_json::from_value(serde_json::json!({"namespace": "x", "name": name,
                "node": "h1", "ips": [ip], "container_id": "c"}))
            .unwrap()
        };
        let mut next = book.clone();
        next.put_pod(pod("a", "10.244.1.2"), None).unwrap();
        next.put_pod(pod("b", "10.244.1.3"), None).unwrap();
        let policy = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p", "namespace": "x"}}),
        );
        next.apply(vec![policy.unwrap()]).unwrap();
        let first = plan_records(&k, &mirror, book.state(), next.state());
        let put_keys: Vec<&str> = first.puts.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(
            put_keys,
            [
                "/podnet/pods/x/a",
                "/podnet/pods/x/b",
                "/podnet/policies/x/p"
            ]
        );
        assert!(first.compares.iter().all(|(_, e)| *e == Expect::Absent));
        assert!(apply_records(
            &k,
            &mut book,
            &mut mirror,
            &written(&first, 7, 0)
        ));
        assert_eq!(book.state().pods, next.state().pods);
        assert_eq!(book.state().policies, next.state().policies);
        assert_eq!(book.revision(), 7, "the revision etcd wrote them at");

        // A later change writes only what changed, compared at the revision it was read.
        let mut later = book.clone();
        later.delete_pod("x", "a", None).unwrap();
        let change = podnet_proto::policy::LabelChange::parse(&["app=web".into()]).unwrap();
        later.label_pod("x", "b", &change).unwrap();
        let second = plan_records(&k, &mirror, book.state(), later.state());
        assert_eq!(second.deletes, ["/podnet/pods/x/a"]);
        assert_eq!(second.puts.len(), 1);
        assert_eq!(second.puts[0].0, "/podnet/pods/x/b");
        assert!(second
            .compares
            .iter()
            .all(|(_, e)| *e == Expect::ModRevision(7)));
        assert!(apply_records(
            &k,
            &mut book,
            &mut mirror,
            &written(&second, 9, 0)
        ));
        assert_eq!(book.state().pods, later.state().pods);
        assert_eq!(book.revision(), 9);

        // A record podnet cannot read is skipped; the rest still applies.
        let junk = put("/podnet/policies/x/q".into(), b"{".to_vec(), 10, 0);
        assert!(!apply_records(&k, &mut book, &mut mirror, &[junk]));
        assert_eq!(book.revision(), 9);
        // Node keys are not records.
        let node = put(k.alive("h1"), vec![], 11, 3);
        assert!(!apply_records(&k, &mut book, &mut mirror, &[node]));
    }
}
