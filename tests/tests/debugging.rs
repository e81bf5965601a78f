//! The debugging commands on a live testbed (3 hosts x 1 pod, VXLAN, podnet-control).
//!
//! `why` names the right peer and drop reason, injected drops show in `drops --watch`, the
//! counters and per-peer counters, the Prometheus metrics move with iperf3 traffic, a node
//! joining and leaving logs route changes and feeds the convergence histogram, and every
//! checked command of `docs/troubleshooting.md` still prints what the guide shows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use podnet_tests::testbed::underlay_ip;
use podnet_tests::{
    e2e_ready, must, podnet_bin, require_tools, run, wait_for, Encap, HostMode, Peers, Testbed,
    TestbedBuilder,
};

fn testbed(name: &str) -> Testbed {
    TestbedBuilder::new(name)
        .hosts(3)
        .pods_per_host(1)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .peers(Peers::Control)
        .mtls()
        .build()
}

fn agent() -> String {
    podnet_bin("podnet-agent").to_string_lossy().into_owned()
}

/// `podnet-agent ARGS` in host n; panics unless it succeeds.
fn cli(tb: &Testbed, n: u8, args: &[&str]) -> String {
    let bin = agent();
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(args);
    let out =
        run(Some(&tb.host(n).ns), &argv, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "podnet-agent {args:?}: {}", out.combined());
    out.stdout
}

/// Value of the sample `name{labels}` (labels exactly as rendered). Panics when the text has no
/// such sample: a misspelled series fails the test instead of reading as zero.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// The pod CIDR's third octet of host n (the control service hands them out in join order).
fn octet(tb: &Testbed, n: u8) -> u8 {
    let cidr = tb.host(n).pod_cidr.expect("pod CIDR");
    cidr.network().octets()[2]
}

fn pod_ip(tb: &Testbed, n: u8) -> String {
    tb.host(n).pods[0].ip.to_string()
}

#[test]
fn why_names_the_peer_for_each_remote_cidr_and_the_reason_for_the_rest() {
    if !e2e_ready() {
        return;
    }
    let tb = testbed("why");
    for n in 2..=3u8 {
        let o = octet(&tb, n);
        for host in [1, 200] {
            let ip = format!("10.244.{o}.{host}");
            let v: serde_json::Value =
                serde_json::from_str(&cli(&tb, 1, &["why", &ip, "--json"])).unwrap();
            assert_eq!(v["verdict"], "forward", "{ip}: {v}");
            assert_eq!(v["peer"]["node"], format!("h{n}"), "{ip}: {v}");
            assert_eq!(v["peer"]["underlay_ip"], underlay_ip(n).to_string());
            let mac = podnet_tests::testbed::vtep_mac(underlay_ip(n));
            assert_eq!(v["peer"]["vtep_mac"], mac, "{v}");
            assert_eq!(v["prefix"], format!("10.244.{o}.0/24"));
            assert_eq!(
                (v["encap"].as_str(), v["vni"].as_u64()),
                (Some("vxlan"), Some(1))
            );
            assert_eq!(v["mtu"], 1450);
            assert_eq!(v["lease"]["state"], "up", "{v}");
            assert!(v["lease"]["heartbeat_age_ms"].as_u64().unwrap() < 30_000);
        }
        let text = cli(&tb, 1, &["why", &format!("10.244.{o}.9")]);
        assert!(
            text.starts_with(&format!("10.244.{o}.9: forward to h{n}\n")),
            "{text}"
        );
    }
    let own = format!("10.244.{}.9", octet(&tb, 1));
    for (ip, verdict, reason) in [
        (own.as_str(), "local", "own_cidr"),
        ("10.244.250.1", "drop", "no_route"),
        ("192.0.2.1", "drop", "outside_cluster"),
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&cli(&tb, 1, &["why", ip, "--json"])).unwrap();
        assert_eq!(v["verdict"], verdict, "{ip}: {v}");
        assert_eq!(v["reason"], reason, "{ip}: {v}");
        assert!(v["peer"].is_null(), "{v}");
    }
    // The forwarder agrees: the pod on host 1 gets ICMP host unreachable for the unrouted one.
    let ping = run(
        Some(&tb.host(1).pods[0].ns),
        &["ping", "-c1", "-W2", "10.244.250.1"],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(ping.stdout.contains("Unreachable"), "{}", ping.combined());
    let text = cli(&tb, 1, &["why", "10.244.250.1"]);
    assert!(text.contains("drop (no_route)"), "{text}");
    assert!(text.contains("icmp:        host unreachable"), "{text}");
}

