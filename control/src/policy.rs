//! The pod, namespace and policy records network policy is enforced from, and the rules for
//! changing them: who may write a pod, what counts as a clash, and that a batch of policies is
//! accepted whole or not at all.
//!
//! Pure state like [`Registry`](crate::state::Registry): the server applies a change
//! ([`PolicyChange`]) to a copy, saves it, then makes it the record.

use podnet_proto::policy::{
    LabelChange, NetworkPolicy, PodRecord, PolicyState, NAMESPACE_NAME_LABEL,
};
use serde_json::{json, Value};

use crate::state::RestoreError;

/// A change that was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// What `policy apply` did to each policy, as `kubectl apply` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Applied {
    Created,
    Configured,
    Unchanged,
}

/// The records, at a revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyBook {
    state: PolicyState,
}

impl PolicyBook {
    /// The records as a store holds them, checked as if each had just been written: a pod or
    /// policy under another key than its own, or one that would be refused now, is an error.
    pub fn restore(state: PolicyState) -> Result<PolicyBook, RestoreError> {
        let bad = |what, key: &String, reason: String| RestoreError::BadRecord {
            what,
            key: key.clone(),
            reason,
        };
        for (key, pod) in &state.pods {
            pod.validate().map_err(|e| bad("pod", key, e))?;
            if pod.key() != *key {
                return Err(bad(
                    "pod",
                    key,
                    format!("filed under the key of {}", pod.key()),
                ));
            }
        }
        for (key, policy) in &state.policies {
            policy
                .validate()
                .map_err(|e| bad("policy", key, e.to_string()))?;
            if policy.key() != *key {
                return Err(bad(
                    "policy",
                    key,
                    format!("filed under the key of {}", policy.key()),
                ));
            }
        }
        for (ns, labels) in &state.namespaces {
            LabelChange {
                set: labels.clone(),
                remove: vec![],
            }
            .validate()
            .and_then(|()| podnet_proto::policy::check_namespace(ns))
            .map_err(|e| bad("namespace", ns, e))?;
        }
        Ok(PolicyBook { state })
    }

    /// Records an etcd mirror read, each checked as it was read.
    pub fn from_mirror(state: PolicyState) -> PolicyBook {
        PolicyBook { state }
    }

    pub fn state(&self) -> &PolicyState {
        &self.state
    }

    pub fn revision(&self) -> u64 {
        self.state.revision
    }

    fn bump(&mut self, changed: bool) -> bool {
        if changed {
            self.state.revision += 1;
        }
        changed
    }

    /// Registers or updates a pod. `by_node` is the node a certificate speaks for (`None`:
    /// an operator, or a service without mTLS). A node is the authority on its own addresses:
    /// a record of its own that still holds one of them is stale and goes.
    pub fn put_pod(&mut self, pod: PodRecord, by_node: Option<&str>) -> Result<bool, BookError> {
        pod.validate().map_err(BookError::Invalid)?;
        if let Some(node) = by_node.filter(|n| *n != pod.node) {
            return Err(BookError::Forbidden(format!(
                "the client certificate is for node {node:?}, which may register pods only on \
                 itself, not on {:?}",
                pod.node
            )));
        }
        let key = pod.key();
        if let Some(old) = self.state.pods.get(&key).filter(|o| o.node != pod.node) {
            return Err(BookError::Conflict(format!(
                "pod {key} is registered on node {:?} (container {}); delete it there first, or \
                 give this pod another name",
                old.node, old.container_id
            )));
        }
        let clashes: Vec<&PodRecord> = self
            .state
            .pods
            .values()
            .filter(|o| o.key() != key && o.ips.iter().any(|ip| pod.ips.contains(ip)))
            .collect();
        if let Some(other) = clashes.iter().find(|o| o.node != pod.node) {
            return Err(BookError::Conflict(format!(
                "an address of pod {key} belongs to pod {} on node {:?}; two nodes cannot hand \
                 out the same pod address",
                other.key(),
                other.node
            )));
        }
        let stale: Vec<String> = clashes.iter().map(|o| o.key()).collect();
        for k in &stale {
            self.state.pods.remove(k);
        }
        let changed = self.state.pods.get(&key) != Some(&pod) || !stale.is_empty();
        self.state.pods.insert(key, pod);
        Ok(self.bump(changed))
    }

