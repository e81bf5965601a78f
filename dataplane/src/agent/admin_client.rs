//! The client side of the agent's admin API: the `status`, `routes`, `why` and `drops`
//! commands fetch its JSON and print it for people. Used by `main.rs` only; the server side is
//! [`crate::agent::admin`].

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::agent::admin::DropRow;

/// Errors of the `status` / `routes` commands.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot reach the agent's admin API at {addr}: {reason}; is podnet-agent running in this network namespace (ip netns exec ...) and is --api right?")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("unexpected answer from {addr}: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
}

/// GETs `path` from the admin API at `addr`.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<serde_json::Value, QueryError> {
    let url = format!("http://{addr}{path}");
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| QueryError::Unreachable {
            addr,
            reason: e.to_string(),
        })?;
    if !resp.status().is_success() {
        return Err(QueryError::Protocol {
            addr,
            reason: format!("HTTP {}", resp.status()),
        });
    }
    resp.json().await.map_err(|e| QueryError::Protocol {
        addr,
        reason: e.to_string(),
    })
}

/// Human-readable `podnet-agent status`.
pub fn format_status(v: &serde_json::Value) -> String {
    let s = |k: &str| v.get(k).map(display).unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "node:        {}", s("node"));
    let _ = writeln!(
        out,
        "underlay:    {} on {} (VTEP MAC {})",
        s("underlay_ip"),
        s("underlay_dev"),
        s("vtep_mac")
    );
    let _ = writeln!(
        out,
        "pod CIDR:    {} (cluster {})",
        s("pod_cidr"),
        s("cluster_cidr")
    );
    let vni = v
        .get("vni")
        .filter(|x| !x.is_null())
        .map(|x| format!(" vni {x}"))
        .unwrap_or_default();
    let queues = v
        .get("tun_queues")
        .and_then(|q| q.as_u64())
        .filter(|&q| q > 1)
        .map(|q| format!(" ({q} queues)"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "encap:       {}{vni}, MTU {} on {}{queues}",
        s("encap"),
        s("mtu"),
        s("tun")
    );
    match v.get("routing").and_then(|r| r.as_str()) {
        Some("direct") => {
            let _ = writeln!(
                out,
                "routing:     direct routes to the peers on {} (no tunnel)",
                s("underlay_net")
            );
        }
        Some("cross-subnet") => {
            let _ = writeln!(
                out,
                "routing:     cross-subnet: direct routes on {}, the tunnel beyond",
                s("underlay_net")
            );
        }
        _ => {}
    }
    if let Some(key) = v.get("wireguard_public_key").and_then(|k| k.as_str()) {
        let _ = writeln!(
            out,
            "wireguard:   public key {key} (private key in the state dir, 0600)"
        );
    }
    if let Some(egress) = v.get("egress").and_then(|e| e.as_str()) {
        let _ = writeln!(out, "egress:      {egress}");
    }
    if let Some(n) = v.get("workers").and_then(|n| n.as_u64()) {
        let carried: Vec<String> = v
            .get("worker_counters")
            .and_then(|w| w.as_array())
            .into_iter()
            .flatten()
            .map(|w| {
                let n = |d: &str| w[d]["packets"].as_u64().unwrap_or(0);
                format!("{}/{}", n("tx"), n("rx"))
            })
            .collect();
        let _ = writeln!(
            out,
            "workers:     {n} data-path threads, packets tx/rx each: {}",
            carried.join(", ")
        );
    }
    if let Some(n) = v.get("receive_sockets").and_then(|n| n.as_u64()) {
        let what = match v.get("encap").and_then(|e| e.as_str()) {
            Some("vxlan") if n > 1 => "UDP sockets on port 4789 (SO_REUSEPORT group, read in turn)",
            Some("vxlan") => "UDP socket on port 4789",
            Some("wireguard") if n > 1 => {
                "UDP sockets on port 51820 (SO_REUSEPORT group, read in turn)"
            }
            Some("wireguard") => "UDP socket on port 51820",
            _ if n > 1 => "raw IP-in-IP sockets (one per worker, each filtered to its flows)",
            _ => "raw IP-in-IP socket",
        };
        let _ = writeln!(out, "receive:     {n} {what}");
    }
    if let Some(ports) = v.get("source_ports").and_then(|p| p.as_array()) {
        let ports: Vec<u64> = ports.iter().filter_map(|p| p.as_u64()).collect();
        if let (Some(lo), Some(hi)) = (ports.iter().min(), ports.iter().max()) {
            let _ = writeln!(
                out,
                "src ports:   {} outer UDP source ports ({lo}-{hi}), one per flow by inner hash",
                ports.len()
            );
        }
    }
    if let Some(o) = v.get("offloads").and_then(|o| o.as_object()) {
        let on: Vec<&str> = o
            .iter()
            .filter(|(_, v)| v.as_bool() == Some(true))
            .map(|(k, _)| k.as_str())
            .collect();
        let _ = writeln!(
            out,
            "offloads:    {}",
            if on.is_empty() {
                "none".into()
            } else {
                on.join(", ")
            }
        );
    }
    let control = match v.get("control").and_then(|c| c.as_str()) {
        Some(url) => format!(
            "control {url} ({})",
            if v.get("control_connected").and_then(|c| c.as_bool()) == Some(true) {
                "connected"
            } else {
                "disconnected"
            }
        ),
        None => "static".into(),
    };
    let _ = writeln!(
        out,
        "membership:  {control}, table revision {}",
        s("table_revision")
    );
    let _ = writeln!(out, "uptime:      {}s", s("uptime_s"));
    if let Some(lock) = v.get("lock").and_then(|l| l.as_str()) {
        let _ = writeln!(
            out,
            "lock:        {lock} held by PID {} (the only agent of this network namespace)",
            s("pid")
        );
    }
    if let Some(r) = v.get("repairs").and_then(|r| r.as_object()) {
        let made: Vec<String> = r
            .iter()
            .filter_map(|(k, n)| n.as_u64().filter(|&n| n > 0).map(|n| format!("{k} {n}")))
            .collect();
        let _ = writeln!(
            out,
            "repairs:     {}",
            if made.is_empty() {
                "none (host state as installed)".to_string()
            } else {
                made.join(", ")
            }
        );
    }
    if let Some(p) = v.get("policy") {
        let list = |k: &str| {
            let items: Vec<&str> = p[k]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(", ")
            }
        };
        let _ = writeln!(
            out,
            "policy:      revision {}, in force: {}\n             isolated for ingress: {}; for egress: {}",
            p["revision"],
            list("policies"),
            list("ingress_isolated"),
            list("egress_isolated")
        );
    }
    let c = &v["counters"];
    let _ = writeln!(
        out,
        "traffic:     tx {} pkts / {} B, rx {} pkts / {} B, icmp sent {}",
        c["tx"]["packets"], c["tx"]["bytes"], c["rx"]["packets"], c["rx"]["bytes"], c["icmp_sent"]
    );
    let _ = writeln!(
        out,
        "\nPEER                 UNDERLAY         POD CIDR            TX PKTS      RX PKTS  ENCAP"
    );
    for p in v["peers"].as_array().into_iter().flatten() {
        let unreachable = p["unreachable"]
            .as_str()
            .map(|why| format!(" (unreachable: {why})"))
            .unwrap_or_default();
        let direct = if p["path"] == "direct" {
            " (direct route)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<18} {:>8} {:>12}  {}{direct}{unreachable}",
            display(&p["node"]),
            display(&p["underlay_ip"]),
            display(&p["pod_cidr"]),
            display(&p["tx_packets"]),
            display(&p["rx_packets"]),
            display(&p["encap"])
        );
    }
    let tunnels: Vec<String> = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["wireguard"].is_object())
        .map(|p| {
            let w = &p["wireguard"];
            let last = match w["last_handshake_s"].as_f64() {
                Some(s) => format!("{s:.1}s ago"),
                None => "none yet".into(),
            };
            format!(
                "{:<20} {:<10} {:<16} {:>10} {:>14} {:>14}",
                display(&p["node"]),
                display(&w["key"]),
                last,
                display(&w["handshakes"]),
                display(&w["tx_bytes"]),
                display(&w["rx_bytes"])
            )
        })
        .collect();
    if !tunnels.is_empty() {
        let _ = writeln!(
            out,
            "\nWIREGUARD PEER       KEY        LAST HANDSHAKE   HANDSHAKES       TX BYTES       RX BYTES"
        );
        for line in tunnels {
            let _ = writeln!(out, "{line}");
        }
    }
    let peer_drops: Vec<String> = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let node = display(&p["node"]);
            p["drops"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                .map(move |(r, n)| format!("  {node:<20} {r:<18} {n}"))
                .collect::<Vec<_>>()
        })
        .collect();
    if !peer_drops.is_empty() {
        let _ = writeln!(out, "\nDROPS BY PEER");
        for line in peer_drops {
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = writeln!(out, "\nDROPS");
    if let Some(d) = c["drops"].as_object() {
        for (reason, n) in d {
            let _ = writeln!(out, "  {reason:<18} {n}");
        }
    }
    if let Some(n) = v.get("receive_overflow").and_then(|n| n.as_u64()) {
        let _ = writeln!(
            out,
            "  {:<18} {n} (by the kernel: receive sockets full, never read)",
            "receive_overflow"
        );
    }
    out
}

/// Human-readable `podnet-agent routes`.
pub fn format_routes(v: &serde_json::Value) -> String {
    let mut out = format!("revision {}\n", display(&v["revision"]));
    let _ = writeln!(
        out,
        "{:<20} {:<6} {:<20} {:<16} {:<17}  ENCAP",
        "CIDR", "KIND", "NODE", "UNDERLAY", "VTEP MAC"
    );
    for r in v["routes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<20} {:<6} {:<20} {:<16} {:<17}  {}",
            display(&r["cidr"]),
            display(&r["kind"]),
            display(&r["node"]),
            display(&r["underlay_ip"]),
            display(&r["vtep_mac"]),
            match r["path"].as_str() {
                Some("direct") => "direct route".to_string(),
                _ => display(&r["encap"]),
            }
        );
    }
    out
}