#[test]
fn injected_drops_show_in_drops_watch_status_and_metrics() {
    if !e2e_ready() {
        return;
    }
    let mut tb = testbed("drops");
    let h1 = tb.host(1).ns.clone();
    let h2 = tb.host(2).ns.clone();
    let rogue = tb.add_underlay_node("x", "198.18.0.99".parse().unwrap());
    let inject = env!("CARGO_BIN_EXE_pn-inject");
    let pod1 = pod_ip(&tb, 1);
    let pod2 = pod_ip(&tb, 2);
    let o3 = octet(&tb, 3);
    let foreign_src = format!("10.244.{o3}.77");
    let bin = agent();
    tb.start_ready(
        "watch",
        &h1,
        &[&bin, "drops", "--watch", "--duration", "60s"],
        "watching drops",
        Duration::from_secs(10),
    )
    .unwrap();
    let cases: [(&str, &str, Vec<&str>); 3] = [
        (
            &h2,
            "spoofed",
            vec!["--inner-src", &foreign_src, "--inner-dst", &pod1],
        ),
        (
            &h2,
            "wrong_vni",
            vec!["--vni", "7", "--inner-src", &pod2, "--inner-dst", &pod1],
        ),
        (
            &rogue,
            "unknown_peer",
            vec!["--inner-src", &pod2, "--inner-dst", &pod1],
        ),
    ];
    for (ns, _, extra) in &cases {
        let mut argv = vec![
            inject,
            "--encap",
            "vxlan",
            "--to",
            "198.18.0.1",
            "--count",
            "3",
        ];
        argv.extend(extra.iter().copied());
        must(Some(ns), &argv);
    }
    // A flood: the watcher must stay rate-limited and say how much it left out.
    must(
        Some(&h2),
        &[
            inject,
            "--encap",
            "vxlan",
            "--to",
            "198.18.0.1",
            "--count",
            "1000",
            "--inner-src",
            &pod2,
            "--inner-dst",
            "10.244.250.9",
        ],
    );
    let expected = [
        format!("spoofed          rx from h2 (198.18.0.2) {foreign_src} -> {pod1}"),
        format!("wrong_vni        rx from h2 (198.18.0.2) {pod2} -> {pod1}"),
        format!("unknown_peer     rx from 198.18.0.99 (not a peer) {pod2} -> {pod1}"),
        "more drops not sampled".to_string(),
    ];
    let r = wait_for("drops --watch lines", Duration::from_secs(10), || {
        let log = tb.log("watch");
        match expected.iter().find(|e| !log.contains(e.as_str())) {
            None => Ok(()),
            Some(e) => Err(format!("missing {e:?} in:\n{log}")),
        }
    });
    r.unwrap();
    let log = tb.log("watch");
    let not_local_lines = log.lines().filter(|l| l.contains("not_local")).count();
    assert!(
        (1..=dropwatch_burst_plus_rate(10)).contains(&not_local_lines),
        "a flood of 1000 must be sampled, got {not_local_lines} lines"
    );
    tb.stop("watch");

    // Counters by reason and by peer, in status and metrics.
    let status: serde_json::Value =
        serde_json::from_str(&cli(&tb, 1, &["status", "--json"])).unwrap();
    assert!(
        status["counters"]["drops"]["spoofed"].as_u64() >= Some(3),
        "{status}"
    );
    assert!(status["counters"]["drops"]["unknown_peer"].as_u64() >= Some(3));
    let h2_row = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "h2")
        .unwrap();
    assert_eq!(h2_row["drops"]["spoofed"], 3, "{h2_row}");
    assert_eq!(h2_row["drops"]["wrong_vni"], 3, "{h2_row}");
    assert_eq!(h2_row["drops"]["not_local"], 1000, "{h2_row}");
    let text = cli(&tb, 1, &["status"]);
    assert!(text.contains("DROPS BY PEER"), "{text}");
    let m = tb.metrics(1);
    assert_eq!(
        metric(
            &m,
            "podnet_agent_peer_drops_total{peer=\"h2\",reason=\"spoofed\"}"
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "podnet_agent_peer_drops_total{peer=\"h3\",reason=\"spoofed\"}"
        ),
        0.0
    );
    assert!(metric(&m, "podnet_agent_drops_total{reason=\"unknown_peer\"}") >= 3.0);
    // The agent still forwards.
    assert!(tb.mesh_failures().is_empty());
}

