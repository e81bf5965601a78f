//! `--encap wireguard`.
//!
//! 1. Three hosts through the control service: every pod reaches every pod, and the underlay
//!    carries only UDP 51820 with neither the pods' addresses nor a marker the test sends.
//! 2. Interop: a host running wireguard-go, configured with `wg`, exchanges ping and iperf3
//!    traffic with pods on podnet hosts, both ways.
//! 3. Hostile WireGuard messages (`pn-wgpeer`, a boringtun peer of the test's own) each move
//!    exactly their drop counter, and the agent forwards through a handshake flood.
//! 4. A restarted agent keeps its key; an agent given a new key is re-learned by its peers,
//!    and traffic resumes within 5 s.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use podnet_tests::capture::{self, Capture};
use podnet_tests::parse::{drops_by_reason, ping_summary};
use podnet_tests::{
    e2e_ready, must, podnet_bin, require_tools, run, wait_for, Encap, HostMode, Peers, Testbed,
    TestbedBuilder,
};

const MODE: HostMode = HostMode::Podnet(Encap::Wireguard);

/// 16 bytes the pods send, which must never show on the underlay.
const MARKER: &str = "podnet-wg-marker";

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `/status` of host n as JSON.
fn status(tb: &Testbed, n: u8) -> serde_json::Value {
    let body = tb.admin_get(n, "/status").expect("/status").body;
    serde_json::from_str(&body).expect("/status is JSON")
}

/// Host n's own public key, as its `/status` gives it.
fn own_key(tb: &Testbed, n: u8) -> String {
    status(tb, n)["wireguard_public_key"]
        .as_str()
        .unwrap_or_else(|| panic!("h{n} has no wireguard_public_key"))
        .to_string()
}

/// The key host n's agent holds for peer `peer` (a node name).
fn peer_key(tb: &Testbed, n: u8, peer: &str) -> Option<String> {
    status(tb, n)["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node"] == peer)
        .and_then(|p| p["wireguard"]["public_key"].as_str().map(str::to_string))
}

