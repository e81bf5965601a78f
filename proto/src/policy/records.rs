//! The records policies are evaluated over, as the control API carries them: pods as their
//! node's agent registers them, namespace labels, and the snapshot agents enforce from.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::eval::{Cluster, PodView};
use super::model::{Labels, NamedPort, NetworkPolicy, NAMESPACE_NAME_LABEL};
use super::validate::{
    check_label_key, check_label_value, check_namespace, check_object_name, check_port_name,
};
use crate::api::validate_node_name;

/// A pod, as the agent of the node that runs it registers it (`PUT /v1/pods/{ns}/{name}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub ports: Vec<NamedPort>,
    pub container_id: String,
}

/// Longest container ID accepted (runtimes use 64 hex digits).
const MAX_CONTAINER_ID: usize = 256;

impl PodRecord {
    /// `NAMESPACE/NAME`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The first field that is not acceptable, as `field: reason`.
    pub fn validate(&self) -> Result<(), String> {
        check_namespace(&self.namespace).map_err(|e| format!("namespace: {e}"))?;
        check_object_name(&self.name).map_err(|e| format!("name: {e}"))?;
        validate_node_name(&self.node).map_err(|e| format!("node: {e}"))?;
        if self.ips.is_empty() {
            return Err("ips: a pod needs at least one address".into());
        }
        for (k, v) in &self.labels {
            check_label_key(k).map_err(|e| format!("labels: {e}"))?;
            check_label_value(v).map_err(|e| format!("labels.{k}: {e}"))?;
        }
        for (i, p) in self.ports.iter().enumerate() {
            check_port_name(&p.name).map_err(|e| format!("ports[{i}].name: {e}"))?;
            if p.port == 0 {
                return Err(format!("ports[{i}].port: 0 is not a port"));
            }
            if self.ports[..i].iter().any(|q| q.name == p.name) {
                return Err(format!("ports[{i}].name: {:?} is declared twice", p.name));
            }
        }
        if self.container_id.is_empty() || self.container_id.len() > MAX_CONTAINER_ID {
            return Err(format!(
                "container_id: 1 to {MAX_CONTAINER_ID} characters, as the runtime passes it"
            ));
        }
        Ok(())
    }

    pub fn view(&self) -> PodView {
        PodView {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
            ips: self.ips.clone(),
            ports: self.ports.clone(),
        }
    }
}

/// Labels to set and keys to remove, as `pod label` and `namespace label` take them
/// (`key=value`, `key-`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelChange {
    #[serde(default)]
    pub set: Labels,
    #[serde(default)]
    pub remove: Vec<String>,
}

impl LabelChange {
    /// Reads `key=value` (set) and `key-` (remove) arguments, as `kubectl label` does.
    pub fn parse(args: &[String]) -> Result<LabelChange, String> {
        let mut change = LabelChange::default();
        if args.is_empty() {
            return Err("give at least one key=value to set or key- to remove".into());
        }
        for arg in args {
            if let Some((k, v)) = arg.split_once('=') {
                change.set.insert(k.to_string(), v.to_string());
            } else if let Some(k) = arg.strip_suffix('-') {
                change.remove.push(k.to_string());
            } else {
                return Err(format!(
                    "{arg:?}: write key=value to set a label, or key- to remove it"
                ));
            }
        }
        change.validate()?;
        Ok(change)
    }

    /// Checks every key and value; a key may not be both set and removed.
    pub fn validate(&self) -> Result<(), String> {
        for (k, v) in &self.set {
            check_label_key(k)?;
            check_label_value(v)?;
        }
        for k in &self.remove {
            check_label_key(k)?;
            if self.set.contains_key(k) {
                return Err(format!("label {k:?} is both set and removed"));
            }
        }
        Ok(())
    }

    /// Applies the change; whether anything changed.
    pub fn apply(&self, labels: &mut Labels) -> bool {
        let mut changed = false;
        for (k, v) in &self.set {
            changed |= labels.insert(k.clone(), v.clone()).as_ref() != Some(v);
        }
        for k in &self.remove {
            changed |= labels.remove(k).is_some();
        }
        changed
    }
}

