//! The plugin's two calls to its node's agent: a pod attached (`PUT /pods/{container}/{ifname}`
//! with its identity and addresses) and a pod gone (`DELETE`). The agent's admin API listens on
//! loopback in the host's namespace, where runtimes run the plugin; `subnet.env` says where
//! (`PODNET_API`).
//!
//! One short HTTP/1.1 exchange over a blocking socket: the plugin is a one-shot process and
//! needs no async runtime for it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one request; the status and body of the answer.
pub fn call(
    api: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&api, TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, rest.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn one_exchange_with_a_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = c.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            c.write_all(b"HTTP/1.1 409 Conflict\r\ncontent-length: 7\r\n\r\n{\"a\":1}")
                .unwrap();
            req
        });
        let body = serde_json::json!({"name": "a"});
        let (status, answer) = call(addr, "PUT", "/pods/c1/eth0", Some(&body)).unwrap();
        assert_eq!((status, answer.as_str()), (409, "{\"a\":1}"));
        let req = server.join().unwrap();
        assert!(req.starts_with("PUT /pods/c1/eth0 HTTP/1.1\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\n{\"name\":\"a\"}"), "{req}");
    }

    #[test]
    fn nobody_listening_is_an_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(call(port, "DELETE", "/pods/c/eth0", None).is_err());
    }
}
