//! Who a pod is, as network policy selects it: namespace and name, labels and named ports,
//! from what the runtime passes the plugin.
//!
//! - `CNI_ARGS` `K8S_POD_NAMESPACE` and `K8S_POD_NAME`, as the kubelet sets them (without
//!   them: namespace `default`, and the container ID as the name);
//! - labels from the network config's `args.cni.labels` (`[{"key": .., "value": ..}]`, the CNI
//!   conventions) and from `CNI_ARGS` `PODNET_LABELS=key:value,key:value`, for runtimes that
//!   can set only `CNI_ARGS`;
//! - named ports from `CNI_ARGS` `PODNET_PORTS=name:port/PROTO,...`.

use podnet_proto::policy::{
    check_label_key, check_label_value, check_namespace, check_object_name, check_port_name,
    Labels, NamedPort, Protocol,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The identity half of a pod record (the agent adds its node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
}

/// The longest name a pod gets from its container ID (a DNS label's length).
const MAX_ID_NAME: usize = 63;

/// Reads the identity from `CNI_ARGS` (`cni_args`) and the config's `args` (`conf_args`);
/// the error says which variable or key is wrong and how to write it.
pub fn identity(
    cni_args: Option<&str>,
    conf_args: Option<&Value>,
    container_id: &str,
) -> Result<PodIdentity, String> {
    let mut namespace = None;
    let mut name = None;
    let mut labels = Labels::new();
    let mut ports = Vec::new();
    for pair in cni_args
        .unwrap_or_default()
        .split(';')
        .filter(|p| !p.is_empty())
    {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("CNI_ARGS: {pair:?} is not KEY=VALUE"));
        };
        match key {
            "K8S_POD_NAMESPACE" => namespace = Some(value.to_string()),
            "K8S_POD_NAME" => name = Some(value.to_string()),
            "PODNET_LABELS" => labels.extend(podnet_labels(value)?),
            "PODNET_PORTS" => ports = podnet_ports(value)?,
            // Others are for other plugins (IgnoreUnknown, K8S_POD_UID, ...).
            _ => {}
        }
    }
    if let Some(list) = conf_args.and_then(|a| a.pointer("/cni/labels")) {
        let bad = || {
            "args.cni.labels: expected a list like [{\"key\": \"app\", \"value\": \"web\"}]"
                .to_string()
        };
        for item in list.as_array().ok_or_else(bad)? {
            let (Some(k), Some(v)) = (item["key"].as_str(), item["value"].as_str()) else {
                return Err(bad());
            };
            check_label_key(k).map_err(|e| format!("args.cni.labels: {e}"))?;
            check_label_value(v).map_err(|e| format!("args.cni.labels: {e}"))?;
            labels.insert(k.to_string(), v.to_string());
        }
    }
    let namespace = namespace.unwrap_or_else(|| "default".to_string());
    check_namespace(&namespace).map_err(|e| format!("CNI_ARGS K8S_POD_NAMESPACE: {e}"))?;
    let name = match name {
        Some(n) => {
            check_object_name(&n).map_err(|e| format!("CNI_ARGS K8S_POD_NAME: {e}"))?;
            n
        }
        None => id_name(container_id),
    };
    Ok(PodIdentity {
        namespace,
        name,
        labels,
        ports,
    })
}

/// A pod name from a container ID: lowercased, characters a name cannot hold replaced by
/// `-`, at most 63 characters.
fn id_name(container_id: &str) -> String {
    let name: String = container_id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_ID_NAME)
        .collect();
    let name = name.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if name.is_empty() {
        "pod".to_string()
    } else {
        name.to_string()
    }
}

