//! A WireGuard peer of the test's own (boringtun), run inside a testbed namespace, that
//! handshakes with an agent and then sends it hostile messages.
//!
//! ```text
//! pn-wgpeer --key FILE --peer-key KEY --to 198.18.0.1 --inner-src 10.244.2.2
//!           --inner-dst 10.244.1.2 [--count 5] [--flood 3000]
//! ```
//! Binds UDP 51820 on the namespace's addresses, completes a handshake with the agent at
//! `--to`, sends one valid ICMP echo request, then `--count` messages of each case in order:
//! `replay` (that valid message again), `bad_mac` (a fresh message with one ciphertext byte
//! flipped), `unknown_index` (a valid message to a receiver index the agent never gave),
//! `truncated` (a transport message cut to 10 bytes), `oversized` (a handshake initiation with
//! one byte more), `wrong_key` (an initiation made with another static key). Then `--flood`
//! initiations with fresh keys as fast as the socket takes them (paced so the agent's socket
//! does not overflow), and counts the cookie replies that come back. Prints one JSON object:
//! the messages sent per case and the cookie replies received.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::StaticSecret;
use podnet_tests::wg;

struct Opts {
    key: String,
    peer_key: String,
    to: Ipv4Addr,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
    count: u32,
    flood: u32,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        key: String::new(),
        peer_key: String::new(),
        to: Ipv4Addr::UNSPECIFIED,
        inner_src: Ipv4Addr::UNSPECIFIED,
        inner_dst: Ipv4Addr::UNSPECIFIED,
        count: 5,
        flood: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--key" => {
                o.key = std::fs::read_to_string(&value).map_err(|e| bad(&e))?;
            }
            "--peer-key" => o.peer_key = value,
            "--to" => o.to = value.parse().map_err(|e| bad(&e))?,
            "--inner-src" => o.inner_src = value.parse().map_err(|e| bad(&e))?,
            "--inner-dst" => o.inner_dst = value.parse().map_err(|e| bad(&e))?,
            "--count" => o.count = value.parse().map_err(|e| bad(&e))?,
            "--flood" => o.flood = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if o.key.is_empty() || o.peer_key.is_empty() || o.to.is_unspecified() {
        return Err("--key, --peer-key and --to are required".into());
    }
    Ok(o)
}

/// An ICMP echo request `src` -> `dst` with a valid header checksum.
fn echo(src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(0x77, seq)
        .write(&mut out, b"pn-wgpeer")
        .expect("echo request");
    out
}

fn tunnel(private: &StaticSecret, peer: &str, index: u32) -> Tunn {
    Tunn::new(private.clone(), wg::public(peer), None, None, index, None).expect("tunnel")
}

