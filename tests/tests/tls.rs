//! The control plane under mTLS, on a 3-host VXLAN testbed whose podnet-control has a
//! cluster CA, a server certificate and one certificate per node (`podnet-control ca`).
//!
//! Every pod reaches every pod and the underlay shows TLS only on port 7800; a node cannot
//! speak for another (403) and the victim keeps its CIDR and traffic; clients without a
//! certificate, with another CA's, with an expired one, or speaking plain HTTP are refused
//! with a clear error while the others are served; `serve` without TLS refuses to start unless
//! `--insecure`; an agent picks up a certificate replaced on disk at its next reconnect.

use std::time::Duration;

use podnet_tests::capture::Capture;
use podnet_tests::testbed::underlay_ip;
use podnet_tests::{
    e2e_ready, podnet_bin, require_tools, run, wait_for, Encap, HostMode, Output, Peers, Testbed,
    TestbedBuilder,
};

const MODE: HostMode = HostMode::Podnet(Encap::Vxlan);

fn mtls_testbed(name: &str) -> Testbed {
    TestbedBuilder::new(name)
        .hosts(3)
        .pods_per_host(1)
        .mode(MODE)
        .peers(Peers::Control)
        .mtls()
        .build()
}

/// `curl ARGS` in host n's namespace; returns its output whatever the exit code.
fn curl(tb: &Testbed, n: u8, args: &[String]) -> Output {
    let mut argv = vec!["curl", "-sS", "--max-time", "10"];
    argv.extend(args.iter().map(String::as_str));
    run(Some(&tb.host(n).ns), &argv, Duration::from_secs(20)).expect("curl")
}

/// `--cacert`, `--cert` and `--key` for the certificate `stem` (`node-h3`, ...) of `dir`.
fn cert_args(dir: &std::path::Path, stem: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).to_str().expect("utf-8 path").to_string();
    vec![
        "--cacert".into(),
        p("ca.pem".into()),
        "--cert".into(),
        p(format!("{stem}.pem")),
        "--key".into(),
        p(format!("{stem}-key.pem")),
    ]
}

fn url(tb: &Testbed, path: &str) -> String {
    format!("{}{path}", tb.control_url())
}

/// The HTTP status and body of a curl run with `-w '\n%{http_code}'`.
fn status_and_body(out: &Output) -> (u16, String) {
    let (body, code) = out
        .stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status in curl output: {}", out.combined()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `podnet-control nodes` against `server`, as the testbed's operator, from host 1.
fn operator_nodes(tb: &Testbed, server: &str) -> Output {
    let bin = podnet_bin("podnet-control");
    let pki = tb.pki();
    let file = |f: &str| pki.join(f).to_str().expect("utf-8 path").to_string();
    let (ca, cert, key) = (
        file("ca.pem"),
        file("operator-admin.pem"),
        file("operator-admin-key.pem"),
    );
    let argv = [
        bin.to_str().unwrap(),
        "nodes",
        "--server",
        server,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    run(Some(&tb.host(1).ns), &argv, Duration::from_secs(20)).expect("podnet-control nodes")
}

fn ping_all(tb: &Testbed) {
    let failures = tb.mesh_failures();
    assert!(failures.is_empty(), "pod mesh: {failures:?}");
}

#[test]
fn pods_reach_each_other_over_mtls_and_the_underlay_shows_only_tls() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump", "tshark", "curl"]);
    let mut tb = mtls_testbed("tlsmesh");
    ping_all(&tb);
    // Host 2's whole conversation with the service, from its registration on: restart it
    // while capturing.
    let pcap = tb.path("control.pcap");
    let cap = Capture::start(&tb.host(2).ns, "eth0", "tcp port 7800", 400, &pcap);
    tb.stop("agent-h2");
    tb.restart_agent(2, MODE);
    tb.wait_mesh(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("mesh after the restart: {e}"));
    let pcap = cap.finish();

    let tshark = |filter: &str| -> usize {
        let out = run(
            None,
            &[
                "tshark",
                "-r",
                pcap.to_str().unwrap(),
                "-d",
                "tcp.port==7800,tls",
                "-Y",
                filter,
            ],
            Duration::from_secs(60),
        )
        .expect("tshark");
        assert!(out.success(), "tshark: {}", out.combined());
        out.stdout.lines().count()
    };
    let hellos = tshark("tls.handshake.type == 1");
    let server_hellos = tshark("tls.handshake.type == 2");
    // TLS 1.3 records carry their real type inside the encryption: outside, application data.
    let app_data = tshark("tls.record.opaque_type == 23");
    assert!(hellos >= 1, "no TLS ClientHello on port 7800");
    assert!(server_hellos >= 1, "no TLS ServerHello on port 7800");
    assert!(
        app_data >= 4,
        "{app_data} TLS application data records on port 7800"
    );
    // What plain HTTP would show: requests, JSON field names, pod CIDRs.
    let raw = std::fs::read(&pcap).expect("pcap");
    for needle in ["HTTP/1.1", "pod_cidr", "underlay_ip", "10.244."] {
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle:?} readable on the underlay"
        );
    }
    let log = tb.log("control");
    assert!(log.contains("serving (mTLS)"), "{log}");
    let metrics = curl(&tb, 1, &{
        let mut a = cert_args(&tb.pki(), "operator-admin");
        a.push(url(&tb, "/metrics"));
        a
    });
    assert!(
        metrics.stdout.contains("podnet_control_insecure 0"),
        "{}",
        metrics.combined()
    );
}

