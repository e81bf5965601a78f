//! Podnet agents with static peers, 3 hosts x 2 pods,
//! for each of IP-in-IP and VXLAN, with the offload fast path (TUN TSO, UDP GSO/GRO, coalesced
//! TUN writes, eight TUN queues) and with `--no-offload --tun-queues 1`: both paths must carry
//! the same traffic.

use std::time::Duration;

use podnet_tests::capture::{self, Capture};
use podnet_tests::parse::{drops_by_reason, frag_needed_mtu, ping_summary};
use podnet_tests::testbed::underlay_filter;
use podnet_tests::wait::wait_for;
use podnet_tests::{
    e2e_ready, expected_workers, must, require_tools, run, Encap, HostMode, Peers, Testbed,
    TestbedBuilder,
};

/// Which data path the agents use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Offload,
    NoOffload,
}

impl Path {
    fn tag(self) -> &'static str {
        match self {
            Path::Offload => "",
            Path::NoOffload => "nooff",
        }
    }
}

/// 3 hosts x 2 pods running podnet with static peers; `build` waits for the full ping mesh.
/// Checks that every agent runs the data path asked for.
fn podnet(name: &str, encap: Encap, path: Path) -> Testbed {
    let mut b = TestbedBuilder::new(&format!("{name}{}", path.tag()))
        .hosts(3)
        .pods_per_host(2)
        .mode(HostMode::Podnet(encap))
        .peers(Peers::Static);
    // The per-packet path also runs the loop's one-queue branch; offload runs eight queues.
    if path == Path::NoOffload {
        b = b.agent_args(&["--no-offload", "--tun-queues", "1"]);
    }
    let tb = b.build();
    for n in 1..=3 {
        let status = tb.admin_get(n, "/status").expect("agent /status");
        let v: serde_json::Value = serde_json::from_str(&status.body).expect("/status is JSON");
        let queues = if path == Path::Offload { 8 } else { 1 };
        assert_eq!(
            v["tun_queues"].as_u64(),
            Some(queues),
            "h{n}: {}",
            v["tun_queues"]
        );
        let workers = expected_workers(queues as usize) as u64;
        assert_eq!(v["workers"].as_u64(), Some(workers), "h{n}: workers");
        // VXLAN and WireGuard: one socket per queue; IP-in-IP: one per worker, each filtered
        // to its flows.
        let receivers = if encap != Encap::Ipip {
            queues
        } else {
            workers
        };
        assert_eq!(
            v["receive_sockets"].as_u64(),
            Some(receivers),
            "h{n}: {}",
            v["receive_sockets"]
        );
        let tso = v["offloads"]["tun_tso"].as_bool();
        assert_eq!(
            tso,
            Some(path == Path::Offload),
            "h{n} offloads: {}",
            v["offloads"]
        );
    }
    tb
}

// 1. Every pod pings every pod on the other hosts.
fn full_mesh(encap: Encap, path: Path) {
    if !e2e_ready() {
        return;
    }
    let tb = podnet(&format!("mesh{}", encap.name()), encap, path);
    let failed = tb.mesh_failures();
    assert!(failed.is_empty(), "no ping: {failed:?}");
    // Three pings per cross-host pair, none lost.
    for a in tb.pods() {
        for b in tb.pods().iter().filter(|b| b.host != a.host) {
            let out = tb.ping(&a, b.ip, 3);
            let s = ping_summary(&out.stdout).unwrap_or_else(|| panic!("{}", out.combined()));
            assert_eq!(
                (s.transmitted, s.received),
                (3, 3),
                "{} -> {}: {}",
                a.ns,
                b.ip,
                out.stdout
            );
        }
    }
}

#[test]
fn ipip_every_pod_pings_every_remote_pod() {
    full_mesh(Encap::Ipip, Path::Offload);
}

#[test]
fn ipip_every_pod_pings_every_remote_pod_no_offload() {
    full_mesh(Encap::Ipip, Path::NoOffload);
}

#[test]
fn vxlan_every_pod_pings_every_remote_pod() {
    full_mesh(Encap::Vxlan, Path::Offload);
}

