//! Scale on one machine. 20 hosts with 2 pods each join
//! through podnet-control (VXLAN); every pod reaches every pod on every other host, and the
//! agents' and the control service's memory and CPU at idle are reported.
//!
//! About 40 s on a 2-core machine (6 s to build, 23 s to the full mesh, 10 s of idle
//! measurement); `--nocapture` shows the numbers.

use std::time::{Duration, Instant};

use podnet_tests::{e2e_ready, Encap, HostMode, Peers, Testbed, TestbedBuilder};

const HOSTS: u8 = 20;
const PODS: u8 = 2;

/// Resident memory (KiB) and CPU time used so far (clock ticks) of a process.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    (rss, ticks)
}

fn processes(tb: &mut Testbed) -> Vec<(String, u32)> {
    let mut names: Vec<String> = (1..=HOSTS).map(|n| format!("agent-h{n}")).collect();
    names.push("control".into());
    names
        .into_iter()
        .map(|name| {
            let pid = tb.proc(&name).pid();
            (name, pid)
        })
        .collect()
}

#[test]
fn twenty_hosts_two_pods_each_full_mesh_and_idle_cost() {
    if !e2e_ready() {
        return;
    }
    let started = Instant::now();
    let mut tb = TestbedBuilder::new("scale")
        .hosts(HOSTS)
        .pods_per_host(PODS)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .peers(Peers::Control)
        .no_wait()
        .build();
    let built = started.elapsed();

    // Every ordered pair of pods on different hosts: 40 * 38 = 1520 pairs.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut failed = tb.mesh_failures();
    while !failed.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        failed = tb.mesh_failures();
    }
    assert!(
        failed.is_empty(),
        "{} pairs unreachable: {failed:?}",
        failed.len()
    );
    let meshed = started.elapsed();

    // Idle: no pod traffic for 10 s; leases renew and watches stay open meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    let procs = processes(&mut tb);
    let before: Vec<(u64, u64)> = procs.iter().map(|(_, pid)| usage(*pid)).collect();
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut agent_rss = Vec::new();
    let mut agent_cpu = Vec::new();
    for ((name, pid), (_, t0)) in procs.iter().zip(&before) {
        let (rss, t1) = usage(*pid);
        let cpu = (t1 - t0) as f64 / ticks_per_sec / window.as_secs_f64() * 100.0;
        if name == "control" {
            eprintln!("idle control: {} MiB RSS, {cpu:.2}% CPU", rss / 1024);
        } else {
            agent_rss.push(rss);
            agent_cpu.push(cpu);
        }
    }
    let max_rss = *agent_rss.iter().max().unwrap();
    let mean_rss = agent_rss.iter().sum::<u64>() / agent_rss.len() as u64;
    let max_cpu = agent_cpu.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "idle agents ({HOSTS}): RSS mean {} MiB, max {} MiB; CPU max {max_cpu:.2}%",
        mean_rss / 1024,
        max_rss / 1024
    );
    eprintln!(
        "scale: testbed built in {:.0} s, full mesh ({} pods) in {:.0} s, total {:.0} s",
        built.as_secs_f64(),
        u32::from(HOSTS) * u32::from(PODS),
        meshed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // Idle means idle: no busy loop anywhere.
    assert!(max_cpu < 20.0, "an idle agent uses {max_cpu:.1}% CPU");
    assert!(
        max_rss < 512 * 1024,
        "an idle agent holds {} MiB",
        max_rss / 1024
    );
}