#[test]
fn a_node_speaks_only_for_itself_and_bad_clients_are_refused_clearly() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["curl"]);
    let mut tb = mtls_testbed("tlsauthz");
    let pki = tb.pki();
    let list = |tb: &Testbed| {
        let mut a = cert_args(&pki, "node-h3");
        a.push(url(tb, "/v1/nodes"));
        let out = curl(tb, 3, &a);
        assert!(out.success(), "a node may read: {}", out.combined());
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
        v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_string(),
                    n["pod_cidr"].as_str().unwrap().to_string(),
                    n["underlay_ip"].as_str().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = list(&tb);
    assert_eq!(before.len(), 3, "{before:?}");

    // h3's certificate against h2's record: register (PUT), renew (PUT again) and delete.
    let h3 = underlay_ip(3).to_string();
    let body =
        format!(r#"{{"underlay_ip":"{h3}","encap":"vxlan","vtep_mac":"02:00:c6:12:00:03"}}"#);
    for (method, data) in [
        ("PUT", Some(body.as_str())),
        ("PUT", Some(body.as_str())),
        ("DELETE", None),
    ] {
        let mut a = cert_args(&pki, "node-h3");
        a.extend([
            "-X".into(),
            method.into(),
            "-w".into(),
            "\n%{http_code}".into(),
        ]);
        if let Some(d) = data {
            a.extend([
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                d.into(),
            ]);
        }
        a.push(url(&tb, "/v1/nodes/h2"));
        let (status, body) = status_and_body(&curl(&tb, 3, &a));
        assert_eq!(status, 403, "{method} h2 as h3: {body}");
        assert!(
            body.contains("node h3") && body.contains(r#"node \"h2\""#),
            "the refusal names both: {body}"
        );
    }
    assert_eq!(list(&tb), before, "h2's record changed");
    ping_all(&tb);

    // The operator may write any node: here it deletes nothing, but reads everything with the
    // CLI.
    let bin = podnet_bin("podnet-control");
    let ca = pki.join("ca.pem");
    let key = pki.join("operator-admin-key.pem");
    let out = operator_nodes(&tb, &tb.control_url());
    assert!(out.success(), "{}", out.combined());
    for n in ["h1", "h2", "h3"] {
        assert!(out.stdout.contains(n), "{}", out.stdout);
    }

    // A service whose certificate lacks the dialled address (the same server.pem, listening on
    // h2's address): the client names the mismatch and the fix. And a key others may read is
    // used, with a warning.
    let alt = format!("{}:7901", underlay_ip(2));
    let ns2 = tb.host(2).ns.clone();
    let alt_state = tb.path("alt-state.json");
    tb.start(
        "alt",
        &ns2,
        &[
            bin.to_str().unwrap(),
            "serve",
            "--listen",
            &alt,
            "--state",
            alt_state.to_str().unwrap(),
            "--tls-cert",
            pki.join("server.pem").to_str().unwrap(),
            "--tls-key",
            pki.join("server-key.pem").to_str().unwrap(),
            "--client-ca",
            ca.to_str().unwrap(),
        ],
    );
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let out = wait_for("the second service", Duration::from_secs(20), || {
        let out = operator_nodes(&tb, &format!("https://{alt}"));
        if out.stderr.contains("not valid for name") {
            Ok(out)
        } else {
            Err(out.combined())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.success());
    assert!(out.stderr.contains("--server --ip ADDR"), "{}", out.stderr);
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    tb.stop("alt");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");

    // No certificate: the handshake completes and HTTP says what is missing.
    let mut a = vec!["--cacert".to_string(), ca.to_str().unwrap().to_string()];
    a.extend(["-w".into(), "\n%{http_code}".into(), url(&tb, "/v1/nodes")]);
    let (status, body) = status_and_body(&curl(&tb, 3, &a));
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("no client certificate") && body.contains("--tls-cert"),
        "{body}"
    );

    // Another CA's certificate: refused in the handshake, and the service log says why.
    let other = tb.path("other-pki");
    let other_s = other.to_str().unwrap();
    tb.ca(&["init", "--dir", other_s]);
    tb.ca(&["issue", "--dir", other_s, "--node", "h3"]);
    let mut a = cert_args(&other, "node-h3");
    a[1] = ca.to_str().unwrap().to_string();
    a.push(url(&tb, "/v1/nodes"));
    let out = curl(&tb, 3, &a);
    assert!(
        !out.success(),
        "a foreign certificate was accepted: {}",
        out.stdout
    );
    assert!(
        out.stderr.to_lowercase().contains("alert"),
        "{}",
        out.stderr
    );

    // An expired certificate of the right CA (0 days: it ended when it was made).
    tb.ca(&[
        "issue",
        "--dir",
        pki.to_str().unwrap(),
        "--node",
        "stale",
        "--days",
        "0",
    ]);
    std::thread::sleep(Duration::from_millis(1100));
    let mut a = cert_args(&pki, "node-stale");
    a.push(url(&tb, "/v1/nodes"));
    let out = curl(&tb, 3, &a);
    assert!(
        !out.success(),
        "an expired certificate was accepted: {}",
        out.stdout
    );

    // Plain HTTP on the TLS port.
    let plain = format!("http://{}:7800/v1/nodes", underlay_ip(1));
    let (status, body) = status_and_body(&curl(
        &tb,
        3,
        &["-w".into(), "\n%{http_code}".into(), plain],
    ));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("tls_required") && body.contains("https://"),
        "{body}"
    );

    let log = wait_for(
        "the refusals in the service log",
        Duration::from_secs(5),
        || {
            let log = tb.log("control");
            if log.contains("not signed by the CA") && log.contains("expired") {
                Ok(log)
            } else {
                Err(log)
            }
        },
    )
    .unwrap_or_else(|log| panic!("service log lacks the reasons:\n{log}"));
    assert!(log.contains("request refused"), "{log}");

    // Still serving everyone else.
    assert_eq!(list(&tb), before);
    ping_all(&tb);

    // serve without TLS flags and without --insecure does not start.
    let state = tb.path("other-state.json");
    let out = run(
        Some(&tb.host(2).ns),
        &[
            bin.to_str().unwrap(),
            "serve",
            "--listen",
            &format!("{}:7900", underlay_ip(2)),
            "--state",
            state.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    )
    .expect("serve");
    assert!(!out.success());
    assert!(
        out.stderr.contains("--tls-cert") && out.stderr.contains("--insecure"),
        "{}",
        out.stderr
    );
    assert!(!state.exists(), "a refused serve wrote state");

    // With --insecure it starts, warns, and says so in its metrics.
    let listen = format!("{}:7900", underlay_ip(2));
    let ns = tb.host(2).ns.clone();
    tb.start(
        "insecure",
        &ns,
        &[
            bin.to_str().unwrap(),
            "serve",
            "--insecure",
            "--listen",
            &listen,
            "--state",
            state.to_str().unwrap(),
        ],
    );
    let metrics = wait_for("the --insecure service", Duration::from_secs(20), || {
        let out = curl(&tb, 2, &[format!("http://{listen}/metrics")]);
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(out.combined())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        metrics.contains("\npodnet_control_insecure 1\n"),
        "{metrics}"
    );
    let log = tb.log("insecure");
    assert!(
        log.contains("WARN") && log.contains("plain HTTP (--insecure)"),
        "{log}"
    );
    tb.stop("insecure");
}

#[test]
fn an_agent_uses_a_replaced_certificate_at_its_next_reconnect() {
    if !e2e_ready() {
        return;
    }
    let mut tb = mtls_testbed("tlsrotate");
    let pki = tb.pki();
    let dir = pki.to_str().unwrap().to_string();
    let pid = tb.proc("agent-h2").pid();
    let connected = |tb: &Testbed| {
        podnet_tests::parse::metric_sum(&tb.metrics(2), "podnet_agent_control_connected", &[])
    };
    assert_eq!(connected(&tb), Ok(1.0));

    // h2's certificate is replaced by one that has already expired, and the service restarts:
    // the agent's reconnect presents the new file, which the service refuses.
    tb.ca(&["issue", "--dir", &dir, "--node", "h2", "--days", "0"]);
    std::thread::sleep(Duration::from_millis(1100));
    tb.stop("control");
    tb.start_control(&[]);
    wait_for(
        "h2 refused with its expired certificate",
        Duration::from_secs(30),
        || {
            let log = tb.log("agent-h2");
            if log.contains("client certificate reloaded") && tb.log("control").contains("expired")
            {
                Ok(())
            } else {
                Err(format!("agent:\n{log}\ncontrol:\n{}", tb.log("control")))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(connected(&tb), Ok(0.0));
    ping_all(&tb);

    // A valid certificate on disk again: the agent is back on its own, same process.
    tb.ca(&["issue", "--dir", &dir, "--node", "h2"]);
    wait_for(
        "h2 reconnected",
        Duration::from_secs(30),
        || match connected(&tb) {
            Ok(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("h2 did not reconnect: {e}\n{}", tb.log("agent-h2")));
    assert_eq!(tb.proc("agent-h2").pid(), pid, "the agent restarted");
    let reloads = tb
        .log("agent-h2")
        .matches("client certificate reloaded")
        .count();
    assert!(reloads >= 2, "{reloads} reloads");
    ping_all(&tb);
}
