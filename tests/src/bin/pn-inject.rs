//! Sends crafted IP-in-IP or VXLAN packets to an agent, from inside a testbed namespace.
//!
//! ```text
//! pn-inject --encap vxlan|ipip --to 198.18.0.1 --inner-src 10.244.2.2 --inner-dst 10.244.1.2
//!           [--vni 1] [--truncate N] [--count 5]
//! ```
//! The inner packet is an ICMP echo request. For VXLAN it is wrapped in the VXLAN header and an
//! Ethernet header (dst = the target's VTEP MAC, src = ours, per DESIGN.md) and sent from an
//! ephemeral UDP port to port 4789; for IP-in-IP the kernel adds the outer header (raw socket,
//! protocol 4). `--truncate N` cuts what is sent after the outer header to N bytes. The outer
//! source is whatever address the namespace routes from. Exits non-zero on bad flags or a
//! failed send.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::ExitCode;

use etherparse::PacketBuilder;
use socket2::{Domain, Protocol, Socket, Type};

struct Opts {
    encap: String,
    to: Ipv4Addr,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
    vni: u32,
    truncate: Option<usize>,
    count: u32,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        encap: String::new(),
        to: Ipv4Addr::UNSPECIFIED,
        inner_src: Ipv4Addr::UNSPECIFIED,
        inner_dst: Ipv4Addr::UNSPECIFIED,
        vni: 1,
        truncate: None,
        count: 5,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {v}: {e}");
        match flag.as_str() {
            "--encap" => o.encap = v.clone(),
            "--to" => o.to = v.parse().map_err(|e| bad(&e))?,
            "--inner-src" => o.inner_src = v.parse().map_err(|e| bad(&e))?,
            "--inner-dst" => o.inner_dst = v.parse().map_err(|e| bad(&e))?,
            "--vni" => o.vni = v.parse().map_err(|e| bad(&e))?,
            "--truncate" => o.truncate = Some(v.parse().map_err(|e| bad(&e))?),
            "--count" => o.count = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if o.encap != "vxlan" && o.encap != "ipip" {
        return Err("--encap must be vxlan or ipip".into());
    }
    if o.to.is_unspecified() || o.count > 1000 {
        return Err("--to is required and --count at most 1000".into());
    }
    Ok(o)
}

fn inner_packet(o: &Opts) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(o.inner_src.octets(), o.inner_dst.octets(), 64)
        .icmpv4_echo_request(0x7e57, 1);
    let payload = [0x5a_u8; 32];
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, &payload).expect("write to a Vec");
    out
}

fn vtep_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

fn send(o: &Opts) -> Result<(), String> {
    let inner = inner_packet(o);
    match o.encap.as_str() {
        "vxlan" => {
            let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
            // Learn our own source address (for the source VTEP MAC) by connecting.
            sock.connect((o.to, 4789))
                .map_err(|e| format!("connect: {e}"))?;
            let local = match sock.local_addr().map_err(|e| e.to_string())? {
                SocketAddr::V4(a) => *a.ip(),
                SocketAddr::V6(_) => return Err("IPv6 local address".into()),
            };
            let mut p = Vec::with_capacity(22 + inner.len());
            p.extend_from_slice(&[0x08, 0, 0, 0]);
            p.extend_from_slice(&(o.vni << 8).to_be_bytes());
            p.extend_from_slice(&vtep_mac(o.to));
            p.extend_from_slice(&vtep_mac(local));
            p.extend_from_slice(&[0x08, 0x00]);
            p.extend_from_slice(&inner);
            p.truncate(o.truncate.unwrap_or(p.len()));
            for _ in 0..o.count {
                sock.send(&p).map_err(|e| format!("send: {e}"))?;
            }
        }
        _ => {
            let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(4)))
                .map_err(|e| format!("raw socket (needs CAP_NET_RAW): {e}"))?;
            let mut p = inner;
            p.truncate(o.truncate.unwrap_or(p.len()));
            let to = SocketAddrV4::new(o.to, 0).into();
            for _ in 0..o.count {
                sock.send_to(&p, &to).map_err(|e| format!("send: {e}"))?;
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse().and_then(|o| send(&o)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pn-inject: {e}");
            ExitCode::FAILURE
        }
    }
}
