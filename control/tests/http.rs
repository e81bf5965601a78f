//! The control API over real TCP on 127.0.0.1 (port 0), server and client in this process.

use std::sync::Arc;
use std::time::Duration;

use podnet_control::api::{
    Encap, EventType, NodeList, NodeState, NodeTable, RegisterRequest, RegisterResponse, WatchEvent,
};
use podnet_control::{Client, FileStore, MemoryStore, Server, ServerConfig, Store};
use serde_json::{json, Value};
use tokio::sync::watch;

mod common;
use common::{any_port, start};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

fn config() -> ServerConfig {
    ServerConfig::default()
}

fn reg(last: u8, encap: &str) -> Value {
    json!({"underlay_ip": format!("198.18.0.{last}"), "encap": encap})
}

async fn put(http: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let resp = http.put(url).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `GET /v1/nodes`, read as the API's node list.
async fn list_nodes(http: &reqwest::Client, srv: &common::Running) -> NodeList {
    let resp = http.get(srv.url("/v1/nodes")).send().await.unwrap();
    resp.json().await.unwrap()
}

async fn with_timeout<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test finished in time");
}

#[tokio::test]
async fn register_list_and_refusals() {
    with_timeout(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(dir.path().join("state.json")));
        let cfg = ServerConfig {
            // Fits three nodes: 10.244.1.0/24 .. 10.244.3.0/24.
            cluster_cidr: "10.244.0.0/22".parse().unwrap(),
            ..config()
        };
        let srv = start(cfg, store.clone(), any_port()).await;
        let http = reqwest::Client::new();

        let (status, body) = put(&http, srv.url("/v1/nodes/h1"), &reg(1, "vxlan")).await;
        assert_eq!(status, 200, "{body}");
        let resp: RegisterResponse = serde_json::from_value(body).unwrap();
        assert_eq!(resp.node, "h1");
        assert_eq!(resp.pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(resp.cluster_cidr.to_string(), "10.244.0.0/22");
        assert_eq!(resp.lease_ttl_s, 20);
        // Acknowledged means persisted.
        let saved = store.load().unwrap().unwrap();
        assert_eq!(saved.nodes.len(), 1);
        assert_eq!(saved.nodes[0].pod_cidr, resp.pod_cidr);

        for (name, last) in [("h2", 2), ("h3", 3)] {
            let (status, _) = put(
                &http,
                srv.url(&format!("/v1/nodes/{name}")),
                &reg(last, "ipip"),
            )
            .await;
            assert_eq!(status, 200);
        }
        let list = list_nodes(&http, &srv).await;
        assert_eq!(list.revision, 3);
        let cidrs: Vec<String> = list.nodes.iter().map(|n| n.pod_cidr.to_string()).collect();
        assert_eq!(cidrs, ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]);
        assert!(list.nodes.iter().all(|n| n.state == NodeState::Up));
        assert_eq!(list.nodes[1].vtep_mac.to_string(), "02:00:c6:12:00:02");

        // 400: which field, why.
        let bad = http
            .put(srv.url("/v1/nodes/h4"))
            .body(r#"{"underlay_ip": "198.18.0.999", "encap": "vxlan"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
        let body: Value = bad.json().await.unwrap();
        assert_eq!(body["error"], "bad_request");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("field `underlay_ip`"),
            "{body}"
        );
        let bad = http
            .put(srv.url("/v1/nodes/h4"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
        let (status, body) = put(&http, srv.url("/v1/nodes/Bad_Name"), &reg(9, "vxlan")).await;
        assert_eq!(status, 400);
        assert!(
            body["detail"].as_str().unwrap().contains("Bad_Name"),
            "{body}"
        );
        let (status, body) = put(
            &http,
            srv.url("/v1/nodes/h4"),
            &json!({"underlay_ip": "198.18.0.4", "encap": "gre"}),
        )
        .await;
        assert_eq!(status, 400);
        assert!(
            body["detail"].as_str().unwrap().contains("field `encap`"),
            "{body}"
        );

        // 409: a live node holds the name at another underlay IP, or the underlay IP.
        let (status, body) = put(&http, srv.url("/v1/nodes/h1"), &reg(7, "vxlan")).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"], "conflict");
        assert!(
            body["detail"].as_str().unwrap().contains("198.18.0.1"),
            "{body}"
        );
        let (status, _) = put(&http, srv.url("/v1/nodes/h9"), &reg(1, "vxlan")).await;
        assert_eq!(status, 409);

        // 507: exhausted, saying how many nodes fit.
        let (status, body) = put(&http, srv.url("/v1/nodes/h4"), &reg(4, "vxlan")).await;
        assert_eq!(status, 507, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains("fits 3 nodes"),
            "{body}"
        );

        // Too big a body.
        let huge = format!(
            r#"{{"underlay_ip":"198.18.0.4","encap":"vxlan","x":"{}"}}"#,
            "a".repeat(64 * 1024)
        );
        let resp = http
            .put(srv.url("/v1/nodes/h4"))
            .body(huge)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 413);

        // Single node, unknown node, graceful leave (CIDR stays reserved), purge.
        let node: Value = http
            .get(srv.url("/v1/nodes/h2"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(node["encap"], "ipip");
        assert_eq!(
            http.get(srv.url("/v1/nodes/nope"))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
        assert_eq!(
            http.delete(srv.url("/v1/nodes/h2"))
                .send()
                .await
                .unwrap()
                .status(),
            204
        );
        assert_eq!(
            put(&http, srv.url("/v1/nodes/h4"), &reg(4, "vxlan"))
                .await
                .0,
            507
        );
        let resp = http
            .delete(srv.url("/v1/nodes/h2?purge=true"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
        let (status, body) = put(&http, srv.url("/v1/nodes/h4"), &reg(4, "vxlan")).await;
        assert_eq!(status, 200);
        assert_eq!(body["pod_cidr"], "10.244.2.0/24");

        let metrics = http
            .get(srv.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("podnet_control_nodes{state=\"up\"} 3"),
            "{metrics}"
        );
        assert!(
            metrics.contains("podnet_control_http_requests_total{code=\"409\"} 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("podnet_control_http_requests_total{code=\"507\"} 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("podnet_control_registrations_total{result=\"added\"} 4"),
            "{metrics}"
        );
        srv.stop().await;

        // A restarted service hands every node the same pod CIDR.
        let cfg = ServerConfig {
            cluster_cidr: "10.244.0.0/22".parse().unwrap(),
            ..config()
        };
        let srv = start(cfg, store, any_port()).await;
        let (status, body) = put(&http, srv.url("/v1/nodes/h3"), &reg(3, "ipip")).await;
        assert_eq!(status, 200);
        assert_eq!(body["pod_cidr"], "10.244.3.0/24");
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bearer_token_guards_everything_but_healthz() {
    with_timeout(async {
        let cfg = ServerConfig {
            token: Some("s3cret".into()),
            ..config()
        };
        let srv = start(cfg, Arc::new(MemoryStore::default()), any_port()).await;
        let http = reqwest::Client::new();
        let healthz = http.get(srv.url("/healthz")).send().await.unwrap();
        assert_eq!(healthz.status(), 200);

        for path in [
            "/v1/nodes",
            "/v1/nodes/h1",
            "/metrics",
            "/v1/nodes?watch=true",
        ] {
            let resp = http.get(srv.url(path)).send().await.unwrap();
            assert_eq!(resp.status(), 401, "{path} without a token");
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized");
            let resp = http
                .get(srv.url(path))
                .bearer_auth("s3cre")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 401, "{path} with a wrong token");
        }
        let resp = http
            .put(srv.url("/v1/nodes/h1"))
            .json(&reg(1, "vxlan"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);

        let client = Client::new(&format!("http://{}", srv.addr), Some("s3cret".into())).unwrap();
        let req = RegisterRequest {
            wireguard_public_key: None,
            underlay_ip: "198.18.0.1".parse().unwrap(),
            encap: Encap::Vxlan,
            vtep_mac: None,
        };
        client.register("h1", &req).await.unwrap();
        assert_eq!(client.list().await.unwrap().nodes.len(), 1);

        let wrong = Client::new(&format!("http://{}", srv.addr), Some("nope".into())).unwrap();
        let err = wrong.list().await.unwrap_err();
        assert_eq!(err.status(), Some(401));
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("wrong bearer token"), "{err}");
        srv.stop().await;
    })
    .await;
}

/// Reads NDJSON watch events from a raw response until `n` arrived.
async fn read_events(resp: &mut reqwest::Response, buf: &mut Vec<u8>, n: usize) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    while events.len() < n {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            if line.len() > 1 {
                events.push(serde_json::from_slice(&line[..end]).unwrap());
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("watch event within 5 s")
            .unwrap()
            .expect("stream still open");
        buf.extend_from_slice(&chunk);
    }
    events
}

#[tokio::test]
async fn watch_streams_added_modified_deleted_and_resumes() {
    with_timeout(async {
        let cfg = ServerConfig {
            lease_ttl: Duration::from_millis(1500),
            ..config()
        };
        let srv = start(cfg, Arc::new(MemoryStore::default()), any_port()).await;
        let http = reqwest::Client::new();
        let mut watch = http
            .get(srv.url("/v1/nodes?watch=true&since=0"))
            .send()
            .await
            .unwrap();
        assert_eq!(watch.status(), 200);
        assert_eq!(watch.headers()["content-type"], "application/x-ndjson");
        let mut buf = Vec::new();

        assert_eq!(
            put(&http, srv.url("/v1/nodes/h1"), &reg(1, "vxlan"))
                .await
                .0,
            200
        );
        // A heartbeat alone is not an event; changing the encapsulation is.
        assert_eq!(
            put(&http, srv.url("/v1/nodes/h1"), &reg(1, "vxlan"))
                .await
                .0,
            200
        );
        assert_eq!(
            put(&http, srv.url("/v1/nodes/h1"), &reg(1, "ipip")).await.0,
            200
        );
        // No more renewals: the lease lapses and the node is withdrawn.
        let events = read_events(&mut watch, &mut buf, 3).await;
        let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventType::Added, EventType::Modified, EventType::Deleted]
        );
        assert_eq!(
            events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(events[1].node.encap, Encap::Ipip);
        assert_eq!(events[2].node.state, NodeState::Down);
        assert_eq!(events[2].node.pod_cidr.to_string(), "10.244.1.0/24");

        // Back again: same CIDR, announced as added.
        assert_eq!(
            put(&http, srv.url("/v1/nodes/h1"), &reg(1, "ipip")).await.0,
            200
        );
        let ev = read_events(&mut watch, &mut buf, 1).await.remove(0);
        assert_eq!((ev.kind, ev.revision), (EventType::Added, 4));
        assert_eq!(ev.node.pod_cidr.to_string(), "10.244.1.0/24");
        drop(watch);

        // Resume from revision 2: exactly the events after it.
        let mut resumed = http
            .get(srv.url("/v1/nodes?watch=true&since=2"))
            .send()
            .await
            .unwrap();
        let mut buf = Vec::new();
        let events = read_events(&mut resumed, &mut buf, 2).await;
        assert_eq!(
            events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            [3, 4]
        );

        // Without `since`: the live nodes first, as added.
        let mut fresh = http
            .get(srv.url("/v1/nodes?watch=true"))
            .send()
            .await
            .unwrap();
        let mut buf = Vec::new();
        let ev = read_events(&mut fresh, &mut buf, 1).await.remove(0);
        assert_eq!((ev.kind, ev.node.name.as_str()), (EventType::Added, "h1"));

        // A revision from the future cannot be resumed; neither can a bad one.
        let resp = http
            .get(srv.url("/v1/nodes?watch=true&since=99"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 410);
        let resp = http
            .get(srv.url("/v1/nodes?watch=true&since=x"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn watch_from_before_retained_history_is_gone() {
    with_timeout(async {
        let cfg = ServerConfig {
            history_len: 2,
            ..config()
        };
        let srv = start(cfg, Arc::new(MemoryStore::default()), any_port()).await;
        let http = reqwest::Client::new();
        for i in 1..=4u8 {
            assert_eq!(
                put(&http, srv.url(&format!("/v1/nodes/h{i}")), &reg(i, "vxlan"))
                    .await
                    .0,
                200
            );
        }
        let resp = http
            .get(srv.url("/v1/nodes?watch=true&since=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 410);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "gone");
        let resp = http
            .get(srv.url("/v1/nodes?watch=true&since=2"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);

        // The client relists on 410 and ends up with the full table.
        let client = Client::new(&format!("http://{}", srv.addr), None).unwrap();
        let stale = NodeTable {
            revision: 1,
            ..NodeTable::default()
        };
        let (tx, mut rx) = watch::channel(NodeTable::default());
        let watcher = tokio::spawn({
            let client = client.clone();
            async move { client.watch(Some(stale), tx).await }
        });
        let table = wait_for(&mut rx, |t| t.nodes.len() == 4).await;
        assert_eq!(table.revision, 4);
        assert_eq!(client.stats().relists, 1);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("watch ends once nobody listens")
            .unwrap();
        srv.stop().await;
    })
    .await;
}

async fn wait_for(
    rx: &mut watch::Receiver<NodeTable>,
    cond: impl Fn(&NodeTable) -> bool,
) -> NodeTable {
    let table = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|t| cond(t)))
        .await
        .expect("table reached the expected state within 10 s")
        .unwrap()
        .clone();
    table
}

#[tokio::test]
async fn client_resumes_its_watch_across_a_server_restart() {
    with_timeout(async {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::new(dir.path().join("state.json")));
        let srv = start(config(), store.clone(), any_port()).await;
        let addr = srv.addr;
        let client = Client::new(&format!("http://{addr}"), None).unwrap();
        let req = |last: u8| RegisterRequest {
            wireguard_public_key: None,
            underlay_ip: format!("198.18.0.{last}").parse().unwrap(),
            encap: Encap::Vxlan,
            vtep_mac: None,
        };
        let h1 = client.register("h1", &req(1)).await.unwrap();

        let (tx, mut rx) = watch::channel(NodeTable::default());
        let watcher = tokio::spawn({
            let client = client.clone();
            async move { client.watch(None, tx).await }
        });
        let table = wait_for(&mut rx, |t| t.nodes.contains_key("h1")).await;
        assert_eq!(table.revision, 1);

        srv.stop().await;
        // While the service is away the last table stays put.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(rx.borrow().nodes.contains_key("h1"));
        assert!(client.list().await.unwrap_err().is_retryable());

        let srv = start(config(), store.clone(), addr).await;
        let other = Client::new(&format!("http://{addr}"), None).unwrap();
        let h2 = other.register("h2", &req(2)).await.unwrap();
        assert_eq!(h2.pod_cidr.to_string(), "10.244.2.0/24");
        let again = other.register("h1", &req(1)).await.unwrap();
        assert_eq!(again.pod_cidr, h1.pod_cidr, "same CIDR after a restart");

        let table = wait_for(&mut rx, |t| t.nodes.contains_key("h2")).await;
        assert_eq!(table.revision, 2);
        assert_eq!(table.nodes["h1"].pod_cidr, h1.pod_cidr);
        let stats = client.stats();
        assert_eq!(
            stats.relists, 1,
            "resumed from its revision, no second list"
        );
        assert!(stats.watch_connects >= 2, "{stats:?}");

        watcher.abort();
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn keep_registered_holds_the_lease_and_lapse_withdraws() {
    with_timeout(async {
        let cfg = ServerConfig {
            lease_ttl: Duration::from_millis(1000),
            ..config()
        };
        let srv = start(cfg, Arc::new(MemoryStore::default()), any_port()).await;
        let client = Client::new(&format!("http://{}", srv.addr), None).unwrap();
        let req = RegisterRequest {
            wireguard_public_key: None,
            underlay_ip: "198.18.0.1".parse().unwrap(),
            encap: Encap::Ipip,
            vtep_mac: Some("02:00:00:00:00:aa".parse().unwrap()),
        };
        let lease = client.register_with_retry("h1", &req).await.unwrap();
        assert_eq!(lease.lease_ttl_ms, 1000);
        // The answer carries the service's clock (here the same host's) for clients to use.
        let theirs = lease.server_time_ms.expect("the service sends its clock");
        assert!(theirs.abs_diff(podnet_control::clock::now_ms()) < 5_000);
        let learnt = client.server_time_ms().expect("learnt from the answer");
        assert!(learnt.abs_diff(podnet_control::clock::now_ms()) < 5_000);
        let renewer = tokio::spawn({
            let client = client.clone();
            let req = req.clone();
            async move { client.keep_registered("h1", &req, &lease).await }
        });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let node = client.node("h1").await.unwrap();
        assert_eq!(
            node.state,
            NodeState::Up,
            "two and a half lease periods later, still up"
        );
        assert_eq!(node.vtep_mac.to_string(), "02:00:00:00:00:aa");
        assert!(client.stats().renewals >= 4, "{:?}", client.stats());

        renewer.abort();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if client.node("h1").await.unwrap().state == NodeState::Down {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "lease never lapsed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A conflicting registration is not retried.
        client
            .register(
                "h2",
                &RegisterRequest {
                    underlay_ip: "198.18.0.2".parse().unwrap(),
                    ..req.clone()
                },
            )
            .await
            .unwrap();
        let err = client
            .register_with_retry(
                "h2",
                &RegisterRequest {
                    underlay_ip: "198.18.0.3".parse().unwrap(),
                    ..req
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(409));
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn corrupt_state_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, b"{\"format\": 1, \"nodes\": [").unwrap();
    let err = Server::open(config(), Arc::new(FileStore::new(&path)))
        .await
        .err()
        .expect("a corrupt state file is an error");
    let msg = err.to_string();
    assert!(
        msg.contains("state.json") && msg.contains("corrupt"),
        "{msg}"
    );
    // The file is left as it was.
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"{\"format\": 1, \"nodes\": ["
    );

    // A state file written for another layout is refused too.
    let other = dir.path().join("other.json");
    let server = Server::open(config(), Arc::new(FileStore::new(&other)))
        .await
        .unwrap();
    drop(server);
    let cfg = ServerConfig {
        node_prefix: 25,
        ..config()
    };
    let msg = Server::open(cfg, Arc::new(FileStore::new(&other)))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("/25") && msg.contains("10.244.0.0/16"),
        "{msg}"
    );
}

/// A store that counts writes and fails them on demand.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    fail: std::sync::atomic::AtomicBool,
    saves: std::sync::atomic::AtomicU64,
}

impl Store for FlakyStore {
    fn load(
        &self,
    ) -> Result<Option<podnet_control::state::StoredState>, podnet_control::StoreError> {
        self.inner.load()
    }

    fn save(&self, change: &podnet_control::Change) -> Result<(), podnet_control::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.fail.load(SeqCst) {
            return Err(podnet_control::StoreError::Other("disk on fire".into()));
        }
        self.saves.fetch_add(1, SeqCst);
        self.inner.save(change)
    }
}

#[tokio::test]
async fn changes_are_saved_before_they_are_acknowledged() {
    use std::sync::atomic::Ordering::SeqCst;
    with_timeout(async {
        let store = Arc::new(FlakyStore::default());
        let srv = start(config(), store.clone(), any_port()).await;
        let http = reqwest::Client::new();
        assert_eq!(
            store.saves.load(SeqCst),
            1,
            "a fresh state is saved at start"
        );
        assert_eq!(
            put(&http, srv.url("/v1/nodes/h1"), &reg(1, "vxlan"))
                .await
                .0,
            200
        );
        assert_eq!(store.saves.load(SeqCst), 2);
        // A heartbeat changes nothing worth a write.
        assert_eq!(
            put(&http, srv.url("/v1/nodes/h1"), &reg(1, "vxlan"))
                .await
                .0,
            200
        );
        assert_eq!(store.saves.load(SeqCst), 2);

        store.fail.store(true, SeqCst);
        let (status, body) = put(&http, srv.url("/v1/nodes/h2"), &reg(2, "vxlan")).await;
        assert_eq!(status, 500, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains("disk on fire"),
            "{body}"
        );
        let list = list_nodes(&http, &srv).await;
        assert_eq!(
            (list.revision, list.nodes.len()),
            (1, 1),
            "a change that was not saved is not applied"
        );
        assert_eq!(
            http.delete(srv.url("/v1/nodes/h1"))
                .send()
                .await
                .unwrap()
                .status(),
            500
        );

        store.fail.store(false, SeqCst);
        let (status, body) = put(&http, srv.url("/v1/nodes/h2"), &reg(2, "vxlan")).await;
        assert_eq!(status, 200);
        assert_eq!(
            (body["pod_cidr"].as_str(), body["revision"].as_u64()),
            (Some("10.244.2.0/24"), Some(2))
        );
        let metrics = http
            .get(srv.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("podnet_control_store_errors_total 2"),
            "{metrics}"
        );
        srv.stop().await;
    })
    .await;
}

// Dual-stack on the file store: 100 concurrent registrations get 100 distinct IPv4 and IPv6
// blocks, each IPv6 block the one with its IPv4 block's index, in the answers, the list and
// the state file; a restart with another IPv6 layout refuses and names it.
#[tokio::test]
async fn dual_stack_blocks_are_distinct_under_concurrent_registrations_and_persist() {
    with_timeout(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let cfg = ServerConfig {
            cluster_cidr_v6: Some("fd00:10:244::/56".parse().unwrap()),
            node_prefix_v6: 64,
            ..config()
        };
        let srv = start(cfg.clone(), Arc::new(FileStore::new(&path)), any_port()).await;
        let http = reqwest::Client::new();
        let tasks: Vec<_> = (1..=100u8)
            .map(|i| {
                let (http, url) = (http.clone(), srv.url(&format!("/v1/nodes/n{i}")));
                tokio::spawn(async move {
                    let (status, body) = put(&http, url, &reg(i, "vxlan")).await;
                    assert_eq!(status, 200, "{body}");
                    serde_json::from_value::<RegisterResponse>(body).unwrap()
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        let pairs = |list: &mut dyn Iterator<Item = (String, String)>| {
            let mut v4 = std::collections::BTreeSet::new();
            let mut v6 = std::collections::BTreeSet::new();
            for (a, b) in list {
                // 10.244.I.0/24 goes with fd00:10:244:I::/64 (I in hex).
                let index: u8 = a.split('.').nth(2).unwrap().parse().unwrap();
                assert_eq!(b, format!("fd00:10:244:{index:x}::/64"), "{a}");
                v4.insert(a);
                v6.insert(b);
            }
            (v4.len(), v6.len())
        };
        let mut answered = answers.iter().map(|r| {
            assert_eq!(r.cluster_cidr_v6.unwrap().to_string(), "fd00:10:244::/56");
            (r.pod_cidr.to_string(), r.pod_cidr_v6.unwrap().to_string())
        });
        assert_eq!(pairs(&mut answered), (100, 100));
        let list = list_nodes(&http, &srv).await;
        let mut listed = list
            .nodes
            .iter()
            .map(|n| (n.pod_cidr.to_string(), n.pod_cidr_v6.unwrap().to_string()));
        assert_eq!(pairs(&mut listed), (100, 100));
        srv.stop().await;

        // The state file holds the layout and the blocks; the same layout loads them.
        let saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(saved["cluster_cidr_v6"], "fd00:10:244::/56");
        let srv = start(cfg.clone(), Arc::new(FileStore::new(&path)), any_port()).await;
        let again = Client::new(&srv.url(""), None)
            .unwrap()
            .list()
            .await
            .unwrap();
        assert_eq!(again.nodes, list.nodes);
        srv.stop().await;
        for other in [
            ServerConfig {
                node_prefix_v6: 72,
                ..cfg.clone()
            },
            config(),
        ] {
            let msg = Server::open(other, Arc::new(FileStore::new(&path)))
                .await
                .err()
                .expect("another IPv6 layout is refused")
                .to_string();
            assert!(
                msg.contains("IPv6 layout fd00:10:244::/56 with /64 per node"),
                "{msg}"
            );
        }
    })
    .await;
}