// 1.
#[test]
fn three_hosts_through_control_reach_each_other_and_the_underlay_shows_only_ciphertext() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump"]);
    let tb = TestbedBuilder::new("wg3")
        .hosts(3)
        .pods_per_host(1)
        .mode(MODE)
        .peers(Peers::Control)
        .build();
    // Keys came through the control service: each host holds the others' own keys.
    for n in 1..=3u8 {
        for k in (1..=3u8).filter(|&k| k != n) {
            assert_eq!(
                peer_key(&tb, n, &format!("h{k}")),
                Some(own_key(&tb, k)),
                "h{n}'s key for h{k}"
            );
        }
    }
    let under = tb.path("underlay.pcap");
    let cap = Capture::start(
        &tb.ul(),
        "br0",
        "ip and not igmp and not tcp port 7800",
        2000,
        &under,
    );
    let clear = tb.path("tunl0.pcap");
    let cap_clear = Capture::start(&tb.host(2).ns, "tunl0", "icmp", 200, &clear);
    let failed = tb.mesh_failures();
    assert!(failed.is_empty(), "no ping: {failed:?}");
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let out = run(
        Some(&a.ns),
        &[
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-s",
            "200",
            "-p",
            &hex(MARKER),
            &b.ip.to_string(),
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(out.success(), "{}", out.combined());
    let under = cap.finish();
    let clear = cap_clear.finish();
    // The marker is there to be seen in clear, inside the overlay...
    let clear_bytes = std::fs::read(&clear).unwrap();
    assert!(
        contains(&clear_bytes, MARKER.as_bytes()),
        "the marker is not in the tunl0 capture"
    );
    // ...and nowhere on the underlay, where only UDP 51820 between the hosts flows (the
    // mesh: 6 pairs of echo request and reply, and the 3 marked pings with their replies).
    let bytes = std::fs::read(&under).unwrap();
    assert!(
        !contains(&bytes, MARKER.as_bytes()),
        "marker in clear on the underlay"
    );
    for pod in tb.pods() {
        assert!(
            !contains(&bytes, &pod.ip.octets()),
            "pod address {} in clear on the underlay",
            pod.ip
        );
    }
    let text = capture::tcpdump_text(&under, false);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // The agent sends what one turn holds for a peer as one UDP GSO train, which the bridge
    // carries whole, so tcpdump shows it as one datagram of the summed length: a line whose
    // length is a multiple of the shortest (one mesh ping) counts as that many.
    let lens: Vec<usize> = lines
        .iter()
        .filter_map(|l| l.rsplit("length ").next()?.trim().parse().ok())
        .collect();
    let unit = lens.iter().copied().min().unwrap_or(1).max(1);
    let datagrams: usize = lens
        .iter()
        .map(|&n| if n % unit == 0 { n / unit } else { 1 })
        .sum();
    assert!(datagrams >= 18, "too few packets captured:\n{text}");
    for line in &lines {
        let udp_51820 = line.contains(".51820 > 198.18.0.") && line.contains(".51820: ");
        assert!(udp_51820, "not WireGuard on the underlay: {line}");
    }
    // status and why show the tunnel; metrics count the handshakes.
    let s = status(&tb, 1);
    let h2 = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "h2")
        .expect("h2 in h1's peers")
        .clone();
    let w = &h2["wireguard"];
    assert!(w["handshakes"].as_u64() >= Some(1), "{w}");
    assert!(w["last_handshake_s"].as_f64().is_some(), "{w}");
    assert!(w["tx_bytes"].as_u64() > Some(600), "{w}");
    let agent = podnet_bin("podnet-agent");
    let agent = agent.to_str().unwrap();
    let text = must(Some(&tb.host(1).ns), &[agent, "status"]).stdout;
    assert!(
        text.contains("WIREGUARD PEER") && text.contains(&own_key(&tb, 2)[..8]),
        "{text}"
    );
    let why = must(Some(&tb.host(1).ns), &[agent, "why", &b.ip.to_string()]).stdout;
    assert!(
        why.contains(&format!("wireguard:   peer key {}", &own_key(&tb, 2)[..8]))
            && why.contains("last handshake"),
        "{why}"
    );
    let handshakes = tb.metric(
        1,
        "podnet_agent_wireguard_handshakes_total",
        &[("peer", "h2")],
    );
    assert!(handshakes >= 1.0, "{handshakes}");
}

// 4.
#[test]
fn a_restarted_agent_keeps_its_key_and_a_new_key_is_relearned_within_5s() {
    if !e2e_ready() {
        return;
    }
    let mut tb = TestbedBuilder::new("wgkey")
        .hosts(2)
        .pods_per_host(1)
        .mode(MODE)
        .peers(Peers::Control)
        .build();
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let first = own_key(&tb, 2);
    let key_file = tb.path("h2/wireguard.key");
    let private = std::fs::read_to_string(&key_file).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");
    assert!(
        !tb.log("agent-h2").contains(private.trim()),
        "the private key is in the log"
    );
    // Restart: the same key, and traffic flows again.
    tb.stop("agent-h2");
    tb.restart_agent(2, MODE);
    assert_eq!(
        own_key(&tb, 2),
        first,
        "the restarted agent changed its key"
    );
    wait_for("ping after a restart", Duration::from_secs(10), || {
        tb.ping(&a, b.ip, 1)
            .success()
            .then_some(())
            .ok_or_else(String::new)
    })
    .expect("no ping after the restart");
    // A new key: h1 re-learns it through the watch, and traffic resumes.
    tb.stop("agent-h2");
    std::fs::remove_file(&key_file).unwrap();
    let started = Instant::now();
    tb.restart_agent(2, MODE);
    let second = own_key(&tb, 2);
    assert_ne!(second, first, "no new key");
    let relearned = wait_for("h1 to learn h2's new key", Duration::from_secs(5), || {
        (peer_key(&tb, 1, "h2").as_deref() == Some(second.as_str()))
            .then(|| started.elapsed())
            .ok_or_else(String::new)
    })
    .expect("h1 kept h2's old key");
    let resumed = wait_for("ping with the new key", Duration::from_secs(5), || {
        tb.ping(&a, b.ip, 1)
            .success()
            .then(|| started.elapsed())
            .ok_or_else(String::new)
    })
    .expect("no ping within 5 s of the new key");
    eprintln!(
        "new key: re-learned after {relearned:?}, ping after {resumed:?} (agent start included)"
    );
    let s = ping_summary(&tb.ping(&b, a.ip, 5).stdout).unwrap();
    assert_eq!(s.received, 5, "the other way: {s:?}");
}