    /// Forgets a pod; deleting one that is not there is no error (CNI DEL is idempotent).
    pub fn delete_pod(
        &mut self,
        namespace: &str,
        name: &str,
        by_node: Option<&str>,
    ) -> Result<bool, BookError> {
        let key = format!("{namespace}/{name}");
        let Some(old) = self.state.pods.get(&key) else {
            return Ok(false);
        };
        if let Some(node) = by_node.filter(|n| *n != old.node) {
            return Err(BookError::Forbidden(format!(
                "pod {key} runs on node {:?}; the certificate of node {node:?} may delete only \
                 its own pods",
                old.node
            )));
        }
        self.state.pods.remove(&key);
        Ok(self.bump(true))
    }

    /// Sets and removes labels of a registered pod.
    pub fn label_pod(
        &mut self,
        namespace: &str,
        name: &str,
        change: &LabelChange,
    ) -> Result<bool, BookError> {
        change.validate().map_err(BookError::Invalid)?;
        let key = format!("{namespace}/{name}");
        let pod = self.state.pods.get_mut(&key).ok_or_else(|| {
            BookError::NotFound(format!(
                "no pod {key}; `podnet-control pods` lists the registered ones"
            ))
        })?;
        let changed = change.apply(&mut pod.labels);
        Ok(self.bump(changed))
    }

    /// Sets and removes labels of a namespace (which need not have pods yet). Its name label
    /// is Kubernetes' and cannot be changed.
    pub fn label_namespace(
        &mut self,
        namespace: &str,
        change: &LabelChange,
    ) -> Result<bool, BookError> {
        podnet_proto::policy::check_namespace(namespace).map_err(BookError::Invalid)?;
        change.validate().map_err(BookError::Invalid)?;
        if change.set.contains_key(NAMESPACE_NAME_LABEL)
            || change.remove.iter().any(|k| k == NAMESPACE_NAME_LABEL)
        {
            return Err(BookError::Invalid(format!(
                "{NAMESPACE_NAME_LABEL} is always the namespace's own name and cannot be changed"
            )));
        }
        let labels = self
            .state
            .namespaces
            .entry(namespace.to_string())
            .or_default();
        let changed = change.apply(labels);
        if labels.is_empty() {
            self.state.namespaces.remove(namespace);
        }
        Ok(self.bump(changed))
    }