#[test]
fn vxlan_every_pod_pings_every_remote_pod_no_offload() {
    full_mesh(Encap::Vxlan, Path::NoOffload);
}

// 2. iperf3 TCP completes with non-zero throughput, and every inner TCP checksum on the
// underlay is valid (podnet fills them: with offload it segments super-packets itself).
fn iperf_and_checksums(encap: Encap, path: Path) {
    if !e2e_ready() {
        return;
    }
    require_tools(&["iperf3", "tcpdump", "tshark"]);
    let mut tb = podnet(&format!("iperf{}", encap.name()), encap, path);
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 2).clone());
    let pcap = tb.path("underlay-tcp.pcap");
    let cap = Capture::start(&tb.ul(), "br0", underlay_filter(encap), 3000, &pcap);
    let r = tb
        .iperf(&a, &b, 3)
        .unwrap_or_else(|e| panic!("iperf3 {} -> {}: {e}", a.ns, b.ip));
    assert!(r.received_bps > 0.0 && r.received_bytes > 0, "{r:?}");
    eprintln!(
        "{encap:?}: {:.2} Gbit/s, {} retransmits",
        r.received_bps / 1e9,
        r.retransmits
    );
    let pcap = cap.finish();
    let tally = capture::tcp_checksums(&pcap);
    assert!(
        tally.good >= 100,
        "too few TCP segments decoded on the underlay: {tally:?}"
    );
    assert_eq!(
        (tally.bad, tally.partial),
        (0, 0),
        "invalid inner TCP checksums on the wire: {tally:?}; first bad frames (kept in {}):\n{}",
        pcap.display(),
        capture::bad_tcp_checksums(&pcap)
    );
    assert_eq!(
        tally.ip_bad, 0,
        "invalid inner IPv4 header checksums: {tally:?}"
    );
    assert!(tally.ip_good >= 100, "{tally:?}");
    // The other direction works too (server on host 1).
    let r = tb.iperf(&b, &a, 1).unwrap();
    assert!(r.received_bps > 0.0, "{r:?}");
    // A tiny MSS: with offload a super-packet is then hundreds of segments (358-742 seen),
    // more than one send takes, so the agent sends them in parts. None may go missing: TCP
    // would repair it, with retransmits (0 measured here; 13 000-32 000 in one second when
    // every part after the first was left out).
    let r = tb.iperf_with(&a, &b, 1, &["-M", "100"]).unwrap();
    assert!(r.received_bytes > 0, "MSS 100: {r:?}");
    assert!(r.retransmits < 1000, "MSS 100 lost segments: {r:?}");
    for (n, op) in [(1, "send"), (1, "offload"), (2, "tun_write")] {
        let errors = tb.metric(n, "podnet_agent_io_errors_total", &[("op", op)]);
        assert_eq!(errors, 0.0, "h{n} {op} errors");
    }
}

#[test]
fn ipip_iperf3_runs_with_valid_inner_checksums() {
    iperf_and_checksums(Encap::Ipip, Path::Offload);
}

#[test]
fn ipip_iperf3_runs_with_valid_inner_checksums_no_offload() {
    iperf_and_checksums(Encap::Ipip, Path::NoOffload);
}

#[test]
fn vxlan_iperf3_runs_with_valid_inner_checksums() {
    iperf_and_checksums(Encap::Vxlan, Path::Offload);
}

#[test]
fn vxlan_iperf3_runs_with_valid_inner_checksums_no_offload() {
    iperf_and_checksums(Encap::Vxlan, Path::NoOffload);
}

