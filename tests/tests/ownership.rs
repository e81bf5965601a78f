//! The agent owns its host state. A second `podnet-agent run` in the same network
//! namespace refuses before it changes anything; a SIGKILLed agent never blocks the next start;
//! what another process changes (the cluster route, tunl0's MTU and address, tunl0 itself) is
//! put back within 2 s and counted; a start that fails half way leaves nothing behind. Each for
//! VXLAN and IP-in-IP.

use std::time::{Duration, Instant};

use podnet_tests::parse::ping_summary;
use podnet_tests::wait::wait_ping_replies;
use podnet_tests::{
    e2e_ready, must, run, wait_for, Background, Encap, HostMode, Peers, Pod, Testbed,
    TestbedBuilder,
};

fn testbed(name: &str, encap: Encap) -> Testbed {
    TestbedBuilder::new(&format!("{name}{}", encap.name()))
        .hosts(2)
        .pods_per_host(1)
        .mode(HostMode::Podnet(encap))
        .peers(Peers::Static)
        .build()
}

/// What a user would diff on host `n`: routes, addresses, links and UDP/raw sockets with their
/// owners (queue sizes left out: they move with traffic).
fn host_state(tb: &Testbed, n: u8) -> String {
    let ns = tb.host(n).ns.clone();
    let mut out = String::new();
    for argv in [
        &["ip", "route"][..],
        &["ip", "addr"],
        &["ip", "-o", "link"],
        &["ss", "-uwanp"],
    ] {
        let o = must(Some(&ns), argv);
        out.push_str(&format!("$ {}\n", argv.join(" ")));
        let mut lines: Vec<&str> = o.stdout.lines().collect();
        if argv[0] == "ss" {
            lines.sort();
        }
        for line in lines {
            // IPv6 duplicate address detection finishes on its own time.
            let line = line.replace(" tentative", "");
            if argv[0] == "ss" {
                // State Recv-Q Send-Q Local Peer Process: drop the queue sizes.
                let cols: Vec<&str> = line.split_whitespace().collect();
                let keep: Vec<&str> = cols
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 1 && *i != 2)
                    .map(|(_, c)| *c)
                    .collect();
                out.push_str(&keep.join(" "));
            } else {
                out.push_str(&line);
            }
            out.push('\n');
        }
    }
    out
}

/// Host n's agent command line, with another `--state-dir` when `state_dir` is given.
fn agent_argv(tb: &Testbed, n: u8, encap: Encap, state_dir: Option<&str>) -> Vec<String> {
    let bin = podnet_tests::podnet_bin("podnet-agent");
    let mut argv = vec![bin.to_str().expect("utf-8 path").to_owned()];
    argv.extend(tb.agent_args(n, encap));
    if let Some(dir) = state_dir {
        let at = argv
            .iter()
            .position(|a| a == "--state-dir")
            .expect("--state-dir");
        argv[at + 1] = dir.to_owned();
    }
    argv
}