/// Sends what `r` says to, or fails.
fn send(sock: &UdpSocket, to: SocketAddr, r: TunnResult<'_>) -> Result<Vec<u8>, String> {
    match r {
        TunnResult::WriteToNetwork(b) => {
            sock.send_to(b, to).map_err(|e| e.to_string())?;
            Ok(b.to_vec())
        }
        other => Err(format!("expected a message to send, got {other:?}")),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pn-wgpeer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String, String> {
    let o = parse()?;
    let private = wg::secret(&o.key);
    let to = SocketAddr::from((o.to, 51820));
    let sock = UdpSocket::bind("0.0.0.0:51820").map_err(|e| format!("bind 51820: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let mut t = tunnel(&private, &o.peer_key, 1);
    let (mut out, mut buf, mut reply) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
    // Handshake: our initiation, the agent's response (retried as WireGuard does).
    let deadline = Instant::now() + Duration::from_secs(10);
    'handshake: loop {
        if Instant::now() > deadline {
            return Err("no handshake response from the agent".into());
        }
        send(&sock, to, t.format_handshake_initiation(&mut out, true))?;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if buf.first() == Some(&2) {
                match t.decapsulate(Some(from.ip()), &buf[..n], &mut reply) {
                    TunnResult::WriteToNetwork(k) => {
                        // Our keepalive confirms the session to the agent.
                        sock.send_to(k, to).map_err(|e| e.to_string())?;
                        break 'handshake;
                    }
                    other => return Err(format!("handshake response refused: {other:?}")),
                }
            }
        }
    }
    let valid = send(
        &sock,
        to,
        t.encapsulate(&echo(o.inner_src, o.inner_dst, 1), &mut out),
    )?;
    let mut sent = serde_json::Map::new();
    let mut count = |case: &str, n: u32| {
        sent.insert(case.into(), n.into());
    };
    for _ in 0..o.count {
        sock.send_to(&valid, to).map_err(|e| e.to_string())?;
    }
    count("replay", o.count);
    for i in 0..o.count {
        let mut m =
            send_nothing(t.encapsulate(&echo(o.inner_src, o.inner_dst, 100 + i as u16), &mut out))?;
        let last = m.len() - 1;
        m[last - 20] ^= 0x40;
        sock.send_to(&m, to).map_err(|e| e.to_string())?;
    }
    count("bad_mac", o.count);
    for i in 0..o.count {
        let mut m =
            send_nothing(t.encapsulate(&echo(o.inner_src, o.inner_dst, 200 + i as u16), &mut out))?;
        m[4..8].copy_from_slice(&(0x00ab_cd00u32 + i).to_le_bytes());
        sock.send_to(&m, to).map_err(|e| e.to_string())?;
    }
    count("unknown_index", o.count);
    for _ in 0..o.count {
        sock.send_to(&valid[..10], to).map_err(|e| e.to_string())?;
    }
    count("truncated", o.count);
    for _ in 0..o.count {
        let mut other = tunnel(&private, &o.peer_key, 7);
        let mut m = send_nothing(other.format_handshake_initiation(&mut out, true))?;
        m.push(0);
        sock.send_to(&m, to).map_err(|e| e.to_string())?;
    }
    count("oversized", o.count);
    let stranger = StaticSecret::from([0x5a; 32]);
    for i in 0..o.count {
        let mut other = tunnel(&stranger, &o.peer_key, 100 + i);
        let m = send_nothing(other.format_handshake_initiation(&mut out, true))?;
        sock.send_to(&m, to).map_err(|e| e.to_string())?;
    }
    count("wrong_key", o.count);
    // The flood: fresh initiators, each message a valid-looking initiation.
    let mut cookies = 0u64;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    for i in 0..o.flood {
        let mut other = tunnel(&stranger, &o.peer_key, 1000 + i);
        let m = send_nothing(other.format_handshake_initiation(&mut out, true))?;
        sock.send_to(&m, to).map_err(|e| e.to_string())?;
        if i % 32 == 31 {
            std::thread::sleep(Duration::from_millis(2));
        }
        cookies += drain_cookies(&sock, &mut buf);
    }
    sock.set_nonblocking(false).map_err(|e| e.to_string())?;
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            cookies += u64::from(n == 64 && buf[0] == 3);
        }
    }
    count("flood", o.flood);
    sent.insert("cookies_received".into(), cookies.into());
    Ok(serde_json::Value::Object(sent).to_string())
}

/// The bytes of a message boringtun made, without sending it.
fn send_nothing(r: TunnResult<'_>) -> Result<Vec<u8>, String> {
    match r {
        TunnResult::WriteToNetwork(b) => Ok(b.to_vec()),
        other => Err(format!("expected a message, got {other:?}")),
    }
}

/// Cookie replies waiting on the (non-blocking) socket.
fn drain_cookies(sock: &UdpSocket, buf: &mut [u8]) -> u64 {
    let mut n = 0;
    while let Ok((len, _)) = sock.recv_from(buf) {
        n += u64::from(len == 64 && buf[0] == 3);
    }
    n
}
