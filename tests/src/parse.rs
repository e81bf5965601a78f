//! Parsing what the tools print: ping summaries, iperf3 JSON, Prometheus text, subnet.env.

use std::collections::HashMap;

/// The summary line of iputils `ping`: "3 packets transmitted, 3 received, ...".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingSummary {
    pub transmitted: u32,
    pub received: u32,
    /// "+N errors": ICMP errors (unreachable, frag needed) received instead of replies.
    pub errors: u32,
}

pub fn ping_summary(text: &str) -> Option<PingSummary> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut s = PingSummary {
        transmitted: 0,
        received: 0,
        errors: 0,
    };
    for part in line.split(',') {
        let part = part.trim();
        let num = |p: &str| {
            p.trim_start_matches('+')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        if part.ends_with("packets transmitted") {
            s.transmitted = num(part)?;
        } else if part.ends_with("received") {
            s.received = num(part)?;
        } else if part.ends_with("errors") {
            s.errors = num(part)?;
        }
    }
    Some(s)
}

/// The "mtu = N" of a "Frag needed and DF set (mtu = N)" line, or of ping's local
/// "message too long, mtu=N" once the kernel has cached the path MTU.
pub fn frag_needed_mtu(text: &str) -> Option<u32> {
    for marker in ["mtu = ", "mtu="] {
        if let Some(i) = text.find(marker) {
            let digits: String = text[i + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(v) = digits.parse() {
                return Some(v);
            }
        }
    }
    None
}

/// Throughput and retransmits of an `iperf3 -J` client run (receiver side).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IperfResult {
    pub received_bps: f64,
    pub received_bytes: u64,
    pub retransmits: u64,
}

pub fn iperf3_json(text: &str) -> Result<IperfResult, String> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("iperf3 output is not JSON: {e}: {text}"))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3 error: {err}"));
    }
    let end = &v["end"];
    let recv = &end["sum_received"];
    let received_bps = recv["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("no end.sum_received.bits_per_second in {text}"))?;
    Ok(IperfResult {
        received_bps,
        received_bytes: recv["bytes"].as_u64().unwrap_or(0),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// What the sender of an `iperf3 -u -J` client run learned from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IperfUdpResult {
    pub packets: u64,
    pub lost_packets: u64,
}

pub fn iperf3_udp_json(text: &str) -> Result<IperfUdpResult, String> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("iperf3 output is not JSON: {e}: {text}"))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3 error: {err}"));
    }
    let sum = &v["end"]["sum"];
    let field = |name: &str| {
        sum[name]
            .as_u64()
            .ok_or_else(|| format!("no end.sum.{name} in {text}"))
    };
    Ok(IperfUdpResult {
        packets: field("packets")?,
        lost_packets: field("lost_packets")?,
    })
}

