//! Network policy's records over the control API, on real TCP (127.0.0.1, port 0): pods,
//! labels and policies, refusals that change nothing, the long poll agents follow, and the
//! records surviving a restart on the file store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use podnet_control::{Client, FileStore, ServerConfig, Store};
use podnet_proto::policy::{LabelChange, PodRecord};
use serde_json::{json, Value};

mod common;
use common::{any_port, start};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn with_timeout<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test finished in time");
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> PodRecord {
    serde_json::from_value(json!({
        "namespace": ns, "name": name, "node": node, "ips": [ip],
        "labels": {"pod": name}, "ports": [{"name": "serve-80-tcp", "port": 80, "protocol": "TCP"}],
        "container_id": format!("c-{name}")
    }))
    .unwrap()
}

fn deny_all(ns: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "deny-all", "namespace": ns},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
}

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn pods_labels_and_policies_round_trip_and_survive_a_restart() {
    with_timeout(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(dir.path().join("state.json")));
        let srv = start(ServerConfig::default(), store.clone(), any_port()).await;
        let client = Client::new(&srv.url(""), None).unwrap();

        let answer = client
            .put_pod(&pod("x", "a", "h1", "10.244.1.2"))
            .await
            .unwrap();
        assert_eq!(answer["result"], "changed");
        assert_eq!(answer["revision"], 1);
        let again = client
            .put_pod(&pod("x", "a", "h1", "10.244.1.2"))
            .await
            .unwrap();
        assert_eq!(
            (again["result"].as_str(), again["revision"].as_u64()),
            (Some("unchanged"), Some(1))
        );
        client
            .put_pod(&pod("y", "b", "h2", "10.244.2.2"))
            .await
            .unwrap();

        let change = LabelChange::parse(&["app=web".into(), "pod-".into()]).unwrap();
        let answer = client.label_pod("x", "a", &change).await.unwrap();
        assert_eq!(answer["labels"], json!({"app": "web"}));
        let change = LabelChange::parse(&["team=ops".into()]).unwrap();
        let answer = client.label_namespace("y", &change).await.unwrap();
        assert_eq!(
            answer["labels"],
            json!({"kubernetes.io/metadata.name": "y", "team": "ops"})
        );

        let policy = serde_json::from_value(deny_all("x")).unwrap();
        let answer = client.apply_policies(&[policy]).await.unwrap();
        assert_eq!(
            answer["policies"],
            json!([{"policy": "x/deny-all", "result": "created"}])
        );

        let state = client.policy(None).await.unwrap();
        assert_eq!(state.pods.keys().collect::<Vec<_>>(), ["x/a", "y/b"]);
        assert_eq!(state.policies.keys().collect::<Vec<_>>(), ["x/deny-all"]);
        assert_eq!(state.namespaces["y"]["team"], "ops");
        // Acknowledged means saved.
        let saved = store.load().unwrap().unwrap();
        assert_eq!(saved.policy, state);

        srv.stop().await;
        let srv = start(ServerConfig::default(), store.clone(), any_port()).await;
        let client = Client::new(&srv.url(""), None).unwrap();
        assert_eq!(
            client.policy(None).await.unwrap(),
            state,
            "the same after a restart"
        );

        let answer = client.delete_pod("x", "a").await.unwrap();
        assert_eq!(answer["result"], "deleted");
        let answer = client.delete_pod("x", "a").await.unwrap();
        assert_eq!(answer["result"], "absent", "DEL is idempotent");
        client.delete_policy("x", "deny-all").await.unwrap();
        let e = client.delete_policy("x", "deny-all").await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn refusals_name_the_fault_and_change_nothing() {
    with_timeout(async {
        let store = Arc::new(podnet_control::MemoryStore::default());
        let srv = start(ServerConfig::default(), store, any_port()).await;
        let http = reqwest::Client::new();
        let put = reqwest::Method::PUT;

        let body = serde_json::to_value(pod("x", "a", "h1", "10.244.1.2")).unwrap();
        let (status, answer) = send(&http, put.clone(), srv.url("/v1/pods/x/b"), Some(&body)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["detail"].as_str().unwrap().contains("URL names x/b"),
            "{answer}"
        );

        let mut bad = body.clone();
        bad["ips"] = json!(["10.244.1.300"]);
        let (status, answer) = send(&http, put.clone(), srv.url("/v1/pods/x/a"), Some(&bad)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .starts_with("field `ips[0]`: "),
            "{answer}"
        );

        let mut bad = body.clone();
        bad["labels"] = json!({"app": "not valid"});
        let (status, answer) = send(&http, put.clone(), srv.url("/v1/pods/x/a"), Some(&bad)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .starts_with("labels.app: "),
            "{answer}"
        );

        let (status, _) = send(&http, put.clone(), srv.url("/v1/pods/x/a"), Some(&body)).await;
        assert_eq!(status, 200);
        let mut other = body.clone();
        other["node"] = json!("h2");
        let (status, answer) = send(&http, put, srv.url("/v1/pods/x/a"), Some(&other)).await;
        assert_eq!(status, 409, "{answer}");

        // One bad policy in a batch: the good one is not applied either.
        let mut bad = deny_all("y");
        bad["spec"]["ingress"] =
            json!([{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]);
        let batch = json!([deny_all("x"), bad]);
        let post = reqwest::Method::POST;
        let (status, answer) =
            send(&http, post.clone(), srv.url("/v1/policies"), Some(&batch)).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(
            answer["detail"],
            "item 2: y/deny-all: spec.ingress[0].from[0].ipBlock.except[0]: 10.1.0.0/24 is not inside \
             cidr 10.0.0.0/16: an exception must be a strict subset of it"
        );
        let typo = json!({"metadata": {"name": "p"}, "spec": {"ingres": []}});
        let (status, answer) =
            send(&http, post.clone(), srv.url("/v1/policies"), Some(&typo)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .contains("unknown field `ingres`"),
            "{answer}"
        );
        let (status, answer) = send(&http, post, srv.url("/v1/policies"), Some(&json!([]))).await;
        assert_eq!(status, 400, "{answer}");

        let patch = reqwest::Method::PATCH;
        let rename = json!({"set": {"kubernetes.io/metadata.name": "z"}});
        let (status, _) = send(
            &http,
            patch.clone(),
            srv.url("/v1/namespaces/x"),
            Some(&rename),
        )
        .await;
        assert_eq!(status, 400);
        let (status, _) = send(
            &http,
            patch,
            srv.url("/v1/pods/x/nope"),
            Some(&json!({"set": {"a": "b"}})),
        )
        .await;
        assert_eq!(status, 404);

        let (status, state) = send(&http, reqwest::Method::GET, srv.url("/v1/policy"), None).await;
        assert_eq!(status, 200);
        assert_eq!(
            state["revision"], 1,
            "only the one good pod changed anything: {state}"
        );
        assert_eq!(state["policies"], json!({}));
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_waiting_agent_learns_of_a_change_at_once() {
    with_timeout(async {
        let store = Arc::new(podnet_control::MemoryStore::default());
        let srv = start(ServerConfig::default(), store, any_port()).await;
        let client = Client::new(&srv.url(""), None).unwrap();
        let first = client.policy(None).await.unwrap();
        assert_eq!(first.revision, 0);
        let waiter = {
            let client = client.clone();
            tokio::spawn(async move {
                let state = client.policy(Some(0)).await.unwrap();
                (Instant::now(), state)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiter.is_finished(),
            "nothing changed yet, so the poll is still open"
        );
        let policy = serde_json::from_value(deny_all("x")).unwrap();
        client.apply_policies(&[policy]).await.unwrap();
        let applied = Instant::now();
        let (woke, state) = waiter.await.unwrap();
        assert_eq!(state.revision, 1);
        assert!(state.policies.contains_key("x/deny-all"));
        assert!(
            woke.duration_since(applied) < Duration::from_millis(500),
            "woke {:?} after the change",
            woke.duration_since(applied)
        );
        srv.stop().await;
    })
    .await;
}

/// A policy file is larger than any other request: a hundred policies (about 60 KB) go in one
/// `POST /v1/policies`, while other routes keep the small limit and a document over the policy
/// limit is refused with it named.
#[tokio::test]
async fn a_hundred_policies_fit_in_one_request() {
    with_timeout(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(dir.path().join("state.json")));
        let srv = start(ServerConfig::default(), store, any_port()).await;
        let http = reqwest::Client::new();
        let policies: Vec<Value> = (0..100)
            .map(|k| {
                let mut p = deny_all(&format!("n{}", k / 10));
                p["metadata"]["name"] = json!(format!("p{}", k % 10));
                p["metadata"]["annotations"] = json!({"note": "x".repeat(400)});
                p
            })
            .collect();
        let body = Value::Array(policies);
        assert!(body.to_string().len() > 3 * ServerConfig::default().max_body_bytes);
        let (status, answer) = send(
            &http,
            reqwest::Method::POST,
            srv.url("/v1/policies"),
            Some(&body),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["revision"], 1, "{answer}");

        let big = json!({"set": {"k": "v".repeat(20_000)}});
        let (status, answer) = send(
            &http,
            reqwest::Method::PATCH,
            srv.url("/v1/namespaces/x"),
            Some(&big),
        )
        .await;
        assert_eq!(status, 413, "{answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .contains("16384 byte limit"),
            "{answer}"
        );

        let huge = json!([{"metadata": {"name": "x", "annotations": {"k": "v".repeat(1 << 20)}}}]);
        let (status, answer) = send(
            &http,
            reqwest::Method::POST,
            srv.url("/v1/policies"),
            Some(&huge),
        )
        .await;
        assert_eq!(status, 413, "{answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .contains("1048576 byte limit"),
            "{answer}"
        );
    })
    .await;
}