// 2b. An underlay NIC that does GRO (a real one; here a veth with GRO on, and a GRO flush
// timeout standing in for interrupt coalescing) hands the raw socket IP-in-IP TCP already
// merged into packets of up to 64 KiB. The agent must deliver those as one GSO write (or cut
// them back into MTU-sized packets without offload), not as a packet too big to forward,
// which the kernel would drop with "fragmentation needed" and stall the connection.
fn ipip_over_a_gro_underlay(path: Path) {
    if !e2e_ready() {
        return;
    }
    require_tools(&["iperf3", "tcpdump", "ethtool"]);
    let mut tb = podnet("ipgro", Encap::Ipip, path);
    let ul = tb.ul();
    for n in 1..=2 {
        // A veth passes packets to GRO only when its sending end does not do TSO.
        must(
            Some(&ul),
            &["ethtool", "-K", &format!("uh{n}"), "tso", "off"],
        );
        let ns = tb.host(n).ns.clone();
        must(Some(&ns), &["ethtool", "-K", "eth0", "gro", "on"]);
        must(
            Some(&ns),
            &[
                "sh",
                "-c",
                "echo 200000 > /sys/class/net/eth0/gro_flush_timeout",
            ],
        );
    }
    let (a, c) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    // Outer packets longer than the 1500-byte underlay MTU: only GRO makes those.
    let pcap = tb.path("merged.pcap");
    let cap = Capture::start(
        &tb.host(2).ns,
        "eth0",
        "ip proto 4 and greater 3000",
        5,
        &pcap,
    );
    let r = tb
        .iperf(&a, &c, 2)
        .unwrap_or_else(|e| panic!("iperf3 {} -> {}: {e}", a.ns, c.ip));
    let merged = capture::tcpdump_text(&cap.finish(), false);
    assert!(
        merged.lines().count() > 0,
        "the underlay GRO merged nothing, so this run did not test merged packets"
    );
    eprintln!(
        "{path:?}: {:.2} Gbit/s over a GRO underlay",
        r.received_bps / 1e9
    );
    // Undelivered merged packets leave a few kilobytes of retransmissions at best.
    assert!(r.received_bps > 50e6, "{r:?}");
    assert_eq!(tb.drops(2, "malformed"), 0.0);
}

#[test]
fn ipip_delivers_packets_merged_by_underlay_gro() {
    ipip_over_a_gro_underlay(Path::Offload);
}

#[test]
fn ipip_delivers_packets_merged_by_underlay_gro_no_offload() {
    ipip_over_a_gro_underlay(Path::NoOffload);
}

// 2c. Bursts of small datagrams (the shape of ACKs, DNS, RPCs) arrive complete, in order and
// intact. The agent gathers the packets of one turn and sends them with one `sendmmsg`, runs
// of equal-size VXLAN datagrams to one peer as a UDP GSO train: the train must come apart into
// the same datagrams at the far end. With offload, trains show on the underlay as frames
// longer than the MTU; without, there are none.
const BURST_RECEIVER: &str = r#"
import socket, struct, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: never the bottleneck
s.bind(("0.0.0.0", port))
s.settimeout(10)
print("ready", flush=True)
seqs, bad = [], 0
try:
    while len(seqs) < n:
        d = s.recv(4096)
        i = struct.unpack("!I", d[:4])[0]
        if d != struct.pack("!I", i) + bytes([i % 251]) * (len(d) - 4) or len(d) != 1000 - 400 * (i % 5 == 4):
            bad += 1
        seqs.append(i)
except socket.timeout:
    pass
print("received", len(seqs), "in-order", seqs == sorted(seqs), "distinct", len(set(seqs)), "bad", bad, flush=True)
"#;

const BURST_SENDER: &str = r#"
import socket, struct, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    size = 1000 - 400 * (i % 5 == 4)  # every fifth is shorter: it ends a GSO train
    s.sendto(struct.pack("!I", i) + bytes([i % 251]) * (size - 4), (dst, port))
    if i % 64 == 63:
        time.sleep(0.005)  # bursts of 64, well within every queue on the way
"#;