/// Runs a second agent on host 1 to completion (bounded) and returns (success, output).
fn second_agent(tb: &Testbed, encap: Encap, state_dir: Option<&str>) -> (bool, String) {
    let argv = agent_argv(tb, 1, encap, state_dir);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run(Some(&tb.host(1).ns), &argv, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the second agent did not exit: {e}"));
    (out.success(), out.combined())
}

fn second_start_is_refused_and_changes_nothing(encap: Encap) {
    if !e2e_ready() {
        return;
    }
    let mut tb = testbed("second", encap);
    let first = tb.proc("agent-h1").pid();
    let before = host_state(&tb, 1);
    let (from, to) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    // Pods ping throughout: 40 pings 0.1 s apart while the second agents come and go.
    let ip = to.ip.to_string();
    let mut ping = Background::start(
        "ping",
        Some(&from.ns),
        &["ping", "-n", "-c", "40", "-i", "0.1", "-W", "1", &ip],
        &tb.path("ping-second.log"),
    );
    wait_ping_replies(|| ping.log(), 3, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    let other_dir = tb.path("other-state");
    for dir in [None, Some(other_dir.to_str().unwrap())] {
        let (ok, text) = second_agent(&tb, encap, dir);
        assert!(!ok, "a second agent (state dir {dir:?}) started:\n{text}");
        assert!(
            text.contains(&format!(
                "another podnet-agent runs in this network namespace (PID {first}, state dir {}",
                tb.path("h1").display()
            )) && text.contains(&format!("kill {first}")),
            "the refusal must name the running agent and how to stop it ({dir:?}):\n{text}"
        );
    }
    ping.wait_exit(Duration::from_secs(20));
    let pings = ping.log();
    let s = ping_summary(&pings).unwrap_or_else(|| panic!("{pings}"));
    assert_eq!((s.transmitted, s.received), (40, 40), "{pings}");
    assert_eq!(
        host_state(&tb, 1),
        before,
        "the second agents changed host 1"
    );
    assert!(tb.proc("agent-h1").is_running(), "the first agent stopped");
    assert!(!other_dir.join("subnet.env").exists());
    // The lock holder is in the status.
    let status = tb.admin_get(1, "/status").expect("/status");
    let v: serde_json::Value = serde_json::from_str(&status.body).expect("JSON");
    assert_eq!(v["pid"].as_u64(), Some(u64::from(first)), "{}", status.body);
    assert_eq!(v["lock"].as_str(), Some("@podnet-agent"), "{}", status.body);
}

#[test]
fn vxlan_second_start_is_refused_and_changes_nothing() {
    second_start_is_refused_and_changes_nothing(Encap::Vxlan);
}

#[test]
fn ipip_second_start_is_refused_and_changes_nothing() {
    second_start_is_refused_and_changes_nothing(Encap::Ipip);
}

/// Pings `to` from `from` with `size`-byte DF pings until one gets through and `also` holds,
/// for at most `limit`; returns how long it took.
fn until_ping(
    from: &Pod,
    to: std::net::Ipv4Addr,
    size: u32,
    limit: Duration,
    mut also: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    let size = size.to_string();
    let to = to.to_string();
    while start.elapsed() < limit {
        // A refused DF ping left a path MTU in the pod's route cache: forget it, so each try
        // asks the path as it is now.
        must(Some(&from.ns), &["ip", "route", "flush", "cache"]);
        let argv = [
            "ping", "-n", "-c", "1", "-W", "0.2", "-M", "do", "-s", &size, &to,
        ];
        let out =
            run(Some(&from.ns), &argv, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{e}"));
        if out.success() && also() {
            return Some(start.elapsed());
        }
    }
    None
}

fn repairs(tb: &Testbed, what: &str) -> f64 {
    tb.metric(1, "podnet_agent_repairs_total", &[("what", what)])
}

fn what_others_change_is_put_back(encap: Encap) {
    if !e2e_ready() {
        return;
    }
    let mut tb = testbed("repair", encap);
    let (from, to) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let ns = tb.host(1).ns.clone();
    let mtu = 1500 - encap.overhead() as u32;
    for (cmd, what) in [
        ("ip route del 10.244.0.0/16", "route"),
        ("ip link set tunl0 mtu 1300", "mtu"),
        ("ip addr flush dev tunl0", "address"),
        ("ip link del tunl0", "device"),
    ] {
        let before = repairs(&tb, what);
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        must(Some(&ns), &argv);
        // Back means a full-size DF ping passes (an MTU of 1300 refuses it) and the repair
        // was counted.
        let took = until_ping(&from, to.ip, mtu - 28, Duration::from_secs(5), || {
            repairs(&tb, what) > before
        })
        .unwrap_or_else(|| {
            panic!(
                "`{cmd}`: not back after 5 s; agent log:\n{}",
                tb.log("agent-h1")
            )
        });
        assert!(
            took <= Duration::from_secs(2),
            "`{cmd}`: traffic back only after {took:?}"
        );
        let after = repairs(&tb, what);
        assert_eq!(
            after,
            before + 1.0,
            "`{cmd}`: podnet_agent_repairs_total{{what={what}}}"
        );
        let link = must(Some(&ns), &["ip", "link", "show", "tunl0"]).stdout;
        assert!(link.contains(&format!("mtu {mtu}")), "`{cmd}`: {link}");
        let route = must(Some(&ns), &["ip", "route"]).stdout;
        assert!(
            route.contains("10.244.0.0/16 dev tunl0"),
            "`{cmd}`: {route}"
        );
        eprintln!("{encap:?} `{cmd}`: ping back after {took:?}");
    }
    // Logged once per repair, saying what changed.
    let log = tb.log("agent-h1");
    for needle in [
        "MTU was changed to 1300; set back to",
        "it was deleted; rebuilt as ifindex",
    ] {
        assert_eq!(log.matches(needle).count(), 1, "{needle:?} in:\n{log}");
    }
    // A large transfer still works on the rebuilt device (offloads and queues came back).
    let r = tb.iperf(&from, &to, 2).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.received_bytes > 0, "{r:?}");
    let status = podnet_tests::run(
        Some(&ns),
        &[
            podnet_tests::podnet_bin("podnet-agent").to_str().unwrap(),
            "status",
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        status.stdout.contains("repairs:     ") && status.stdout.contains("device 1"),
        "{}",
        status.stdout
    );
}

#[test]
fn vxlan_what_others_change_is_put_back() {
    what_others_change_is_put_back(Encap::Vxlan);
}

#[test]
fn ipip_what_others_change_is_put_back() {
    what_others_change_is_put_back(Encap::Ipip);
}

fn after_sigkill_the_next_start_is_not_blocked(encap: Encap) {
    if !e2e_ready() {
        return;
    }
    let mut tb = testbed("kill9", encap);
    tb.kill9("agent-h1");
    tb.restart_agent(1, HostMode::Podnet(encap));
    let (from, to) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    assert!(
        until_ping(&from, to.ip, 56, Duration::from_secs(5), || true).is_some(),
        "{}",
        tb.log("agent-h1")
    );
}

#[test]
fn vxlan_after_sigkill_the_next_start_is_not_blocked() {
    after_sigkill_the_next_start_is_not_blocked(Encap::Vxlan);
}

#[test]
fn ipip_after_sigkill_the_next_start_is_not_blocked() {
    after_sigkill_the_next_start_is_not_blocked(Encap::Ipip);
}

fn a_start_that_fails_half_way_leaves_nothing(encap: Encap) {
    if !e2e_ready() {
        return;
    }
    let tb = TestbedBuilder::new(&format!("halfway{}", encap.name()))
        .hosts(2)
        .pods_per_host(1)
        .mode(HostMode::Bare)
        .peers(Peers::Static)
        .no_wait()
        .build();
    let ns = tb.host(1).ns.clone();
    // Hold the admin API port: the agent binds it only after creating tunl0, its address and
    // route, its sockets and its policy table.
    let holder = Background::start(
        "holder",
        Some(&ns),
        &[
            "python3",
            "-c",
            "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',7801))\ns.listen()\nprint('held',flush=True)\ntime.sleep(60)",
        ],
        &tb.path("holder.log"),
    );
    wait_for("the port holder", Duration::from_secs(10), || {
        if holder.log().contains("held") {
            Ok(())
        } else {
            Err(holder.log())
        }
    })
    .unwrap();
    let before = host_state(&tb, 1);
    let (ok, text) = second_agent(&tb, encap, None);
    drop(holder);
    assert!(!ok, "{text}");
    assert!(
        text.contains("cannot serve the admin API on 127.0.0.1:7801"),
        "{text}"
    );
    assert_eq!(
        host_state(&tb, 1),
        before,
        "a failed start left something behind:\n{text}"
    );
}

#[test]
fn vxlan_a_start_that_fails_half_way_leaves_nothing() {
    a_start_that_fails_half_way_leaves_nothing(Encap::Vxlan);
}

#[test]
fn ipip_a_start_that_fails_half_way_leaves_nothing() {
    a_start_that_fails_half_way_leaves_nothing(Encap::Ipip);
}