/// Sum of the samples of metric `name` in Prometheus text (the exact name as exposed, a
/// counter's `_total` included) that carry every label in `labels` (exact values).
///
/// An error when the text has no such metric, or none of its samples has those labels: it
/// names the metrics or label sets that are there, so a misspelled name or label fails the
/// test that uses it instead of reading as zero.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
    let samples: Vec<_> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(split_sample)
        .collect();
    let family: Vec<_> = samples.iter().filter(|(n, _, _)| *n == name).collect();
    if family.is_empty() {
        let mut names: Vec<&str> = samples.iter().map(|(n, _, _)| *n).collect();
        names.dedup();
        return Err(format!(
            "no metric {name}; the text has: {}",
            names.join(", ")
        ));
    }
    let matching: Vec<f64> = family
        .iter()
        .filter(|(_, sample, _)| {
            labels
                .iter()
                .all(|(k, v)| sample.get(k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, value)| *value)
        .collect();
    if matching.is_empty() {
        let seen: Vec<String> = family
            .iter()
            .map(|(_, sample, _)| {
                let mut pairs: Vec<String> =
                    sample.iter().map(|(k, v)| format!("{k}={v}")).collect();
                pairs.sort();
                format!("{{{}}}", pairs.join(","))
            })
            .collect();
        return Err(format!(
            "{name} has no sample with {labels:?}; its samples: {}",
            seen.join(" ")
        ));
    }
    Ok(matching.iter().sum())
}

/// `podnet_agent_drops_total` of an agent's `/metrics` text, by reason.
pub fn drops_by_reason(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter_map(split_sample)
        .filter(|(name, _, _)| *name == "podnet_agent_drops_total")
        .filter_map(|(_, labels, value)| Some((labels.get("reason")?.clone(), value)))
        .collect()
}

fn split_sample(line: &str) -> Option<(&str, HashMap<&str, String>, f64)> {
    let (head, value) = match line.find('}') {
        Some(close) => (&line[..=close], line[close + 1..].trim()),
        None => {
            let mut it = line.splitn(2, char::is_whitespace);
            (it.next()?, it.next()?.trim())
        }
    };
    let value: f64 = value.split_whitespace().next()?.parse().ok()?;
    let mut labels = HashMap::new();
    let name = match head.find('{') {
        Some(open) => {
            let body = head[open + 1..].trim_end_matches('}');
            for pair in body.split(',') {
                if let Some((k, v)) = pair.split_once('=') {
                    labels.insert(k.trim(), v.trim().trim_matches('"').to_owned());
                }
            }
            &head[..open]
        }
        None => head,
    };
    Some((name, labels, value))
}

/// `KEY=VALUE` lines of a `subnet.env` file (quotes around values removed).
pub fn env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summaries() {
        let ok = "--- 10.244.2.2 ping statistics ---\n\
                  3 packets transmitted, 3 received, 0% packet loss, time 2003ms\n";
        assert_eq!(
            ping_summary(ok),
            Some(PingSummary {
                transmitted: 3,
                received: 3,
                errors: 0
            })
        );
        let err = "From 10.244.1.0 icmp_seq=1 Destination Net Unreachable\n\n\
                   --- 10.244.200.1 ping statistics ---\n\
                   1 packets transmitted, 0 received, +1 errors, 100% packet loss, time 0ms\n";
        assert_eq!(
            ping_summary(err),
            Some(PingSummary {
                transmitted: 1,
                received: 0,
                errors: 1
            })
        );
        assert_eq!(ping_summary("ping: connect: Network is unreachable"), None);
    }

    #[test]
    fn frag_needed() {
        assert_eq!(
            frag_needed_mtu("From 10.244.1.1 icmp_seq=1 Frag needed and DF set (mtu = 1450)"),
            Some(1450)
        );
        assert_eq!(
            frag_needed_mtu("ping: local error: message too long, mtu=1480"),
            Some(1480)
        );
        assert_eq!(frag_needed_mtu("64 bytes from 10.244.2.2"), None);
    }

    #[test]
    fn iperf3() {
        let j = r#"{"end":{"sum_sent":{"retransmits":7,"bytes":10},
                   "sum_received":{"bits_per_second":1.5e9,"bytes":562500000}}}"#;
        let r = iperf3_json(j).unwrap();
        assert_eq!(r.received_bps, 1.5e9);
        assert_eq!(r.received_bytes, 562_500_000);
        assert_eq!(r.retransmits, 7);
        let e = iperf3_json(r#"{"start":{},"error":"unable to connect to server"}"#);
        assert!(e.unwrap_err().contains("unable to connect"));
        assert!(iperf3_json("garbage").is_err());
    }

    #[test]
    fn metrics() {
        let text = "# HELP podnet_drops_total Packets dropped\n\
                    # TYPE podnet_drops_total counter\n\
                    podnet_drops_total{reason=\"wrong_vni\"} 5\n\
                    podnet_drops_total{reason=\"spoofed\",dir=\"in\"} 2\n\
                    podnet_drops_total{reason=\"spoofed\",dir=\"out\"} 1\n\
                    podnet_rx_packets_total{peer=\"198.18.0.2\"} 1e3\n\
                    podnet_up 1\n";
        let drops = |reason| metric_sum(text, "podnet_drops_total", &[("reason", reason)]);
        assert_eq!(drops("wrong_vni"), Ok(5.0));
        assert_eq!(drops("spoofed"), Ok(3.0), "summed over the other labels");
        let misspelled = drops("wrong_vn").unwrap_err();
        assert!(
            misspelled.contains("no sample") && misspelled.contains("reason=wrong_vni"),
            "{misspelled}"
        );
        let rx = metric_sum(text, "podnet_rx_packets_total", &[("peer", "198.18.0.2")]);
        assert_eq!(rx, Ok(1000.0));
        assert_eq!(metric_sum(text, "podnet_up", &[]), Ok(1.0));
        // A part of a name is not the name: neither a prefix nor a counter without `_total`.
        for part in ["drop", "podnet_drops", "rx_packets"] {
            let err = metric_sum(text, part, &[]).unwrap_err();
            assert!(
                err.contains("no metric") && err.contains("podnet_up"),
                "{err}"
            );
        }
    }

    #[test]
    fn env_files() {
        let env =
            env_file("POD_NETWORK=10.244.0.0/16\nPOD_SUBNET=\"10.244.3.0/24\"\nPOD_MTU=1450\n");
        assert_eq!(env["POD_SUBNET"], "10.244.3.0/24");
        assert_eq!(env["POD_MTU"], "1450");
    }
}