fn small_datagram_bursts(encap: Encap, path: Path) {
    if !e2e_ready() {
        return;
    }
    require_tools(&["python3", "tcpdump"]);
    const COUNT: u32 = 3000;
    let mut tb = podnet(&format!("burst{}", encap.name()), encap, path);
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let (rx, tx) = (tb.path("burst-rx.py"), tb.path("burst-tx.py"));
    std::fs::write(&rx, BURST_RECEIVER).expect("write receiver");
    std::fs::write(&tx, BURST_SENDER).expect("write sender");
    let port = "5601";
    let count = COUNT.to_string();
    tb.start_ready(
        "burst-rx",
        &b.ns,
        &["python3", rx.to_str().unwrap(), &count, port],
        "ready",
        Duration::from_secs(10),
    )
    .unwrap();
    // Underlay frames longer than the MTU towards host 2: UDP GSO trains (VXLAN only).
    let pcap = tb.path("trains.pcap");
    let cap = Capture::start(
        &tb.host(2).ns,
        "eth0",
        &format!("{} and greater 1600", underlay_filter(encap)),
        1000,
        &pcap,
    );
    let out = run(
        Some(&a.ns),
        &[
            "python3",
            tx.to_str().unwrap(),
            &b.ip.to_string(),
            port,
            &count,
        ],
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "sender: {}", out.combined());
    let summary = wait_for(
        "the burst receiver's summary",
        Duration::from_secs(20),
        || {
            tb.finished_line("burst-rx", "received")
                .ok_or_else(|| tb.log("burst-rx"))
        },
    )
    .unwrap();
    let trains = capture::tcpdump_text(&cap.finish(), false).lines().count();
    eprintln!("{encap:?} {path:?}: {summary}; {trains} train frames on the underlay");
    assert_eq!(
        summary,
        format!("received {COUNT} in-order True distinct {COUNT} bad 0"),
        "every datagram, once, in order, intact"
    );
    let trains_expected = encap == Encap::Vxlan && path == Path::Offload;
    assert_eq!(
        trains > 0,
        trains_expected,
        "{trains} underlay frames longer than the MTU"
    );
}

#[test]
fn ipip_small_datagram_bursts_arrive_in_order() {
    small_datagram_bursts(Encap::Ipip, Path::Offload);
}

#[test]
fn ipip_small_datagram_bursts_arrive_in_order_no_offload() {
    small_datagram_bursts(Encap::Ipip, Path::NoOffload);
}

#[test]
fn vxlan_small_datagram_bursts_travel_as_trains_and_arrive_in_order() {
    small_datagram_bursts(Encap::Vxlan, Path::Offload);
}

#[test]
fn vxlan_small_datagram_bursts_arrive_in_order_no_offload() {
    small_datagram_bursts(Encap::Vxlan, Path::NoOffload);
}

// 2d. VXLAN spreads flows over outer UDP source ports (RFC 7348 section 5), so underlay ECMP
// and the receiver's RSS can spread them too, and keeps each flow on one port (no reordering).
// Eight iperf3 streams: on the wire, each inner TCP flow has exactly one outer source port, all
// of them among the ports /status lists, and the flows use more than one of them.
fn vxlan_source_ports(path: Path) {
    if !e2e_ready() {
        return;
    }
    require_tools(&["iperf3", "tcpdump", "tshark"]);
    let mut tb = podnet("vxsport", Encap::Vxlan, path);
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let status = tb.admin_get(1, "/status").expect("agent /status");
    let v: serde_json::Value = serde_json::from_str(&status.body).expect("/status is JSON");
    let lanes: std::collections::BTreeSet<u64> = v["source_ports"]
        .as_array()
        .unwrap_or_else(|| panic!("/status has no source_ports: {v}"))
        .iter()
        .filter_map(|p| p.as_u64())
        .collect();
    assert_eq!(lanes.len(), 16, "16 distinct source ports: {lanes:?}");
    let pcap = tb.path("sports.pcap");
    let from_h1 = format!("udp dst port 4789 and src host {}", tb.host(1).underlay_ip);
    let cap = Capture::start(&tb.ul(), "br0", &from_h1, 3000, &pcap);
    tb.start_iperf_server("iperf3-s8", &b.ns).unwrap();
    let server = b.ip.to_string();
    let argv = [
        "iperf3",
        "-c",
        &server,
        "-t",
        "2",
        "-P",
        "8",
        "--connect-timeout",
        "3000",
    ];
    let out = run(Some(&a.ns), &argv, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "iperf3: {}", out.combined());
    let pcap = cap.finish();
    let fields = run(
        None,
        &[
            "tshark",
            "-r",
            pcap.to_str().unwrap(),
            "-Y",
            "tcp",
            "-T",
            "fields",
            "-e",
            "udp.srcport",
            "-e",
            "tcp.srcport",
            "-e",
            "tcp.dstport",
        ],
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut ports_of_flow: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>> =
        Default::default();
    for line in fields.stdout.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (Some(outer), Some(inner_src), Some(inner_dst)) = (f.first(), f.get(1), f.get(2))
        else {
            continue;
        };
        // A frame holding a GSO train lists the first datagram's fields (comma-separated
        // for the rest); the first is enough.
        let outer: u64 = outer
            .split(',')
            .next()
            .unwrap()
            .parse()
            .expect("outer port");
        ports_of_flow
            .entry(format!("{inner_src}>{inner_dst}"))
            .or_default()
            .insert(outer);
    }
    eprintln!("{path:?}: outer source ports by inner flow: {ports_of_flow:?}");
    assert!(
        ports_of_flow.len() >= 8,
        "8 data flows and the control connection: {ports_of_flow:?}"
    );
    for (flow, ports) in &ports_of_flow {
        assert_eq!(
            ports.len(),
            1,
            "flow {flow} left from several ports: {ports:?}"
        );
        assert!(
            ports.is_subset(&lanes),
            "flow {flow}: {ports:?} not among {lanes:?}"
        );
    }
    let used: std::collections::BTreeSet<u64> = ports_of_flow.values().flatten().copied().collect();
    assert!(used.len() >= 2, "every flow left from one port: {used:?}");
}

