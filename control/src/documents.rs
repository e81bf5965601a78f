//! Reading NetworkPolicy documents as operators write them for kubectl: YAML or JSON, several
//! documents in one file (`---`), and `kind: List` whose items count as documents. A bad
//! document is named by its position and the path of the field at fault.

use podnet_proto::policy::NetworkPolicy;
use serde_json::Value;

/// Every policy in `text` (YAML, of which JSON is a subset), in order.
pub fn read_policies(text: &str) -> Result<Vec<NetworkPolicy>, String> {
    // YAML 1.2's booleans (`true`, `false`) only: under 1.1 a namespace named `y` or `n`, or a
    // label value `on`, would silently become a boolean.
    let options = serde_saphyr::options! { strict_booleans: true };
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| format!("not valid YAML or JSON: {e}"))?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let at = format!("document {}", i + 1);
        if doc.is_null() {
            continue;
        }
        out.extend(policies_from_value(doc).map_err(|e| format!("{at}: {e}"))?);
    }
    if out.is_empty() {
        return Err("no NetworkPolicy documents found".into());
    }
    Ok(out)
}

/// The policies in one JSON value: a NetworkPolicy, an array of them, or a `List`.
pub fn policies_from_value(value: Value) -> Result<Vec<NetworkPolicy>, String> {
    match value {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| one_policy(item).map_err(|e| format!("item {}: {e}", i + 1)))
            .collect(),
        Value::Object(ref fields) if fields.get("kind").and_then(Value::as_str) == Some("List") => {
            match fields.get("items") {
                Some(Value::Array(_)) => {
                    let Value::Object(mut fields) = value else {
                        unreachable!("matched as an object")
                    };
                    policies_from_value(fields.remove("items").unwrap_or_default())
                        .map_err(|e| format!("List {e}"))
                }
                _ => Err("a List needs `items`, an array of NetworkPolicy".into()),
            }
        }
        Value::Object(_) => Ok(vec![one_policy(value)?]),
        other => Err(format!(
            "expected a NetworkPolicy object, an array or a List, got {}",
            kind_of(&other)
        )),
    }
}

fn one_policy(value: Value) -> Result<NetworkPolicy, String> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("NetworkPolicy");
    if kind != "NetworkPolicy" {
        return Err(format!(
            "kind {kind:?} is not a NetworkPolicy (podnet takes networking.k8s.io/v1 \
             NetworkPolicy and List)"
        ));
    }
    let policy: NetworkPolicy = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })?;
    policy.validate().map_err(|e| {
        let name = policy.key();
        format!("{name}: {e}")
    })?;
    Ok(policy)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: x
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
# a comment, then a JSON document: JSON is YAML too
{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
 "metadata": {"name": "web", "namespace": "x"},
 "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
          "ingress": [{"ports": [{"port": "serve-80-tcp"}, {"port": 81, "endPort": 82}]}]}}
"#;

    #[test]
    fn several_documents_in_yaml_and_json() {
        let p = read_policies(TWO).unwrap();
        let keys: Vec<String> = p.iter().map(|p| p.key()).collect();
        assert_eq!(keys, ["x/deny-all", "x/web"]);
    }

    #[test]
    fn a_list_counts_as_its_items() {
        let text = r#"
apiVersion: v1
kind: List
items:
- metadata: {name: a}
- kind: NetworkPolicy
  metadata: {name: b, namespace: y}
  spec: {podSelector: {matchLabels: {enabled: on, n: "no"}}}
"#;
        let keys: Vec<String> = read_policies(text)
            .unwrap()
            .iter()
            .map(|p| p.key())
            .collect();
        assert_eq!(keys, ["default/a", "y/b"]);
        let p = &read_policies(text).unwrap()[1];
        let labels = &p.spec.pod_selector.match_labels;
        assert_eq!(
            (labels["enabled"].as_str(), labels["n"].as_str()),
            ("on", "no")
        );
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let bad_port = TWO.replace("\"endPort\": 82", "\"endPort\": 80");
        assert_eq!(
            read_policies(&bad_port).unwrap_err(),
            "document 2: x/web: spec.ingress[0].ports[1].endPort: 80 must be at least port (81) \
             and at most 65535"
        );
        let typo = TWO.replace("podSelector: {}", "podSelecter: {}");
        let e = read_policies(&typo).unwrap_err();
        assert!(
            e.starts_with("document 1: spec.podSelecter: unknown field `podSelecter`"),
            "{e}"
        );
        let wrong_type = TWO.replace("\"port\": 81", "\"port\": [81]");
        let e = read_policies(&wrong_type).unwrap_err();
        assert!(
            e.starts_with("document 2: spec.ingress[0].ports[1].port: "),
            "{e}"
        );
        let e = read_policies("kind: Deployment\nmetadata: {name: a}\n").unwrap_err();
        assert!(e.contains("\"Deployment\" is not a NetworkPolicy"), "{e}");
        let e = read_policies("a: [unclosed\n").unwrap_err();
        assert!(e.starts_with("not valid YAML or JSON"), "{e}");
        assert_eq!(
            read_policies("---\n").unwrap_err(),
            "no NetworkPolicy documents found"
        );
        let e = read_policies("kind: List\nitems: 3\n").unwrap_err();
        assert!(e.contains("a List needs `items`"), "{e}");
        let e = read_policies("- 3\n").unwrap_err();
        assert!(e.starts_with("document 1: item 1: "), "{e}");
    }
}