/// `key:value,key:value`.
fn podnet_labels(value: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for pair in value.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once(':').ok_or_else(|| {
            format!("CNI_ARGS PODNET_LABELS: {pair:?} is not key:value (write app:web,tier:front)")
        })?;
        check_label_key(k).map_err(|e| format!("CNI_ARGS PODNET_LABELS: {e}"))?;
        check_label_value(v).map_err(|e| format!("CNI_ARGS PODNET_LABELS: {e}"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// `name:port/PROTO,...` (PROTO TCP when omitted).
fn podnet_ports(value: &str) -> Result<Vec<NamedPort>, String> {
    let bad = |entry: &str, why: String| {
        format!("CNI_ARGS PODNET_PORTS: {entry:?}: {why} (write http:8080/TCP,dns:53/UDP)")
    };
    let mut ports: Vec<NamedPort> = Vec::new();
    for entry in value.split(',').filter(|p| !p.is_empty()) {
        let (name, rest) = entry
            .split_once(':')
            .ok_or_else(|| bad(entry, "not name:port/PROTO".into()))?;
        check_port_name(name).map_err(|e| bad(entry, e))?;
        let (port, proto) = rest.split_once('/').unwrap_or((rest, "TCP"));
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(entry, format!("{port:?} is not a port")))?;
        let protocol = Protocol::from_name(proto)
            .ok_or_else(|| bad(entry, format!("protocol {proto:?}: use TCP, UDP or SCTP")))?;
        if ports.iter().any(|p| p.name == name) {
            return Err(bad(entry, format!("port name {name:?} given twice")));
        }
        ports.push(NamedPort {
            name: name.to_string(),
            port,
            protocol,
        });
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kubelet_arguments_and_labels_from_both_places() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;\
                    K8S_POD_INFRA_CONTAINER_ID=abc;PODNET_LABELS=app:web,tier:front;\
                    PODNET_PORTS=http:8080/TCP,dns:53/UDP,metrics:9090";
        let conf = json!({"cni": {"labels": [{"key": "team", "value": "a"}]}});
        let id = identity(Some(args), Some(&conf), "abc").unwrap();
        assert_eq!((id.namespace.as_str(), id.name.as_str()), ("shop", "web-1"));
        let labels: Vec<(&str, &str)> = id
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(labels, [("app", "web"), ("team", "a"), ("tier", "front")]);
        let ports: Vec<(&str, u16, Protocol)> = id
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", 8080, Protocol::Tcp),
                ("dns", 53, Protocol::Udp),
                ("metrics", 9090, Protocol::Tcp)
            ]
        );
    }

    #[test]
    fn without_kubelet_arguments_the_container_names_the_pod() {
        let id = identity(None, None, "0123ABCdef_x").unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.name.as_str()),
            ("default", "0123abcdef-x")
        );
        assert!(id.labels.is_empty() && id.ports.is_empty());
        let long = "a".repeat(80);
        assert_eq!(identity(None, None, &long).unwrap().name.len(), 63);
    }

    #[test]
    fn bad_input_names_the_variable() {
        let cases = [
            ("K8S_POD_NAMESPACE=Shop", "CNI_ARGS K8S_POD_NAMESPACE: "),
            ("K8S_POD_NAME=web_1", "CNI_ARGS K8S_POD_NAME: "),
            ("PODNET_LABELS=app", "CNI_ARGS PODNET_LABELS: "),
            ("PODNET_LABELS=app:a b", "CNI_ARGS PODNET_LABELS: "),
            ("PODNET_PORTS=http:0", "CNI_ARGS PODNET_PORTS: "),
            ("PODNET_PORTS=http:80/ICMP", "CNI_ARGS PODNET_PORTS: "),
            ("PODNET_PORTS=HTTP:80", "CNI_ARGS PODNET_PORTS: "),
            ("PODNET_PORTS=a:80,a:81", "CNI_ARGS PODNET_PORTS: "),
            ("JUSTAWORD", "CNI_ARGS: "),
        ];
        for (args, want) in cases {
            let e = identity(Some(args), None, "c1").unwrap_err();
            assert!(e.starts_with(want), "{args}: {e}");
        }
        let conf = json!({"cni": {"labels": {"app": "web"}}});
        let e = identity(None, Some(&conf), "c1").unwrap_err();
        assert!(e.starts_with("args.cni.labels: expected a list"), "{e}");
    }
}