#[test]
fn vxlan_flows_spread_over_outer_source_ports() {
    vxlan_source_ports(Path::Offload);
}

#[test]
fn vxlan_flows_spread_over_outer_source_ports_no_offload() {
    vxlan_source_ports(Path::NoOffload);
}

// 3. tcpdump on tunl0 shows the inner ICMP; on the underlay the same packets decoded as
// IPIP / VXLAN (port 4789, VNI 1) around it.
fn tcpdump_views(encap: Encap, path: Path) {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump"]);
    let tb = podnet(&format!("dump{}", encap.name()), encap, path);
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let inner = tb.path("tunl0.pcap");
    let outer = tb.path("underlay.pcap");
    let cap_in = Capture::start(&tb.host(1).ns, "tunl0", "icmp", 6, &inner);
    let cap_out = Capture::start(&tb.ul(), "br0", underlay_filter(encap), 6, &outer);
    let out = tb.ping(&a, b.ip, 3);
    assert!(out.success(), "{}", out.combined());
    let inner = capture::tcpdump_text(&cap_in.finish(), false);
    let outer = capture::tcpdump_text(&cap_out.finish(), false);
    let request = format!("IP {} > {}: ICMP echo request", a.ip, b.ip);
    let reply = format!("IP {} > {}: ICMP echo reply", b.ip, a.ip);
    assert!(
        inner.contains(&request) && inner.contains(&reply),
        "tunl0:\n{inner}"
    );
    match encap {
        Encap::Ipip => {
            let outer_req = format!("IP 198.18.0.1 > 198.18.0.2: {request}");
            let outer_rep = format!("IP 198.18.0.2 > 198.18.0.1: {reply}");
            assert!(outer.contains(&outer_req), "underlay:\n{outer}");
            assert!(outer.contains(&outer_rep), "underlay:\n{outer}");
        }
        Encap::Vxlan => {
            assert!(
                outer.contains("> 198.18.0.2.4789: VXLAN, flags [I] (0x08), vni 1"),
                "{outer}"
            );
            assert!(
                outer.contains("> 198.18.0.1.4789: VXLAN, flags [I] (0x08), vni 1"),
                "{outer}"
            );
            assert!(
                outer.contains(&request) && outer.contains(&reply),
                "underlay:\n{outer}"
            );
        }
        Encap::Wireguard => {
            // Port to port 51820 both ways, and nothing of the pods' packets in clear.
            assert!(
                outer.contains("198.18.0.1.51820 > 198.18.0.2.51820")
                    && outer.contains("198.18.0.2.51820 > 198.18.0.1.51820"),
                "underlay:\n{outer}"
            );
            assert!(
                !outer.contains(&a.ip.to_string()) && !outer.contains("ICMP"),
                "underlay:\n{outer}"
            );
        }
        Encap::None => unreachable!("--encap none has no tunnel to look into (routing_modes.rs)"),
    }
}