// 2.
#[test]
fn a_wireguard_go_host_exchanges_ping_and_iperf3_with_podnet_pods_both_ways() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["wireguard-go", "wg", "iperf3"]);
    // h1 and h2 run podnet with static peers (h3 among them, with the key made in its
    // state dir); h3 runs wireguard-go, set up with `wg` as a WireGuard user would.
    let mut tb = TestbedBuilder::new("wggo")
        .hosts(3)
        .pods_per_host(1)
        .mode(MODE)
        .host_mode(3, HostMode::Bare)
        .peers(Peers::Static)
        .no_wait()
        .build();
    let ns3 = tb.host(3).ns.clone();
    // The UAPI socket of wireguard-go is /var/run/wireguard/NAME.sock, shared by every
    // namespace: the interface name is unique to this test run.
    let dev = format!("pnwg{}", std::process::id() % 100_000);
    tb.start("wireguard-go", &ns3, &["wireguard-go", "-f", &dev]);
    wait_for("wireguard-go's interface", Duration::from_secs(10), || {
        let out = run(
            Some(&ns3),
            &["ip", "link", "show", &dev],
            Duration::from_secs(5),
        )
        .map_err(|e| e.to_string())?;
        out.success()
            .then_some(())
            .ok_or_else(|| tb.log("wireguard-go"))
    })
    .unwrap_or_else(|log| panic!("wireguard-go did not create {dev}: {log}"));
    let private = tb.path("h3/wireguard.key");
    tb.wireguard_key(3); // made when h1's flags were built; read back here
    let mut wg = vec![
        "wg".to_string(),
        "set".into(),
        dev.clone(),
        "private-key".into(),
        private.to_str().unwrap().into(),
        "listen-port".into(),
        "51820".into(),
    ];
    for n in [1u8, 2] {
        let cidr = tb.host(n).pod_cidr.unwrap().to_string();
        wg.extend([
            "peer".into(),
            tb.wireguard_key(n),
            "endpoint".into(),
            format!("{}:51820", tb.underlay_of(n)),
            "allowed-ips".into(),
            cidr,
        ]);
    }
    let wg: Vec<&str> = wg.iter().map(String::as_str).collect();
    must(Some(&ns3), &wg);
    // Plain routing into the WireGuard device, its MTU the underlay's less 60 as podnet's.
    must(
        Some(&ns3),
        &["ip", "link", "set", &dev, "mtu", "1440", "up"],
    );
    for n in [1u8, 2] {
        let cidr = tb.host(n).pod_cidr.unwrap().to_string();
        must(Some(&ns3), &["ip", "route", "add", &cidr, "dev", &dev]);
    }
    let go = tb.pod(3, 1).clone();
    for n in [1u8, 2] {
        let pod = tb.pod(n, 1).clone();
        // The first ping starts the handshake (from whichever side sends first).
        wait_for(
            &format!("ping {} -> {}", go.ip, pod.ip),
            Duration::from_secs(10),
            || {
                tb.ping(&go, pod.ip, 1)
                    .success()
                    .then_some(())
                    .ok_or_else(String::new)
            },
        )
        .unwrap_or_else(|_| panic!("no ping from the wireguard-go host's pod to {}", pod.ip));
        for (from, to) in [(&go, &pod), (&pod, &go)] {
            let s = ping_summary(&tb.ping(from, to.ip, 5).stdout).unwrap();
            assert_eq!(s.received, 5, "{} -> {}: {s:?}", from.ns, to.ip);
            let r = tb
                .iperf(from, to, 2)
                .unwrap_or_else(|e| panic!("iperf3 {} -> {}: {e}", from.ns, to.ip));
            assert!(
                r.received_bytes > 1_000_000,
                "{} -> {}: {r:?}",
                from.ns,
                to.ip
            );
            eprintln!(
                "{} -> {}: {:.2} Gbit/s, {} retransmits",
                from.ns,
                to.ip,
                r.received_bps / 1e9,
                r.retransmits
            );
        }
    }
    // wg sees the handshakes and the bytes; podnet's status sees wireguard-go's key.
    let show = must(Some(&ns3), &["wg", "show", &dev]).stdout;
    assert!(show.matches("latest handshake").count() == 2, "{show}");
    let go_key = tb.wireguard_key(3);
    let s = status(&tb, 1);
    let peer = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["wireguard"]["public_key"] == go_key.as_str())
        .unwrap_or_else(|| panic!("h1 has no tunnel with key {go_key}: {s}"))
        .clone();
    assert!(
        peer["wireguard"]["handshakes"].as_u64() >= Some(1),
        "{peer}"
    );
    assert!(peer["rx_packets"].as_u64() > Some(1000), "{peer}");
}

