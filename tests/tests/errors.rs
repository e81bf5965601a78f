//! The agent refuses broken setups with an error a user can act on, and a non-zero
//! exit, without touching what is already there.

use std::time::Duration;

use podnet_tests::{e2e_ready, must, podnet_bin, run, HostMode, TestbedBuilder};

fn agent_run(ns: &str, extra: &[&str]) -> podnet_tests::Output {
    agent_run_env(ns, &[], extra)
}

/// [`agent_run`] with `env` (`NAME=VALUE`) set for the agent.
fn agent_run_env(ns: &str, env: &[&str], extra: &[&str]) -> podnet_tests::Output {
    let bin = podnet_bin("podnet-agent");
    let mut argv = vec!["env"];
    argv.extend_from_slice(env);
    argv.extend([
        bin.to_str().unwrap(),
        "run",
        "--node-name",
        "h1",
        "--underlay-ip",
        "198.18.0.1",
        "--encap",
        "ipip",
    ]);
    argv.extend_from_slice(extra);
    run(Some(ns), &argv, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("the agent must exit on a setup error: {e}"))
}

#[test]
fn agent_refuses_a_non_tun_tunl0() {
    if !e2e_ready() {
        return;
    }
    let tb = TestbedBuilder::new("nontun")
        .hosts(1)
        .pods_per_host(1)
        .mode(HostMode::Bare)
        .no_wait()
        .build();
    let ns = tb.host(1).ns.clone();
    // What the kernel ipip module would leave behind, but any non-TUN device will do.
    must(Some(&ns), &["ip", "link", "add", "tunl0", "type", "bridge"]);
    let out = agent_run(
        &ns,
        &[
            "--pod-cidr",
            "10.244.1.0/24",
            "--static-peer",
            "10.244.2.0/24=198.18.0.2",
        ],
    );
    let text = out.combined();
    assert!(!out.success(), "{text}");
    assert!(
        text.contains("tunl0") && text.contains("--tun-name"),
        "{text}"
    );
    assert!(
        text.contains("ipip"),
        "should say the kernel ipip module creates one: {text}"
    );
    // Untouched: still our bridge.
    let link = must(Some(&ns), &["ip", "-d", "link", "show", "tunl0"]).stdout;
    assert!(link.contains("bridge"), "{link}");
    // And with --tun-name it runs (until we stop it).
    let mut tb = tb;
    let bin = podnet_bin("podnet-agent");
    tb.start(
        "agent-h1",
        &ns,
        &[
            bin.to_str().unwrap(),
            "run",
            "--node-name",
            "h1",
            "--underlay-ip",
            "198.18.0.1",
            "--encap",
            "ipip",
            "--tun-name",
            "pn0",
            "--pod-cidr",
            "10.244.1.0/24",
            "--static-peer",
            "10.244.2.0/24=198.18.0.2",
        ],
    );
    let up = podnet_tests::wait_for("pn0", Duration::from_secs(10), || {
        if !tb.proc("agent-h1").is_running() {
            return Ok(Err(tb.log("agent-h1")));
        }
        let o = run(
            Some(&ns),
            &["ip", "link", "show", "pn0"],
            Duration::from_secs(5),
        )?;
        if o.success() {
            Ok(Ok(()))
        } else {
            Err(o.stderr)
        }
    });
    match up {
        Ok(Ok(())) => {}
        Ok(Err(e)) | Err(e) => panic!("agent with --tun-name pn0: {e}"),
    }
}

#[test]
fn agent_refuses_overlapping_static_peers() {
    if !e2e_ready() {
        return;
    }
    let tb = TestbedBuilder::new("overlap")
        .hosts(1)
        .pods_per_host(1)
        .mode(HostMode::Bare)
        .no_wait()
        .build();
    let ns = tb.host(1).ns.clone();
    let out = agent_run(
        &ns,
        &[
            "--pod-cidr",
            "10.244.1.0/24",
            "--static-peer",
            "10.244.2.0/24=198.18.0.2",
            "--static-peer",
            "10.244.2.128/25=198.18.0.3",
        ],
    );
    let text = out.combined();
    assert!(!out.success(), "{text}");
    assert!(text.to_lowercase().contains("overlap"), "{text}");
    assert!(
        text.contains("10.244.2.0/24") && text.contains("10.244.2.128/25"),
        "{text}"
    );
    // Nothing was created.
    let links = must(Some(&ns), &["ip", "link", "show"]).stdout;
    assert!(!links.contains("tunl0"), "{links}");
}

#[test]
fn a_missing_nft_stops_the_start_and_names_the_way_out() {
    if !e2e_ready() {
        return;
    }
    let tb = TestbedBuilder::new("egressnonft")
        .hosts(1)
        .pods_per_host(1)
        .mode(HostMode::Bare)
        .no_wait()
        .build();
    let ns = tb.host(1).ns.clone();
    let state = tb.path("h1");
    // nft lives in /usr/sbin: a PATH without it is a host without nftables.
    let out = agent_run_env(
        &ns,
        &["PATH=/usr/bin:/bin"],
        &[
            "--underlay-dev",
            "eth0",
            "--pod-cidr",
            "10.244.1.0/24",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    assert!(!out.success(), "started without nft: {}", out.combined());
    assert!(
        out.stderr.contains("apt-get install nftables") && out.stderr.contains("--no-masquerade"),
        "{}",
        out.stderr
    );
    // Nothing left behind: the failed start removed its device.
    let links = run(
        Some(&ns),
        &["ip", "-o", "link", "show"],
        Duration::from_secs(10),
    )
    .expect("ip link");
    assert!(!links.stdout.contains("tunl0"), "{}", links.stdout);
}
