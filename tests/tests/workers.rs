//! Data-path workers: with `--workers 2`, many concurrent flows, TCP and UDP, arrive
//! complete and in order per flow, on VXLAN and IP-in-IP, with and without TUN offload; the
//! flows spread over both workers, and the per-worker counters sum to what was sent. Order is
//! checked per UDP datagram by the receiver, and per TCP segment by IP ID in a capture.

use std::time::Duration;

use podnet_tests::capture::{tcp_arrivals, Capture};
use podnet_tests::wait::wait_for;
use podnet_tests::{
    e2e_ready, require_tools, run, Encap, HostMode, Peers, Testbed, TestbedBuilder,
};

/// Receives `flows` UDP flows of `n` 100-byte datagrams each (a flow is a source port), then
/// `streams` TCP connections of `bytes` bytes each, and prints what arrived.
const RECEIVER: &str = r#"
import hashlib, socket, struct, sys, threading
n, flows, streams, size, port = map(int, sys.argv[1:6])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: never the bottleneck
u.bind(("0.0.0.0", port))
u.settimeout(15)
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port))
t.listen(streams)
print("ready", flush=True)
seqs, bad, got = {}, 0, 0
try:
    while got < n * flows:
        d, (_, sport) = u.recvfrom(2048)
        f, i = struct.unpack("!II", d[:8])
        if len(d) != 100 or d[8:] != bytes([(7 * f + i) % 251]) * 92:
            bad += 1
        seqs.setdefault(sport, []).append(i)
        got += 1
except socket.timeout:
    pass
whole = sum(1 for s in seqs.values() if s == list(range(n)))
print("udp flows", len(seqs), "complete-in-order", whole, "datagrams", got, "bad", bad, flush=True)
want = hashlib.sha256(bytes(range(256)) * (size // 256)).hexdigest()
results = []
def serve(c):
    h, k = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b)
        k += len(b)
    results.append(k == size and h.hexdigest() == want)
t.settimeout(30)
threads = []
for _ in range(streams):
    c, _ = t.accept()
    th = threading.Thread(target=serve, args=(c,))
    th.start()
    threads.append(th)
for th in threads:
    th.join()
print("tcp streams", len(results), "intact", sum(results), flush=True)
"#;

/// `udp DST PORT N FLOWS`: N datagrams on each of FLOWS sockets, interleaved, in paced bursts;
/// `tcp DST PORT STREAMS BYTES`: that many connections at once, each sending BYTES.
const SENDER: &str = r#"
import socket, struct, sys, threading, time
mode, dst, port, a, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if mode == "udp":
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(b)]
    for i in range(a):
        for f, s in enumerate(socks):
            s.sendto(struct.pack("!II", f, i) + bytes([(7 * f + i) % 251]) * 92, (dst, port))
        if i % 4 == 3:
            time.sleep(0.002)  # bursts of 4 per flow, well within every queue on the way