#[test]
fn wireguard_every_pod_pings_every_remote_pod() {
    full_mesh(Encap::Wireguard, Path::Offload);
}

#[test]
fn wireguard_every_pod_pings_every_remote_pod_no_offload() {
    full_mesh(Encap::Wireguard, Path::NoOffload);
}

#[test]
fn wireguard_tcpdump_shows_inner_on_tunl0_and_only_udp_51820_on_underlay() {
    tcpdump_views(Encap::Wireguard, Path::Offload);
}

#[test]
fn ipip_tcpdump_shows_inner_on_tunl0_and_ipip_on_underlay() {
    tcpdump_views(Encap::Ipip, Path::Offload);
}

#[test]
fn ipip_tcpdump_shows_inner_on_tunl0_and_ipip_on_underlay_no_offload() {
    tcpdump_views(Encap::Ipip, Path::NoOffload);
}

#[test]
fn vxlan_tcpdump_shows_inner_on_tunl0_and_vxlan_on_underlay() {
    tcpdump_views(Encap::Vxlan, Path::Offload);
}

#[test]
fn vxlan_tcpdump_shows_inner_on_tunl0_and_vxlan_on_underlay_no_offload() {
    tcpdump_views(Encap::Vxlan, Path::NoOffload);
}

// 4. Unowned cluster address: quick destination-unreachable. DF ping one byte over the overlay
// MTU: frag-needed carrying that MTU; exactly at the MTU: passes. Pods keep MTU 1500.
fn unreachable_and_mtu(encap: Encap, path: Path) {
    if !e2e_ready() {
        return;
    }
    let tb = podnet(&format!("icmp{}", encap.name()), encap, path);
    let mtu = 1500 - encap.overhead() as u32;
    let link = must(Some(&tb.host(1).ns), &["ip", "link", "show", "tunl0"]).stdout;
    assert!(
        link.contains(&format!("mtu {mtu} ")),
        "tunl0 MTU should be {mtu}: {link}"
    );

    let a = tb.pod(1, 1).clone();
    let out = tb.ping(&a, "10.244.200.1".parse().unwrap(), 1);
    let s = ping_summary(&out.stdout).unwrap_or_else(|| panic!("{}", out.combined()));
    assert_eq!((s.received, s.errors), (0, 1), "{}", out.combined());
    assert!(out.stdout.contains("Unreachable"), "{}", out.stdout);
    assert!(
        out.elapsed < Duration::from_millis(900),
        "took {:?}",
        out.elapsed
    );

    let b = tb.pod(3, 2).clone();
    let df_ping = |size: u32| {
        run(
            Some(&a.ns),
            &[
                "ping",
                "-n",
                "-c1",
                "-W2",
                "-M",
                "do",
                "-s",
                &size.to_string(),
                &b.ip.to_string(),
            ],
            Duration::from_secs(10),
        )
        .unwrap()
    };
    let over = df_ping(mtu - 28 + 1);
    assert!(!over.success(), "{}", over.combined());
    assert_eq!(
        frag_needed_mtu(&over.combined()),
        Some(mtu),
        "{}",
        over.combined()
    );
    let at = df_ping(mtu - 28);
    assert!(
        at.success(),
        "a DF ping of exactly {mtu} bytes must pass: {}",
        at.combined()
    );
}

#[test]
fn ipip_unreachable_and_frag_needed() {
    unreachable_and_mtu(Encap::Ipip, Path::Offload);
}

#[test]
fn ipip_unreachable_and_frag_needed_no_offload() {
    unreachable_and_mtu(Encap::Ipip, Path::NoOffload);
}

#[test]
fn vxlan_unreachable_and_frag_needed() {
    unreachable_and_mtu(Encap::Vxlan, Path::Offload);
}

#[test]
fn vxlan_unreachable_and_frag_needed_no_offload() {
    unreachable_and_mtu(Encap::Vxlan, Path::NoOffload);
}