/// Upper bound of samples one reason can get in `secs` seconds.
fn dropwatch_burst_plus_rate(secs: usize) -> usize {
    podnet_dataplane_limits::BURST + podnet_dataplane_limits::RATE_PER_S * secs
}

/// The sampler limits of `podnet_dataplane::core::dropwatch` (the tests crate does not link the
/// dataplane; keep in sync).
mod podnet_dataplane_limits {
    pub const BURST: usize = 20;
    pub const RATE_PER_S: usize = 20;
}

#[test]
fn metrics_move_with_iperf3_traffic() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["iperf3"]);
    let mut tb = testbed("metrics");
    let before = tb.metrics(1);
    let series = [
        "podnet_agent_packets_total{direction=\"tx\"}",
        "podnet_agent_bytes_total{direction=\"tx\"}",
        "podnet_agent_peer_packets_total{peer=\"h2\",direction=\"tx\"}",
        "podnet_agent_peer_bytes_total{peer=\"h2\",direction=\"tx\"}",
        "podnet_agent_peer_packets_total{peer=\"h2\",direction=\"rx\"}",
    ];
    let (a, b) = (tb.host(1).pods[0].clone(), tb.host(2).pods[0].clone());
    let result = tb
        .iperf(&a, &b, 3)
        .unwrap_or_else(|e| panic!("iperf3: {e}"));
    let after = tb.metrics(1);
    for s in series {
        let (x, y) = (metric(&before, s), metric(&after, s));
        assert!(y > x, "{s}: {x} -> {y}");
    }
    let sent = metric(&after, series[3]) - metric(&before, series[3]);
    let iperf_bytes = result.received_bytes as f64;
    // Inner bytes towards h2 are at least the TCP payload iperf3 moved.
    assert!(
        sent >= iperf_bytes,
        "peer bytes {sent} < iperf3 bytes {iperf_bytes}"
    );
    // h3 saw none of it.
    assert_eq!(
        metric(
            &after,
            "podnet_agent_peer_bytes_total{peer=\"h3\",direction=\"tx\"}"
        ),
        metric(
            &before,
            "podnet_agent_peer_bytes_total{peer=\"h3\",direction=\"tx\"}"
        )
    );
    // Families documented in docs/troubleshooting.md, with HELP and TYPE.
    let doc = std::fs::read_to_string(repo().join("docs/troubleshooting.md")).unwrap();
    for line in after.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            doc.contains(&format!("`{name}`")),
            "metric {name} is not documented in docs/troubleshooting.md"
        );
    }
    assert_eq!(metric(&after, "podnet_agent_control_connected"), 1.0);
    assert_eq!(metric(&after, "podnet_agent_routes"), 2.0);
    // The workers' packets sum to the node's, in each direction.
    for dir in ["tx", "rx"] {
        let label = format!("direction=\"{dir}\"");
        let by_worker: f64 = after
            .lines()
            .filter(|l| l.starts_with("podnet_agent_worker_packets_total{") && l.contains(&label))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        let total = format!("podnet_agent_packets_total{{{label}}}");
        assert_eq!(by_worker, metric(&after, &total), "{dir}: {after}");
    }
}

