//! A minimal HTTP/1.1 client that connects from inside a network namespace.
//!
//! The agent's admin API listens on 127.0.0.1 in the host's own namespace, and the control
//! service on the underlay, so the harness opens its TCP connection on a short-lived thread
//! that first joins that namespace with setns(2) (a per-thread operation for network
//! namespaces). No curl needed, and nothing listens in the root namespace.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.body)
            .map_err(|e| format!("body is not JSON ({e}): {}", self.body))
    }
}

/// One request. `headers` are extra header lines ("Authorization: Bearer x"). The whole
/// response is read until the server closes or `timeout` passes (for a watch stream, whatever
/// arrived by then is returned).
pub fn request(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, String> {
    let ns = ns.to_owned();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if let Some(b) = body {
        req.push_str("Content-Type: application/json\r\n");
        req.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        req.push_str("\r\n");
    }
    let what = format!("{method} http://{addr}{path} in {ns}");
    let raw = thread::spawn(move || -> Result<Vec<u8>, String> {
        let f = File::open(format!("/run/netns/{ns}")).map_err(|e| format!("open netns: {e}"))?;
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
        let deadline = Instant::now() + timeout;
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(out)
    })
    .join()
    .map_err(|_| format!("{what}: client thread panicked"))?
    .map_err(|e| format!("{what}: {e}"))?;
    parse_response(&raw).map_err(|e| format!("{what}: {e}"))
}

/// `GET /v1/nodes` of a control service (or replica) at `addr`, from `ns`: node name ->
/// (pod CIDR, state). Panics unless it answers 200 with a node list.
pub fn node_states(
    ns: &str,
    addr: SocketAddr,
) -> std::collections::BTreeMap<String, (String, String)> {
    let r = get(ns, addr, "/v1/nodes").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json().unwrap();
    v["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes array: {v}"))
        .iter()
        .map(|n| {
            let s = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
            (s("name"), (s("pod_cidr"), s("state")))
        })
        .collect()
}

/// GET with a 5 s timeout.
pub fn get(ns: &str, addr: SocketAddr, path: &str) -> Result<Response, String> {
    request(ns, addr, "GET", path, &[], None, Duration::from_secs(5))
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete HTTP header in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Chunked transfer decoding; a stream cut off mid-chunk keeps what arrived.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size_line, rest)) = s.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16);
        let Ok(size) = size else { break };
        if size == 0 {
            break;
        }
        let take = size.min(rest.len());
        out.push_str(rest.get(..take).unwrap_or(rest));
        s = rest.get(take..).unwrap_or("").trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hi"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "{\"a\":1}");
        assert_eq!(r.json().unwrap()["a"], 1);
        let r = parse_response(b"HTTP/1.1 409 Conflict\r\n\r\n").unwrap();
        assert_eq!(r.status, 409);
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }
}