/// One line of `podnet-agent drops`: UTC time, reason, direction, addresses, peer.
/// A Unix time in milliseconds as the time of day (UTC).
fn time_of_day(time_ms: u64) -> String {
    let ms = time_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// One packet network policy denied, as `drops` prints it.
pub fn format_denial(d: &crate::agent::policy::Denial) -> String {
    let end = |ip: std::net::Ipv4Addr, pod: &Option<String>| match pod {
        Some(pod) => format!("{ip} ({pod})"),
        None => ip.to_string(),
    };
    let what = match (d.protocol, d.dst_port) {
        (6, p) => format!("TCP {p}"),
        (17, p) => format!("UDP {p}"),
        (132, p) => format!("SCTP {p}"),
        (other, _) => format!("proto {other}"),
    };
    let why = if d.isolated_by.is_empty() {
        "isolated".to_string()
    } else {
        format!("isolated by {}", d.isolated_by.join(", "))
    };
    format!(
        "{} #{:<5} {:<16} {} {} -> {} {what}: {why}, and no policy allows it",
        time_of_day(d.time_ms),
        d.seq,
        "policy_denied",
        d.direction,
        end(d.src, &d.src_pod),
        end(d.dst, &d.dst_pod),
    )
}

pub fn format_drop(row: &DropRow) -> String {
    let s = &row.sample;
    let time = time_of_day(s.time_ms);
    let inner = match (s.inner_src, s.inner_dst) {
        (Some(src), Some(dst)) => format!(
            "{src} -> {dst} proto {}",
            s.protocol.map(|p| p.to_string()).unwrap_or_default()
        ),
        _ => "(no inner IPv4 header)".into(),
    };
    let from = match (s.outer_src, &row.peer) {
        (Some(ip), Some(peer)) => format!(" from {peer} ({ip})"),
        (Some(ip), None) => format!(" from {ip} (not a peer)"),
        _ => String::new(),
    };
    format!(
        "{time} #{:<5} {:<16} {}{from} {inner} len {}",
        s.seq, s.reason, s.direction, s.len
    )
}

fn display(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}