    /// Creates or replaces every policy of `batch`, or none: the first invalid document (or a
    /// policy given twice) refuses the whole batch.
    pub fn apply(
        &mut self,
        batch: Vec<NetworkPolicy>,
    ) -> Result<Vec<(String, Applied)>, BookError> {
        if batch.is_empty() {
            return Err(BookError::Invalid(
                "no policies given; send a NetworkPolicy, a list of them, or a List".into(),
            ));
        }
        for (i, p) in batch.iter().enumerate() {
            let name = if p.metadata.name.is_empty() {
                format!("policy {}", i + 1)
            } else {
                p.key()
            };
            p.validate()
                .map_err(|e| BookError::Invalid(format!("{name}: {e}")))?;
            if batch[..i].iter().any(|q| q.key() == p.key()) {
                return Err(BookError::Invalid(format!(
                    "{name} is given twice in one apply"
                )));
            }
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut changed = false;
        for mut p in batch {
            p.metadata.namespace = Some(p.namespace().to_string());
            let key = p.key();
            let result = match self.state.policies.get(&key) {
                None => Applied::Created,
                Some(old) if *old == p => Applied::Unchanged,
                Some(_) => Applied::Configured,
            };
            changed |= result != Applied::Unchanged;
            self.state.policies.insert(key.clone(), p);
            results.push((key, result));
        }
        self.bump(changed);
        Ok(results)
    }

    /// Deletes a policy; one that does not exist is an error, as with kubectl.
    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<(), BookError> {
        let key = format!("{namespace}/{name}");
        if self.state.policies.remove(&key).is_none() {
            return Err(BookError::NotFound(format!(
                "no policy {key}; `podnet-control policy list` lists them"
            )));
        }
        self.bump(true);
        Ok(())
    }
}

/// One change to the records, as a request asked for it.
pub enum PolicyChange {
    PutPod {
        pod: PodRecord,
        by_node: Option<String>,
    },
    DeletePod {
        namespace: String,
        name: String,
        by_node: Option<String>,
    },
    LabelPod {
        namespace: String,
        name: String,
        change: LabelChange,
    },
    LabelNamespace {
        namespace: String,
        change: LabelChange,
    },
    Apply(Vec<NetworkPolicy>),
    DeletePolicy {
        namespace: String,
        name: String,
    },
}

impl PolicyChange {
    /// Applies the change to `book`; the answer's body (the backend adds the revision).
    pub fn apply(&self, book: &mut PolicyBook) -> Result<Value, BookError> {
        let changed = |c: bool| if c { "changed" } else { "unchanged" };
        Ok(match self {
            PolicyChange::PutPod { pod, by_node } => {
                let c = book.put_pod(pod.clone(), by_node.as_deref())?;
                json!({"pod": pod.key(), "result": changed(c)})
            }
            PolicyChange::DeletePod {
                namespace,
                name,
                by_node,
            } => {
                let c = book.delete_pod(namespace, name, by_node.as_deref())?;
                let result = if c { "deleted" } else { "absent" };
                json!({"pod": format!("{namespace}/{name}"), "result": result})
            }
            PolicyChange::LabelPod {
                namespace,
                name,
                change,
            } => {
                let c = book.label_pod(namespace, name, change)?;
                let key = format!("{namespace}/{name}");
                json!({"pod": key, "result": changed(c), "labels": book.state().pods[&key].labels})
            }
            PolicyChange::LabelNamespace { namespace, change } => {
                let c = book.label_namespace(namespace, change)?;
                let labels = book.state().namespace_list().remove(namespace);
                json!({"namespace": namespace, "result": changed(c), "labels": labels})
            }
            PolicyChange::Apply(batch) => {
                let results = book.apply(batch.clone())?;
                let list: Vec<Value> = results
                    .into_iter()
                    .map(|(policy, result)| json!({"policy": policy, "result": result}))
                    .collect();
                json!({ "policies": list })
            }
            PolicyChange::DeletePolicy { namespace, name } => {
                book.delete_policy(namespace, name)?;
                json!({"policy": format!("{namespace}/{name}"), "result": "deleted"})
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_proto::policy::Labels;

    fn pod(ns: &str, name: &str, node: &str, ip: &str) -> PodRecord {
        PodRecord {
            namespace: ns.into(),
            name: name.into(),
            node: node.into(),
            ips: vec![ip.parse().unwrap()],
            labels: Labels::new(),
            ports: vec![],
            container_id: format!("c-{name}"),
        }
    }

    fn policy(json: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_node_writes_only_its_own_pods() {
        let mut b = PolicyBook::default();
        assert_eq!(
            b.put_pod(pod("x", "a", "h1", "10.244.1.2"), Some("h1")),
            Ok(true)
        );
        assert_eq!(b.revision(), 1);
        assert_eq!(
            b.put_pod(pod("x", "a", "h1", "10.244.1.2"), Some("h1")),
            Ok(false)
        );
        assert_eq!(b.revision(), 1, "an unchanged record does not count");
        let e = b.put_pod(pod("x", "b", "h1", "10.244.1.3"), Some("h2"));
        assert!(matches!(e, Err(BookError::Forbidden(_))), "{e:?}");
        let e = b.delete_pod("x", "a", Some("h2"));
        assert!(matches!(e, Err(BookError::Forbidden(_))), "{e:?}");
        assert_eq!(b.delete_pod("x", "a", Some("h1")), Ok(true));
        assert_eq!(b.delete_pod("x", "a", Some("h1")), Ok(false), "idempotent");
        assert_eq!(b.revision(), 2);
    }

    #[test]
    fn clashes_across_nodes_are_refused_and_stale_records_replaced() {
        let mut b = PolicyBook::default();
        b.put_pod(pod("x", "a", "h1", "10.244.1.2"), None).unwrap();
        let e = b.put_pod(pod("x", "a", "h2", "10.244.2.2"), None);
        assert!(
            matches!(e, Err(BookError::Conflict(ref m)) if m.contains("node \"h1\"")),
            "{e:?}"
        );
        let e = b.put_pod(pod("y", "z", "h2", "10.244.1.2"), None);
        assert!(matches!(e, Err(BookError::Conflict(_))), "{e:?}");
        // The same node reuses the address of a pod whose DEL never came: the old record goes.
        b.put_pod(pod("x", "new", "h1", "10.244.1.2"), None)
            .unwrap();
        let keys: Vec<&String> = b.state().pods.keys().collect();
        assert_eq!(keys, ["x/new"]);
    }

    #[test]
    fn labels_of_pods_and_namespaces() {
        let mut b = PolicyBook::default();
        b.put_pod(pod("x", "a", "h1", "10.244.1.2"), None).unwrap();
        let set = |k: &str, v: &str| LabelChange {
            set: [(k.to_string(), v.to_string())].into(),
            remove: vec![],
        };
        assert_eq!(b.label_pod("x", "a", &set("app", "web")), Ok(true));
        assert_eq!(b.state().pods["x/a"].labels["app"], "web");
        assert!(matches!(
            b.label_pod("x", "nope", &set("a", "b")),
            Err(BookError::NotFound(_))
        ));
        assert_eq!(b.label_namespace("y", &set("team", "ops")), Ok(true));
        let e = b.label_namespace("y", &set(NAMESPACE_NAME_LABEL, "z"));
        assert!(matches!(e, Err(BookError::Invalid(_))), "{e:?}");
        let remove = LabelChange {
            set: Labels::new(),
            remove: vec!["team".into()],
        };
        assert_eq!(b.label_namespace("y", &remove), Ok(true));
        assert!(b.state().namespaces.is_empty(), "no empty label sets kept");
    }

    #[test]
    fn a_batch_is_applied_whole_or_not_at_all() {
        let mut b = PolicyBook::default();
        let good = policy(serde_json::json!({"metadata": {"name": "a", "namespace": "x"}}));
        let bad = policy(
            serde_json::json!({"metadata": {"name": "b", "namespace": "x"},
            "spec": {"ingress": [{"ports": [{"port": 80, "endPort": 70}]}]}}),
        );
        let e = b.apply(vec![good.clone(), bad]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x/b: spec.ingress[0].ports[0].endPort: 70 must be at least port (80) and at most 65535"
        );
        assert!(
            b.state().policies.is_empty() && b.revision() == 0,
            "nothing changed"
        );
        assert_eq!(
            b.apply(vec![good.clone()]),
            Ok(vec![("x/a".into(), Applied::Created)])
        );
        assert_eq!(
            b.apply(vec![good.clone()]),
            Ok(vec![("x/a".into(), Applied::Unchanged)])
        );
        assert_eq!(b.revision(), 1);
        let mut changed = good.clone();
        changed.spec.policy_types = Some(vec![podnet_proto::policy::Direction::Egress]);
        assert_eq!(
            b.apply(vec![changed]),
            Ok(vec![("x/a".into(), Applied::Configured)])
        );
        assert!(matches!(
            b.apply(vec![good.clone(), good]),
            Err(BookError::Invalid(_))
        ));
        assert!(matches!(
            b.delete_policy("x", "nope"),
            Err(BookError::NotFound(_))
        ));
        assert_eq!(b.delete_policy("x", "a"), Ok(()));
        assert_eq!(b.revision(), 3);
    }

    #[test]
    fn a_policy_without_namespace_lands_in_default() {
        let mut b = PolicyBook::default();
        let p = policy(serde_json::json!({"metadata": {"name": "a"}}));
        assert_eq!(
            b.apply(vec![p]),
            Ok(vec![("default/a".into(), Applied::Created)])
        );
        assert_eq!(
            b.state().policies["default/a"]
                .metadata
                .namespace
                .as_deref(),
            Some("default")
        );
    }
}
