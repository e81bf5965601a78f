//! The control API under abuse, against a real server on 127.0.0.1 in this process: oversized
//! bodies, slow and silent clients, thousands of watch streams, too many connections, bad
//! tokens and hostile node names. Each test also checks that well-behaved clients keep being
//! served while the abuse goes on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podnet_control::{FileStore, MemoryStore, ServerConfig, Store};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::{any_port, start, Running};

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::default())
}

fn reg(last: u8) -> Value {
    json!({"underlay_ip": format!("198.18.0.{last}"), "encap": "vxlan"})
}

/// A well-behaved client registers a node and gets its CIDR, within `within`.
async fn serves_others(run: &Running, name: &str, last: u8, within: Duration) {
    let started = Instant::now();
    let http = reqwest::Client::builder().timeout(within).build().unwrap();
    let resp = http
        .put(run.url(&format!("/v1/nodes/{name}")))
        .json(&reg(last))
        .send()
        .await
        .unwrap_or_else(|e| panic!("registration of {name} failed during abuse: {e}"));
    assert_eq!(resp.status(), 200, "{name}");
    let body: Value = resp.json().await.unwrap();
    assert!(body["pod_cidr"].as_str().unwrap().starts_with("10.244."));
    assert!(started.elapsed() < within);
}

/// Sends raw bytes on a fresh connection and reads one answer (headers plus the body its
/// content-length announces, or up to EOF). Returns status code and body.
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|len| out.len() >= end + 4 + len) {
                break;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .expect("answer within 10 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    parse_answer(&out)
}

fn parse_answer(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out).to_string();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The `{error, detail}` body of an error answer, asserting it is JSON.
fn json_error(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    (
        v["error"].as_str().expect("error kind").to_string(),
        v["detail"].as_str().expect("error detail").to_string(),
    )
}

async fn metric(run: &Running, name: &str) -> u64 {
    let text = reqwest::get(run.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// Asks `/healthz` on fresh connections until it answers `status` (the server takes and frees
/// connection slots as it accepts and closes them), within 5 s; returns that answer's body.
async fn healthz_until(addr: SocketAddr, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        let (got, body) = raw(addr, request).await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz still answers {got}, not {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_get_json_errors() {
    let run = start(ServerConfig::default(), memory(), any_port()).await;
    let http = reqwest::Client::new();

    // A body over the 16 KiB limit: 413 with a JSON error naming the limit. 20 KiB is over
    // the limit yet fits the socket buffers, so the client finishes writing before the
    // server answers and closes (a 1 MiB body raced into EPIPE now and then).
    let big = format!(
        r#"{{"underlay_ip":"198.18.0.1","encap":"vxlan","pad":"{}"}}"#,
        "x".repeat(20 * 1024)
    );
    let resp = http
        .put(run.url("/v1/nodes/h1"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let (kind, detail) = json_error(&resp.text().await.unwrap());
    assert_eq!(kind, "payload_too_large");
    assert!(detail.contains("16384 byte limit"), "{detail}");

    // A declared length of 1 GB is refused before any of it is read.
    let started = Instant::now();
    let (status, body) = raw(
        run.addr,
        b"PUT /v1/nodes/h1 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 1000000000\r\nconnection: close\r\n\r\n{",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(json_error(&body).0, "payload_too_large");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Wrong method and an undecodable name: JSON too.
    let (status, body) = raw(
        run.addr,
        b"POST /v1/nodes HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(json_error(&body).0, "method_not_allowed");
    let (status, body) = raw(
        run.addr,
        b"GET /v1/nodes/%ff%fe HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(json_error(&body).0, "bad_request");

    serves_others(&run, "h1", 1, Duration::from_secs(5)).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_lose_their_connection() {
    let config = ServerConfig {
        header_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(2500),
        watch_keepalive: Duration::from_millis(400),
        ..ServerConfig::default()
    };
    let run = start(config, memory(), any_port()).await;

    // 50 slowloris clients: a request line, then one header byte every 100 ms.
    let mut slow = Vec::new();
    for i in 0..50 {
        let addr = run.addr;
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("PUT /v1/nodes/slow{i} HTTP/1.1\r\nhost: x\r\nx-pad: ").as_bytes())
                .await
                .unwrap();
            let started = Instant::now();
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if s.write_all(b"a").await.is_err() {
                    return started.elapsed();
                }
                let mut probe = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                    _ => {}
                }
            }
            panic!("a slowloris client held its connection for 10 s");
        }));
    }
    // Meanwhile others are served promptly.
    for i in 0..10u8 {
        serves_others(&run, &format!("good{i}"), 10 + i, Duration::from_secs(2)).await;
    }
    for task in slow {
        let held = task.await.unwrap();
        assert!(held < Duration::from_secs(3), "slow client held {held:?}");
    }

    // A client that finished a request and then sits silent is closed after the idle timeout.
    let mut idle = TcpStream::connect(run.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), idle.read_to_end(&mut sink))
        .await
        .expect("idle keep-alive connection closed by the server")
        .ok();
    assert!(String::from_utf8_lossy(&sink).starts_with("HTTP/1.1 200"));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A watch stream sends nothing back either, but its keepalives keep it open past the
    // idle timeout.
    let mut resp = reqwest::get(run.url("/v1/nodes?watch=true")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let until = Instant::now() + Duration::from_secs(4);
    let mut lines = 0;
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(2), resp.chunk()).await {
            Ok(Ok(Some(_))) => lines += 1,
            other => panic!("watch stream cut while idle: {other:?}"),
        }
    }
    assert!(lines >= 5, "only {lines} chunks in 4 s");
    assert!(
        metric(
            &run,
            "podnet_control_connections_closed_total{reason=\"timeout\"}"
        )
        .await
            >= 51
    );
    drop(resp);
    run.stop().await;
}

/// Opens a watch on a raw connection and returns it with the status code.
async fn open_watch(addr: SocketAddr) -> (TcpStream, u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v1/nodes?watch=true HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("watch answer within 10 s")
            .unwrap();
        assert_eq!(n, 1, "closed before the headers");
        head.push(byte[0]);
    }
    let (status, _) = parse_answer(&head);
    let mut body = String::new();
    if status != 200 {
        let mut rest = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest))
            .await
            .unwrap()
            .unwrap();
        body = String::from_utf8_lossy(&rest[..n]).to_string();
    }
    (s, status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_watchers_are_capped_and_the_service_keeps_serving() {
    const LIMIT: usize = 1500;
    const OPENED: usize = 2000;
    let config = ServerConfig {
        max_watchers: LIMIT,
        ..ServerConfig::default()
    };
    let run = start(config, memory(), any_port()).await;
    let rss_before = rss_kib();

    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..OPENED {
        let (s, status, body) = open_watch(run.addr).await;
        match status {
            200 => accepted.push(s),
            503 => {
                refused += 1;
                let body = body.lines().find(|l| l.starts_with('{')).unwrap_or(&body);
                let (kind, detail) = json_error(body);
                assert_eq!(kind, "too_many_watchers");
                assert!(detail.contains("1500 watch streams"), "{detail}");
            }
            other => panic!("watch answered {other}"),
        }
    }
    assert_eq!(accepted.len(), LIMIT);
    assert_eq!(refused, OPENED - LIMIT);
    assert_eq!(metric(&run, "podnet_control_watchers").await, LIMIT as u64);
    assert_eq!(
        metric(&run, "podnet_control_watchers_refused_total").await,
        (OPENED - LIMIT) as u64
    );
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!(
        "{LIMIT} open watch streams (server and client in this process): +{grown_mib} MiB RSS"
    );
    assert!(grown_mib < 256, "{LIMIT} watchers cost {grown_mib} MiB");

    // The service still serves, and a watcher picked from the crowd sees the change.
    serves_others(&run, "h1", 1, Duration::from_secs(5)).await;
    let mut sample = accepted.swap_remove(LIMIT / 2);
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"name\":\"h1\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), sample.read(&mut chunk))
            .await
            .expect("the event reaches a watcher within 10 s")
            .unwrap();
        assert!(n > 0, "watch closed");
        seen.extend_from_slice(&chunk[..n]);
    }

    // Closing the watchers frees their slots.
    drop(accepted);
    drop(sample);
    let until = Instant::now() + Duration::from_secs(20);
    while metric(&run, "podnet_control_watchers").await != 0 {
        assert!(Instant::now() < until, "closed watch streams not released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_s, status, _) = open_watch(run.addr).await;
    assert_eq!(status, 200);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503_and_close() {
    let config = ServerConfig {
        max_connections: 100,
        ..ServerConfig::default()
    };
    let run = start(config, memory(), any_port()).await;
    // 100 idle connections take every slot (each has sent nothing yet).
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(TcpStream::connect(run.addr).await.unwrap());
    }
    let body = healthz_until(run.addr, 503).await;
    assert_eq!(json_error(&body).0, "too_many_connections");
    // Releasing slots lets clients in again.
    held.truncate(50);
    healthz_until(run.addr, 200).await;
    serves_others(&run, "h1", 1, Duration::from_secs(5)).await;
    drop(held);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_exact_token_gets_in() {
    let token = "9f2c1e7a55d04b3c8e6a1f0d2b4c6e8a";
    let config = ServerConfig {
        token: Some(token.to_string()),
        ..ServerConfig::default()
    };
    let run = start(config, memory(), any_port()).await;
    let http = reqwest::Client::new();
    let wrong = [
        "".to_string(),
        "x".to_string(),
        token[..31].to_string(),      // a prefix
        format!("{token}0"),          // longer
        token.to_uppercase(),         // same length, differs everywhere
        format!("{}X", &token[..31]), // differs in the last byte only
        format!("X{}", &token[1..]),  // differs in the first byte only
    ];
    for presented in &wrong {
        let resp = http
            .get(run.url("/v1/nodes"))
            .header("authorization", format!("Bearer {presented}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{presented:?}");
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Bearer",
            "{presented:?}"
        );
        let (kind, _) = json_error(&resp.text().await.unwrap());
        assert_eq!(kind, "unauthorized");
    }
    for header in [
        format!("bearer {token}"),
        token.to_string(),
        format!("Basic {token}"),
    ] {
        let resp = http
            .get(run.url("/v1/nodes"))
            .header("authorization", header.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{header:?}");
    }
    let resp = http
        .get(run.url("/v1/nodes"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_node_names_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let run = start(
        ServerConfig::default(),
        Arc::new(FileStore::new(&state)),
        any_port(),
    )
    .await;
    let http = reqwest::Client::new();
    let long = "a".repeat(64);
    let cases: &[(&str, &str)] = &[
        ("..", "contains '.'"),
        ("..%2F..%2Fetc%2Fpasswd", "contains '.'"),
        ("a%2Fb", "contains '/'"),
        ("a%5Cb", "contains '\\\\'"),
        ("h1%0A", "contains '\\n'"),
        ("h1%00", "contains '\\0'"),
        ("h1%1B%5B2J", "contains '\\u{1b}'"),
        ("H1", "contains 'H'"),
        ("a.b", "contains '.'"),
        ("-a", "start and end"),
        ("a-", "start and end"),
        ("%20", "contains ' '"),
        (&long, "64 characters long"),
    ];
    for (name, reason) in cases {
        for method in ["PUT", "GET", "DELETE"] {
            let body = reg(9).to_string();
            let request = format!(
                "{method} /v1/nodes/{name} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let (status, body) = raw(run.addr, request.as_bytes()).await;
            assert_eq!(status, 400, "{method} {name}: {body}");
            let (kind, detail) = json_error(&body);
            assert_eq!(kind, "bad_request");
            assert!(detail.contains(reason), "{method} {name}: {detail}");
            assert!(detail.contains("node name"), "{detail}");
        }
    }
    // An unescaped slash is another route: not found, as JSON.
    let resp = http
        .put(run.url("/v1/nodes/a/b"))
        .json(&reg(9))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    json_error(&resp.text().await.unwrap());

    // Nothing was registered and no file but the state file and its log was created.
    let list: Value = reqwest::get(run.url("/v1/nodes"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["nodes"].as_array().unwrap().len(), 0);
    serves_others(&run, "ok-1", 1, Duration::from_secs(5)).await;
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    // ok-1's registration is the log's first line.
    assert_eq!(files, ["state.json", "state.json.log"]);
    run.stop().await;
}