// 6. Malformed or foreign packets are dropped and counted by reason (admin API /metrics, drop
// counters labelled reason="..."), and forwarding goes on.
fn foreign_packets(encap: Encap, path: Path) {
    if !e2e_ready() {
        return;
    }
    let mut tb = podnet(&format!("junk{}", encap.name()), encap, path);
    let rogue = tb.add_underlay_node("x", "198.18.0.99".parse().unwrap());
    let h2 = tb.host(2).ns.clone();
    let inject = env!("CARGO_BIN_EXE_pn-inject");
    let count = 5u32;
    // (namespace to send from, reason expected at host 1, extra flags)
    let mut cases: Vec<(&str, &str, Vec<&str>)> = vec![
        // IP-in-IP: an inner packet of 12 bytes; VXLAN: a UDP payload too short for the header.
        (
            &h2,
            "malformed",
            vec!["--truncate", if encap == Encap::Ipip { "12" } else { "10" }],
        ),
        (&rogue, "unknown_peer", vec![]),
        (&h2, "spoofed", vec!["--inner-src", "10.244.3.2"]),
        (&h2, "not_local", vec!["--inner-dst", "10.244.3.2"]),
    ];
    if encap == Encap::Vxlan {
        cases.push((&h2, "wrong_vni", vec!["--vni", "2"]));
    }
    for (ns, reason, extra) in &cases {
        let before = tb.drops(1, reason);
        let c = count.to_string();
        let mut argv = vec![
            inject,
            "--encap",
            encap.name(),
            "--to",
            "198.18.0.1",
            "--count",
            &c,
        ];
        // Defaults: a well-formed echo request from pod 10.244.2.2 to pod 10.244.1.2.
        if !extra.contains(&"--inner-src") {
            argv.extend(["--inner-src", "10.244.2.2"]);
        }
        if !extra.contains(&"--inner-dst") {
            argv.extend(["--inner-dst", "10.244.1.2"]);
        }
        argv.extend(extra.iter().copied());
        must(Some(ns), &argv);
        let r = podnet_tests::wait_for(&format!("{reason} drops"), Duration::from_secs(3), || {
            let now = tb.drops(1, reason);
            if now - before >= f64::from(count) {
                Ok(())
            } else {
                Err(format!("{reason}: {before} -> {now}"))
            }
        });
        if let Err(e) = r {
            panic!("{e}\nmetrics:\n{}", tb.metrics(1));
        }
    }
    // The agent still runs and forwards.
    assert!(tb.proc("agent-h1").is_running(), "{}", tb.log("agent-h1"));
    let failed = tb.mesh_failures();
    assert!(failed.is_empty(), "after junk: {failed:?}");
    // A valid packet from the peer is not counted as a drop: host 1 delivers it to its pod.
    let rx = |tb: &Testbed| tb.metric(1, "podnet_agent_packets_total", &[("direction", "rx")]);
    let (drops_before, rx_before) = (drops_by_reason(&tb.metrics(1)), rx(&tb));
    must(
        Some(&h2),
        &[
            inject,
            "--encap",
            encap.name(),
            "--to",
            "198.18.0.1",
            "--inner-src",
            "10.244.2.2",
            "--inner-dst",
            "10.244.1.2",
            "--count",
            "1",
        ],
    );
    podnet_tests::wait_for("the valid packet delivered", Duration::from_secs(3), || {
        let now = rx(&tb);
        (now > rx_before)
            .then_some(())
            .ok_or(format!("rx packets {rx_before} -> {now}"))
    })
    .unwrap_or_else(|e| panic!("{e}\nmetrics:\n{}", tb.metrics(1)));
    assert_eq!(
        drops_by_reason(&tb.metrics(1)),
        drops_before,
        "no drop counter moved"
    );
}

#[test]
fn ipip_foreign_packets_are_dropped_and_counted() {
    foreign_packets(Encap::Ipip, Path::Offload);
}

#[test]
fn ipip_foreign_packets_are_dropped_and_counted_no_offload() {
    foreign_packets(Encap::Ipip, Path::NoOffload);
}

#[test]
fn vxlan_foreign_packets_are_dropped_and_counted() {
    foreign_packets(Encap::Vxlan, Path::Offload);
}

#[test]
fn vxlan_foreign_packets_are_dropped_and_counted_no_offload() {
    foreign_packets(Encap::Vxlan, Path::NoOffload);
}