/// Everything enforcement needs, at one revision: `GET /v1/policy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Counts every change; a watcher asks for what comes after the one it has.
    pub revision: u64,
    /// By `NAMESPACE/NAME`.
    #[serde(default)]
    pub pods: BTreeMap<String, PodRecord>,
    /// Labels operators set on namespaces (the name label is implied, not stored).
    #[serde(default)]
    pub namespaces: BTreeMap<String, Labels>,
    /// By `NAMESPACE/NAME`.
    #[serde(default)]
    pub policies: BTreeMap<String, NetworkPolicy>,
}

impl PolicyState {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.namespaces.is_empty() && self.policies.is_empty()
    }

    /// The snapshot the semantics are evaluated over.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            pods: self.pods.values().map(PodRecord::view).collect(),
            namespaces: self.namespaces.clone(),
            policies: self.policies.values().cloned().collect(),
        }
    }

    /// Every namespace that has a pod, a policy or labels, with its labels (name label
    /// included).
    pub fn namespace_list(&self) -> BTreeMap<String, Labels> {
        let names = self
            .pods
            .values()
            .map(|p| p.namespace.clone())
            .chain(self.policies.values().map(|p| p.namespace().to_string()))
            .chain(self.namespaces.keys().cloned());
        names
            .map(|ns| {
                let mut labels = self.namespaces.get(&ns).cloned().unwrap_or_default();
                labels.insert(NAMESPACE_NAME_LABEL.to_string(), ns.clone());
                (ns, labels)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Protocol;

    fn pod() -> PodRecord {
        PodRecord {
            namespace: "shop".into(),
            name: "web-1".into(),
            node: "h1".into(),
            ips: vec!["10.244.1.5".parse().unwrap()],
            labels: [("app".to_string(), "web".to_string())].into(),
            ports: vec![NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            container_id: "c0ffee".into(),
        }
    }

    #[test]
    fn a_pod_record_names_its_first_bad_field() {
        assert_eq!(pod().validate(), Ok(()));
        type Spoil = fn(&mut PodRecord);
        let cases: [(Spoil, &str); 7] = [
            (|p| p.namespace = "Shop".into(), "namespace: "),
            (|p| p.name = String::new(), "name: "),
            (|p| p.node = "h_1".into(), "node: "),
            (|p| p.ips.clear(), "ips: "),
            (
                |p| {
                    p.labels.insert("app".into(), "a b".into());
                },
                "labels.app: ",
            ),
            (|p| p.ports.push(p.ports[0].clone()), "ports[1].name: "),
            (|p| p.container_id.clear(), "container_id: "),
        ];
        for (spoil, field) in cases {
            let mut p = pod();
            spoil(&mut p);
            let e = p.validate().unwrap_err();
            assert!(e.starts_with(field), "{field}: {e}");
        }
    }

    #[test]
    fn label_arguments_as_kubectl_takes_them() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = LabelChange::parse(&args(&["app=web", "tier-", "empty="])).unwrap();
        assert_eq!(c.set.get("app").map(String::as_str), Some("web"));
        assert_eq!(c.set.get("empty").map(String::as_str), Some(""));
        assert_eq!(c.remove, ["tier"]);
        let mut labels: Labels = [("tier".to_string(), "front".to_string())].into();
        assert!(c.apply(&mut labels));
        assert_eq!(labels.len(), 2);
        assert!(!c.apply(&mut labels), "applied twice changes nothing");
        assert!(LabelChange::parse(&args(&["app"])).is_err());
        assert!(LabelChange::parse(&args(&[])).is_err());
        assert!(LabelChange::parse(&args(&["a=b", "a-"])).is_err());
        assert!(LabelChange::parse(&args(&["bad key=x"])).is_err());
    }

    #[test]
    fn every_namespace_carries_its_name_label() {
        let mut s = PolicyState::default();
        s.pods.insert("shop/web-1".into(), pod());
        s.namespaces
            .insert("ops".into(), [("team".to_string(), "a".to_string())].into());
        let list = s.namespace_list();
        assert_eq!(list.keys().collect::<Vec<_>>(), ["ops", "shop"]);
        assert_eq!(list["shop"][NAMESPACE_NAME_LABEL], "shop");
        assert_eq!(list["ops"]["team"], "a");
        let c = s.cluster();
        assert_eq!(c.namespace_labels("shop")[NAMESPACE_NAME_LABEL], "shop");
        assert_eq!(c.pods.len(), 1);
    }
}