#[test]
fn a_node_joining_and_leaving_logs_route_changes_and_feeds_convergence() {
    if !e2e_ready() {
        return;
    }
    let mut tb = testbed("converge");
    let count = |tb: &Testbed| {
        metric(
            &tb.metrics(1),
            "podnet_agent_route_convergence_seconds_count",
        )
    };
    let before = count(&tb);
    tb.add_host(4, HostMode::Podnet(Encap::Vxlan));
    tb.setup_dataplane(4);
    let cidr = tb.wait_subnet(4, Duration::from_secs(30));
    wait_for("route to h4 on h1", Duration::from_secs(10), || {
        let log = tb.log("agent-h1");
        if log.contains("route added") && log.contains("node=h4") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .unwrap();
    let log = tb.log("agent-h1");
    let added = log
        .lines()
        .find(|l| l.contains("route added") && l.contains("node=h4"))
        .unwrap();
    assert!(added.contains(&format!("pod_cidr={cidr}")), "{added}");
    assert!(added.contains("underlay_ip=198.18.0.4"), "{added}");
    assert_eq!(count(&tb), before + 1.0);
    let m = tb.metrics(1);
    // Registration to installed route stays well under 10 s on a local testbed.
    assert_eq!(
        metric(
            &m,
            "podnet_agent_route_convergence_seconds_bucket{le=\"10\"}"
        ),
        metric(&m, "podnet_agent_route_convergence_seconds_count"),
        "{m}"
    );
    let why = cli(&tb, 1, &["why", &cidr.network().to_string()]);
    assert!(why.contains("forward to h4"), "{why}");
    // A graceful leave withdraws the route at once.
    tb.stop("agent-h4");
    wait_for("route to h4 removed on h1", Duration::from_secs(10), || {
        let log = tb.log("agent-h1");
        if log
            .lines()
            .any(|l| l.contains("route removed") && l.contains("node=h4"))
        {
            Ok(())
        } else {
            Err(log)
        }
    })
    .unwrap();
    let why = cli(&tb, 1, &["why", &cidr.network().to_string()]);
    assert!(why.contains("drop (no_route)"), "{why}");
    assert_eq!(metric(&tb.metrics(1), "podnet_agent_routes"), 2.0);
}

// ---- docs/troubleshooting.md runner ---------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One checked command block of the guide: a ```` ```sh run ```` fence, the
/// `<!-- expect: a ; b -->` comment before it and the ```` ```text ```` output after it.
#[derive(Debug)]
struct Step {
    line: usize,
    script: String,
    expect: Vec<String>,
    shown: String,
}

fn steps(doc: &str) -> Vec<Step> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut out = Vec::new();
    let mut expect = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        if let Some(rest) = l.strip_prefix("<!-- expect:") {
            expect = rest
                .trim_end_matches("-->")
                .split(" ; ")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        } else if l == "```sh run" {
            let start = i + 1;
            let mut script = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                script.push_str(lines[i]);
                script.push('\n');
                i += 1;
            }
            let mut shown = String::new();
            let mut j = i + 1;
            while j < lines.len() && lines[j].trim().is_empty() {
                j += 1;
            }
            if j < lines.len() && lines[j].trim() == "```text" {
                j += 1;
                while j < lines.len() && lines[j].trim() != "```" {
                    shown.push_str(lines[j]);
                    shown.push('\n');
                    j += 1;
                }
                i = j;
            }
            out.push(Step {
                line: start,
                script,
                expect: std::mem::take(&mut expect),
                shown,
            });
        }
        i += 1;
    }
    out
}

/// Deletes namespaces the guide creates itself (`ip netns add pn-demo`), also on panic.
struct ExtraNetns(Vec<String>);

impl Drop for ExtraNetns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = run(None, &["ip", "netns", "del", ns], Duration::from_secs(10));
        }
    }
}

/// Rewrites the guide's names (testbed `pn`, hosts' pod CIDRs 10.244.N.0/24, paths under
/// /run/podnet-testbed/pn) to this testbed's.
struct Rewrite {
    pairs: Vec<(String, String)>,
}

impl Rewrite {
    fn new(tb: &Testbed) -> Rewrite {
        let mut pairs = vec![
            ("sudo ".to_string(), String::new()),
            ("pn-h".to_string(), format!("{}-h", tb.prefix)),
            ("pn-ul".to_string(), format!("{}-ul", tb.prefix)),
            ("pn-demo".to_string(), format!("{}-demo", tb.prefix)),
            (
                "/run/podnet-testbed/pn/".to_string(),
                format!("{}/", tb.dir.display()),
            ),
            (
                "target/debug/pn-inject".to_string(),
                env!("CARGO_BIN_EXE_pn-inject").to_string(),
            ),
            ("podnet-agent ".to_string(), format!("{} ", agent())),
            (
                "podnet-control ".to_string(),
                format!("{} ", podnet_bin("podnet-control").display()),
            ),
        ];
        for h in &tb.hosts {
            pairs.push((
                format!("10.244.{}.", h.index),
                format!(
                    "10.244.{}.",
                    h.pod_cidr.expect("cidr").network().octets()[2]
                ),
            ));
        }
        Rewrite { pairs }
    }