/// Host 1's drop counters by reason, and what its receive sockets overflowed.
fn drop_counts(tb: &Testbed) -> (BTreeMap<String, u64>, u64) {
    let drops = drops_by_reason(&tb.metrics(1))
        .into_iter()
        .map(|(reason, n)| (reason, n as u64))
        .collect();
    let st = status(tb, 1);
    let overflow = st["receive_overflow"]
        .as_u64()
        .unwrap_or_else(|| panic!("no receive_overflow in /status: {st}"));
    (drops, overflow)
}

// 3.
#[test]
fn hostile_wireguard_messages_each_move_their_counter_and_a_flood_gets_cookies() {
    if !e2e_ready() {
        return;
    }
    // h1 and h3 run podnet; h2 is a bare host where pn-wgpeer speaks WireGuard with h2's key.
    let tb = TestbedBuilder::new("wghostile")
        .hosts(3)
        .pods_per_host(1)
        .mode(MODE)
        .host_mode(2, HostMode::Bare)
        .peers(Peers::Static)
        .no_wait()
        .build();
    let (p1, p3) = (tb.pod(1, 1).clone(), tb.pod(3, 1).clone());
    wait_for("h1 and h3 to ping", Duration::from_secs(10), || {
        tb.ping(&p1, p3.ip, 1)
            .success()
            .then_some(())
            .ok_or_else(String::new)
    })
    .expect("h1 and h3 do not ping");
    let (before, overflow_before) = drop_counts(&tb);
    let rx_before = tb.metric(1, "podnet_agent_packets_total", &[("direction", "rx")]);
    // Forwarding between the podnet hosts goes on through all of it.
    let ping_log = tb.path("ping-during-flood.log");
    let mut ping = podnet_tests::Background::start(
        "ping",
        Some(&p1.ns),
        &[
            "ping",
            "-n",
            "-c",
            "40",
            "-i",
            "0.1",
            "-W",
            "1",
            &p3.ip.to_string(),
        ],
        &ping_log,
    );
    const COUNT: u64 = 5;
    const FLOOD: u64 = 3000;
    let helper = podnet_bin("pn-wgpeer");
    let key = tb.path("h2/wireguard.key");
    let out = run(
        Some(&tb.host(2).ns),
        &[
            helper.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--peer-key",
            &own_key(&tb, 1),
            "--to",
            "198.18.0.1",
            "--inner-src",
            &tb.host(2).pods[0].ip.to_string(),
            "--inner-dst",
            &p1.ip.to_string(),
            "--count",
            &COUNT.to_string(),
            "--flood",
            &FLOOD.to_string(),
        ],
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(out.success(), "pn-wgpeer: {}", out.combined());
    let sent: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    ping.wait_exit(Duration::from_secs(15));
    let ping = ping_summary(&ping.log()).unwrap_or_else(|| panic!("{}", ping.log()));
    assert_eq!(
        ping.received, ping.transmitted,
        "forwarding during the flood: {ping:?}"
    );
    // Every reason's series exists from the agent's start: a missing one is misspelled.
    let moved = |after: &BTreeMap<String, u64>, r: &str| {
        let count = |m: &BTreeMap<String, u64>| {
            *m.get(r)
                .unwrap_or_else(|| panic!("no drop reason {r} in {m:?}"))
        };
        count(after) - count(&before)
    };
    // The agent has read what was queued once every message sent is accounted for.
    let (after, overflow_after) = wait_for(
        "every hostile message counted",
        Duration::from_secs(10),
        || {
            let (after, overflow_after) = drop_counts(&tb);
            let each = ["wg_replay", "wg_bad_mac", "wg_unknown_index"]
                .iter()
                .all(|r| moved(&after, r) >= COUNT)
                && moved(&after, "malformed") >= 2 * COUNT;
            let flood = moved(&after, "wg_wrong_key")
                + moved(&after, "wg_cookie")
                + (overflow_after - overflow_before);
            if each && flood >= COUNT + FLOOD {
                Ok((after, overflow_after))
            } else {
                Err(format!("{after:?}, overflow {overflow_after}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let delta = |r: &str| moved(&after, r);
    let overflow = overflow_after - overflow_before;
    eprintln!(
        "sent {sent}; drops moved: {:?}; socket overflow {overflow}",
        after
            .keys()
            .map(|r| (r.as_str(), delta(r)))
            .filter(|(_, n)| *n > 0)
            .collect::<Vec<_>>()
    );
    assert_eq!(delta("wg_replay"), COUNT, "replayed counters");
    assert_eq!(delta("wg_bad_mac"), COUNT, "tampered ciphertext");
    assert_eq!(delta("wg_unknown_index"), COUNT, "unknown receiver index");
    assert_eq!(delta("malformed"), 2 * COUNT, "truncated and oversized");
    // Wrong key: the 5 initiations made with another key, and the flood's initiations the
    // agent still answered (below its handshake rate); the rest got cookie replies.
    let (wrong, cookie) = (delta("wg_wrong_key"), delta("wg_cookie"));
    assert_eq!(
        wrong + cookie + overflow,
        COUNT + FLOOD,
        "wrong key {wrong}, cookie {cookie}"
    );
    assert!(
        cookie >= FLOOD / 2,
        "the flood was not answered with cookies: {cookie}"
    );
    let received = sent["cookies_received"].as_u64().unwrap();
    assert!(
        received > 0 && received <= cookie,
        "cookie replies received: {received} of {cookie}"
    );
    for (r, _) in after.iter() {
        let expected = [
            "wg_replay",
            "wg_bad_mac",
            "wg_unknown_index",
            "malformed",
            "wg_wrong_key",
            "wg_cookie",
        ];
        if !expected.contains(&r.as_str()) {
            assert_eq!(delta(r), 0, "{r} moved");
        }
    }
    // The one valid message was delivered, and the pods still talk.
    let rx_after = tb.metric(1, "podnet_agent_packets_total", &[("direction", "rx")]);
    assert!(rx_after > rx_before, "the valid message was not delivered");
    assert!(tb.ping(&p1, p3.ip, 3).success());
}