else:
    data = bytes(range(256)) * (b // 256)
    def send():
        c = socket.create_connection((dst, port))
        c.sendall(data)
        c.close()
    threads = [threading.Thread(target=send) for _ in range(a)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
print("sent", flush=True)
"#;

const FLOWS: u32 = 16;
const PER_FLOW: u32 = 400;
const STREAMS: u32 = 4;
const STREAM_BYTES: u32 = 8 << 20;

/// Per worker (tx packets, rx packets) of host n, from `/status`.
fn worker_packets(tb: &Testbed, n: u8) -> Vec<(u64, u64)> {
    let status = tb.admin_get(n, "/status").expect("agent /status");
    let v: serde_json::Value = serde_json::from_str(&status.body).expect("/status is JSON");
    let workers = v["worker_counters"].as_array().expect("worker_counters");
    let total = |d: &str| v["counters"][d]["packets"].as_u64().unwrap();
    let per: Vec<(u64, u64)> = workers
        .iter()
        .map(|w| {
            let p = |d: &str| w[d]["packets"].as_u64().unwrap();
            (p("tx"), p("rx"))
        })
        .collect();
    assert_eq!(per.len() as u64, v["workers"].as_u64().unwrap());
    let sum = |f: fn(&(u64, u64)) -> u64| per.iter().map(f).sum::<u64>();
    assert_eq!(
        (sum(|w| w.0), sum(|w| w.1)),
        (total("tx"), total("rx")),
        "h{n}: the node's counters are the sum of the workers'"
    );
    per
}

/// `TcpExtTCPOFOQueue` in `ns`: segments the receiving TCP stack queued out of order, after a
/// loss or a reordering.
fn out_of_order(ns: &str) -> u64 {
    let out = run(
        Some(ns),
        &["nstat", "-asz", "TcpExtTCPOFOQueue"],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtTCPOFOQueue"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("nstat: {}", out.combined()))
}

fn many_flows(encap: Encap, offload: bool) {
    if !e2e_ready() {
        return;
    }
    require_tools(&["python3", "nstat"]);
    let mut args = vec!["--workers", "2"];
    if !offload {
        args.push("--no-offload");
    }
    let tag = if offload { "" } else { "n" };
    let mut tb = TestbedBuilder::new(&format!("wk{}{tag}", encap.name()))
        .hosts(2)
        .pods_per_host(1)
        .mode(HostMode::Podnet(encap))
        .peers(Peers::Static)
        .agent_args(&args)
        .build();
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let (rx, tx) = (tb.path("flows-rx.py"), tb.path("flows-tx.py"));
    std::fs::write(&rx, RECEIVER).expect("write receiver");
    std::fs::write(&tx, SENDER).expect("write sender");
    let port = "5701";
    let num = |n: u32| n.to_string();
    tb.start_ready(
        "flows-rx",
        &b.ns,
        &[
            "python3",
            rx.to_str().unwrap(),
            &num(PER_FLOW),
            &num(FLOWS),
            &num(STREAMS),
            &num(STREAM_BYTES),
            port,
        ],
        "ready",
        Duration::from_secs(10),
    )
    .unwrap();
    let summary = |tb: &Testbed, prefix: &str| {
        wait_for(
            &format!("the receiver's {prefix} line"),
            Duration::from_secs(60),
            || {
                tb.finished_line("flows-rx", prefix)
                    .ok_or_else(|| tb.log("flows-rx"))
            },
        )
        .unwrap()
    };
    let send = |mode: &str, x: u32, y: u32| {
        let argv = [
            "python3",
            tx.to_str().unwrap(),
            mode,
            &b.ip.to_string(),
            port,
            &num(x),
            &num(y),
        ];
        let out =
            run(Some(&a.ns), &argv, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.success(), "sender: {}", out.combined());
    };

    // UDP: many small-packet flows at once.
    let (tx0, rx0) = (worker_packets(&tb, 1), worker_packets(&tb, 2));
    send("udp", PER_FLOW, FLOWS);
    let udp = summary(&tb, "udp");
    let (tx1, rx1) = (worker_packets(&tb, 1), worker_packets(&tb, 2));
    eprintln!("{encap:?} offload={offload}: {udp}; h1 workers tx {tx0:?} -> {tx1:?}; h2 rx {rx0:?} -> {rx1:?}");
    let sent = u64::from(FLOWS * PER_FLOW);
    assert_eq!(
        udp,
        format!("udp flows {FLOWS} complete-in-order {FLOWS} datagrams {sent} bad 0"),
        "every datagram of every flow, once, in order, intact"
    );
    let delta = |after: &[(u64, u64)], before: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| {
        after
            .iter()
            .zip(before)
            .map(|(x, y)| f(x) - f(y))
            .collect::<Vec<u64>>()
    };
    let (sent_by, delivered_by) = (delta(&tx1, &tx0, |w| w.0), delta(&rx1, &rx0, |w| w.1));
    assert_eq!(
        sent_by.iter().sum::<u64>(),
        sent,
        "h1 sent {sent_by:?} by worker"
    );
    assert_eq!(
        delivered_by.iter().sum::<u64>(),
        sent,
        "h2 delivered {delivered_by:?} by worker"
    );
    assert!(
        sent_by.iter().all(|&n| n > 0) && delivered_by.iter().all(|&n| n > 0),
        "the flows spread over both workers on both hosts: sent {sent_by:?}, delivered {delivered_by:?}"
    );

    // TCP: several bulk streams at once, each intact, none reordered on the way. The receiver
    // pod's capture tells reordering from loss: its kernel's out-of-order queue counts both,
    // and a loss under a busy machine is TCP's to repair, not a worker bug.
    let ofo = out_of_order(&b.ns);
    let capture = Capture::headers(
        &b.ns,
        "eth0",
        &format!("tcp dst port {port}"),
        1_000_000,
        &tb.path("tcp-rx.pcap"),
    );
    send("tcp", STREAMS, STREAM_BYTES);
    let tcp = summary(&tb, "tcp");
    let arrivals = tcp_arrivals(&capture.finish());
    let queued = out_of_order(&b.ns) - ofo;
    eprintln!(
        "{encap:?} offload={offload}: {tcp}; {arrivals:?}; {queued} segments queued out of order"
    );
    assert_eq!(tcp, format!("tcp streams {STREAMS} intact {STREAMS}"));
    assert_eq!(
        arrivals.connections, STREAMS as usize,
        "the capture holds every stream: {arrivals:?}"
    );
    assert_eq!(
        arrivals.reordered, 0,
        "segments reordered on the way: {arrivals:?}"
    );
    let (tx2, rx2) = (worker_packets(&tb, 1), worker_packets(&tb, 2));
    eprintln!("after TCP: h1 {tx2:?}, h2 {rx2:?}");
}

#[test]
fn vxlan_flows_arrive_complete_and_in_order_over_two_workers() {
    many_flows(Encap::Vxlan, true);
}

#[test]
fn vxlan_flows_arrive_complete_and_in_order_over_two_workers_no_offload() {
    many_flows(Encap::Vxlan, false);
}

#[test]
fn ipip_flows_arrive_complete_and_in_order_over_two_workers() {
    many_flows(Encap::Ipip, true);
}

#[test]
fn ipip_flows_arrive_complete_and_in_order_over_two_workers_no_offload() {
    many_flows(Encap::Ipip, false);
}