    /// Applies every pair at once (left to right, no rewriting of rewritten text).
    fn apply(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (from, to) in &self.pairs {
                if let Some(r) = rest.strip_prefix(from.as_str()) {
                    out.push_str(to);
                    rest = r;
                    continue 'outer;
                }
            }
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// This testbed's names back to the guide's (to paste real output into it).
    fn reverse(&self, text: &str) -> String {
        let back = Rewrite {
            pairs: self
                .pairs
                .iter()
                .filter(|(f, t)| !f.is_empty() && !t.is_empty() && f != "sudo ")
                .map(|(f, t)| (t.clone(), f.clone()))
                .collect(),
        };
        back.apply(text)
    }
}

#[test]
fn troubleshooting_guide_commands_print_what_the_guide_shows() {
    let doc = std::fs::read_to_string(repo().join("docs/troubleshooting.md")).unwrap();
    let steps = steps(&doc);
    assert!(steps.len() >= 10, "the guide lost its checked commands");
    // PODNET_GUIDE_PRINT=1 prints each block's real output (names turned back into the
    // guide's), to refresh the guide after a change.
    let print = std::env::var_os("PODNET_GUIDE_PRINT").is_some();
    for s in steps.iter().filter(|_| !print) {
        assert!(
            !s.expect.is_empty(),
            "line {}: a run block without expect",
            s.line
        );
        for e in &s.expect {
            // The guide's own output must show what the test checks.
            assert!(
                s.shown.contains(e.as_str()),
                "line {}: {e:?} is not in the output the guide shows",
                s.line
            );
        }
    }
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump", "curl"]);
    let mut tb = testbed("guide");
    let _extra = ExtraNetns(vec![format!("{}-demo", tb.prefix)]);
    // PID files where the guide's commands look for them (scripts/testbed's run dir layout).
    for name in ["agent-h1", "agent-h2", "agent-h3", "control"] {
        let pid = tb.proc(name).pid();
        std::fs::write(tb.path(&format!("{name}.pid")), format!("{pid}\n")).unwrap();
    }
    let rw = Rewrite::new(&tb);
    let mut failures = Vec::new();
    for s in &steps {
        let script = rw.apply(&s.script);
        let out = run(None, &["bash", "-c", &script], Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("line {}: {e}", s.line));
        let text = format!("{}{}", out.stdout, out.stderr);
        if print {
            eprintln!("=== line {}\n{}", s.line, rw.reverse(&text));
        }
        for e in &s.expect {
            let want = rw.apply(e);
            if !text.contains(&want) {
                failures.push(format!(
                    "docs/troubleshooting.md line {}: output lacks {want:?}:\n{text}",
                    s.line
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Parses Prometheus text with the official Python client's parser (Debian
/// `python3-prometheus-client`) and prints, per family, its name, type and each sample's name
/// with its label keys: `[[family, type, [[sample, [keys...]], ...]], ...]`.
const PROMETHEUS_PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append([f.name, f.type, [[s.name, sorted(s.labels)] for s in f.samples]])
print(json.dumps(out))
"#;

/// The system's Python, where Debian installs the parser (a pyenv or venv `python3` first on
/// PATH would not see it).
const PYTHON: &str = "/usr/bin/python3";

/// Family name, type, and each sample's name with its label keys.
type ParsedFamily = (String, String, Vec<(String, Vec<String>)>);

/// `(sample name, label keys)` of every sample, after the official parser has read `text`.
fn parsed_series(tb: &Testbed, text: &str) -> std::collections::BTreeSet<(String, String)> {
    let script = tb.path("parse_metrics.py");
    let input = tb.path("metrics.txt");
    std::fs::write(&script, PROMETHEUS_PARSE).expect("write parser");
    std::fs::write(&input, text).expect("write metrics");
    let cmd = format!("{PYTHON} {} < {}", script.display(), input.display());
    let out = run(None, &["sh", "-c", &cmd], Duration::from_secs(30)).expect("python3");
    assert!(
        out.success(),
        "the Prometheus parser rejected the exposition ({}):\n{text}",
        out.combined()
    );
    let families: Vec<ParsedFamily> = serde_json::from_str(&out.stdout).expect("parser output");
    families
        .into_iter()
        .flat_map(|(_, _, samples)| samples)
        .map(|(name, keys)| (name, keys.join(",")))
        .collect()
}

fn series(list: &[(&str, &str)]) -> std::collections::BTreeSet<(String, String)> {
    list.iter()
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect()
}

#[test]
fn metrics_parse_with_the_prometheus_parser_and_keep_their_names() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["curl"]);
    let probe = run(
        None,
        &[PYTHON, "-c", "import prometheus_client.parser"],
        Duration::from_secs(30),
    )
    .expect("python3");
    assert!(
        probe.success(),
        "this test parses /metrics with the official Prometheus Python client: apt-get install \
         python3-prometheus-client (`.ci/run` does it): {}",
        probe.combined()
    );
    let tb = testbed("promparse");
    // Every series name and label set the hand-written expositions served before they moved
    // to prometheus-client (a 3-host VXLAN testbed through podnet-control).
    let agent_series = series(&[
        ("podnet_agent_info", "encap,node,pod_cidr,tun"),
        ("podnet_agent_drops_total", "reason"),
        ("podnet_agent_packets_total", "direction"),
        ("podnet_agent_bytes_total", "direction"),
        ("podnet_agent_worker_packets_total", "direction,worker"),
        ("podnet_agent_peer_packets_total", "direction,peer"),
        ("podnet_agent_peer_bytes_total", "direction,peer"),
        ("podnet_agent_peer_drops_total", "peer,reason"),
        ("podnet_agent_drop_samples_total", ""),
        ("podnet_agent_icmp_sent_total", ""),
        ("podnet_agent_icmp_ratelimited_total", ""),
        ("podnet_agent_io_errors_total", "op"),
        ("podnet_agent_repairs_total", "what"),
        ("podnet_agent_policy_packets_total", "direction,verdict"),
        ("podnet_agent_receive_overflow_total", ""),
        ("podnet_agent_routes", ""),
        ("podnet_agent_table_revision", ""),
        ("podnet_agent_overlay_mtu_bytes", ""),
        ("podnet_agent_uptime_seconds", ""),
        ("podnet_agent_offload_enabled", "offload"),
        ("podnet_agent_control_connected", ""),
        ("podnet_agent_control_watch_connects_total", ""),
        ("podnet_agent_lease_renewals_total", "result"),
        ("podnet_agent_table_updates_total", ""),
        ("podnet_agent_route_convergence_seconds_bucket", "le"),
        ("podnet_agent_route_convergence_seconds_sum", ""),
        ("podnet_agent_route_convergence_seconds_count", ""),
    ]);
    let url = format!("http://{}/metrics", podnet_tests::testbed::admin_api());
    let out = run(
        Some(&tb.host(1).ns),
        &["curl", "-sSf", &url],
        Duration::from_secs(30),
    )
    .expect("curl");
    assert!(out.success(), "curl {url}: {}", out.combined());
    assert_eq!(parsed_series(&tb, &out.stdout), agent_series);

    let control_series = series(&[
        ("podnet_control_nodes", "state"),
        ("podnet_control_revision", ""),
        ("podnet_control_pod_cidr_capacity", ""),
        ("podnet_control_registrations_total", "result"),
        ("podnet_control_lease_lapses_total", ""),
        ("podnet_control_store_errors_total", ""),
        ("podnet_control_watchers", ""),
        ("podnet_control_watchers_refused_total", ""),
        ("podnet_control_connections", ""),
        ("podnet_control_connections_closed_total", "reason"),
        ("podnet_control_http_requests_total", "code"),
        // 0 on this testbed, which runs mTLS.
        ("podnet_control_insecure", ""),
        // Always 1 on the file store.
        ("podnet_control_store_available", ""),
    ]);
    let mut curl = tb.operator_curl();
    curl.extend(["-f".into(), format!("{}/metrics", tb.control_url())]);
    let curl: Vec<&str> = curl.iter().map(String::as_str).collect();
    let out = run(Some(&tb.host(2).ns), &curl, Duration::from_secs(30)).expect("curl");
    let url = curl[curl.len() - 1];
    assert!(out.success(), "curl {url}: {}", out.combined());
    assert_eq!(parsed_series(&tb, &out.stdout), control_series);
    assert!(
        out.stdout.contains("\npodnet_control_insecure 0\n"),
        "{}",
        out.stdout
    );
}
