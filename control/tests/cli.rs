//! The `podnet-control` binary: `nodes` output, token handling, SIGTERM, and a state file that
//! survives SIGKILL at any moment. Servers listen on 127.0.0.1 port 0 and are killed by PID.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podnet_control::api::{Encap, RegisterRequest};
use podnet_control::{Client, FileStore, Store};

const BIN: &str = env!("CARGO_BIN_EXE_podnet-control");

/// A running `podnet-control serve`, killed when dropped.
struct Serve {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Serve {
    fn start(state: &Path, extra: &[&str]) -> Serve {
        Serve::spawn(Command::new(BIN), state, extra)
    }

    /// Starts `serve` through `launcher`, a command that runs the binary with the arguments
    /// appended to it (e.g. a shell that first lowers a limit, then `exec`s).
    fn spawn(mut launcher: Command, state: &Path, extra: &[&str]) -> Serve {
        let mut child = launcher
            .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--state"])
            .arg(state)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("listen="))
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(addr);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start: {}", log.lock().unwrap());
            }
        };
        Serve { child, addr, log }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn req(i: u32) -> RegisterRequest {
    RegisterRequest {
        wireguard_public_key: None,
        underlay_ip: format!("198.18.{}.{}", i / 250, 1 + i % 250)
            .parse()
            .unwrap(),
        encap: Encap::Vxlan,
        vtep_mac: None,
    }
}

fn nodes_cmd(url: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["nodes", "--server", url];
    args.extend(extra);
    cli(&args)
}

/// Runs `podnet-control ARGS` to its end (at most 15 s).
fn cli(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`podnet-control {}` hung", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_prints_a_table_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let token_arg = token.to_str().unwrap().to_string();
    let mut serve = Serve::start(
        &dir.path().join("state.json"),
        &["--token-file", &token_arg],
    );
    let client = Client::new(&serve.url(), Some("t0ken".into())).unwrap();
    for (i, name) in ["h1", "h2", "h3"].into_iter().enumerate() {
        client.register(name, &req(i as u32)).await.unwrap();
    }
    // An open watch must not hold up shutdown.
    let mut watch = client.watch_stream(Some(0)).await.unwrap();
    assert_eq!(watch.next_event().await.unwrap().unwrap().node.name, "h1");

    let url = serve.url();
    let out = tokio::task::spawn_blocking(move || nodes_cmd(&url, &["--token-file", &token_arg]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("LAST HEARTBEAT"),
        "{text}"
    );
    for (line, (name, cidr, ip)) in lines[1..].iter().zip([
        ("h1", "10.244.1.0/24", "198.18.0.1"),
        ("h2", "10.244.2.0/24", "198.18.0.2"),
        ("h3", "10.244.3.0/24", "198.18.0.3"),
    ]) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[..5], [name, ip, cidr, "vxlan", "up"], "{text}");
    }

    // Without the token: a clear 401 and a failing exit status.
    let url = serve.url();
    let out = tokio::task::spawn_blocking(move || nodes_cmd(&url, &[]))
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("token"), "{err}");

    // SIGTERM: exits 0 promptly, ending the watch stream.
    let pid = serve.child.id();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit after SIGTERM: {}",
            serve.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", serve.log.lock().unwrap());
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = watch.next_event().await {}
    })
    .await;
    assert!(rest.is_ok(), "watch stream ended with the server");
}

/// Runs `serve` on `state`, expecting it to refuse to start; returns its stderr.
fn serve_refused(state: &Path) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--state"])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "serve started on {}",
        state.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unusable_state_file_stops_startup_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(&state, "garbage").unwrap();
    let err = serve_refused(&state);
    assert!(
        err.contains("corrupt") && err.contains("state.json"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "garbage");
}

/// Two services on one state file would each hand out pod CIDRs from their own copy: the
/// second stops at start with a message naming the first, which keeps serving; a holder killed
/// with SIGKILL leaves no stale lock behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_service_on_the_same_state_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let mut first = Serve::start(&state, &[]);
    let client = Client::new(&first.url(), None).unwrap();
    client.register("n1", &req(1)).await.unwrap();

    let err = serve_refused(&state);
    let pid = first.child.id().to_string();
    assert!(
        err.contains("in use by another podnet-control") && err.contains(&pid),
        "{err}"
    );
    // The first one never noticed.
    assert_eq!(client.register("n2", &req(2)).await.unwrap().node, "n2");
    assert_eq!(client.list().await.unwrap().nodes.len(), 2);

    first.sigkill();
    let second = Serve::start(&state, &[]);
    let client = Client::new(&second.url(), None).unwrap();
    assert_eq!(client.list().await.unwrap().nodes.len(), 2, "state kept");
}

/// SIGKILL the service at arbitrary moments while registrations stream in: the state file and
/// its log always load and hold every acknowledged registration, and a restart hands each node the
/// pod CIDR it was acknowledged with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_sigkill_at_any_moment() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let args = [
        "--cluster-cidr",
        "10.244.0.0/16",
        "--node-prefix",
        "28",
        "--lease-ttl",
        "1h",
    ];
    let acked: Arc<Mutex<Vec<(String, u32, ipnet::Ipv4Net)>>> = Arc::default();
    let mut next = 0u32;
    for round in 0..5u64 {
        let mut serve = Serve::start(&state, &args);
        let client = Client::new(&serve.url(), None).unwrap();
        let writer = tokio::spawn({
            let acked = acked.clone();
            let first = next;
            async move {
                for i in first.. {
                    let name = format!("n{i}");
                    match client.register(&name, &req(i)).await {
                        Ok(resp) => acked.lock().unwrap().push((name, i, resp.pod_cidr)),
                        Err(_) => return,
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(40 + round * 70)).await;
        serve.sigkill();
        let _ = tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("writer stops");
        next = acked.lock().unwrap().last().map_or(next, |a| a.1 + 1) + 1;

        let saved = FileStore::new(&state)
            .load()
            .expect("state file intact")
            .expect("state saved");
        let acked = acked.lock().unwrap();
        for (name, _, cidr) in acked.iter() {
            let node = saved.nodes.iter().find(|n| &n.name == name);
            assert_eq!(
                node.map(|n| n.pod_cidr),
                Some(*cidr),
                "acknowledged {name} lost in round {round}"
            );
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 5,
        "only {} registrations in five rounds",
        acked.len()
    );
    eprintln!(
        "{} registrations acknowledged across five SIGKILLs",
        acked.len()
    );
    let serve = Serve::start(&state, &args);
    // A kill between write and rename may leave a temp file; loading removes it. The lock
    // file stays (it is only ever locked by a live process).
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["state.json", "state.json.lock", "state.json.log"]);
    let client = Client::new(&serve.url(), None).unwrap();
    for (name, i, cidr) in acked {
        assert_eq!(
            client.register(&name, &req(i)).await.unwrap().pod_cidr,
            cidr,
            "{name}"
        );
    }
}

/// `--max-watchers` caps open watch streams (every agent keeps one): the next is refused with
/// 503 and the operator's log names the flag; bad values are refused before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_watchers_caps_watch_streams_and_says_which_flag_to_raise() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("state.json"), &["--max-watchers", "2"]);
    let client = Client::new(&serve.url(), None).unwrap();
    client.register("h1", &req(1)).await.unwrap();
    let first = client.watch_stream(None).await.unwrap();
    let second = client.watch_stream(None).await.unwrap();
    let err = client
        .watch_stream(None)
        .await
        .err()
        .expect("third watch refused");
    let text = err.to_string();
    assert!(
        text.contains("503") && text.contains("watch streams are open"),
        "{text}"
    );
    // Plain lists still work at the limit, and a closed watch frees its slot.
    assert_eq!(client.list().await.unwrap().nodes.len(), 1);
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let third = loop {
        match client.watch_stream(None).await {
            Ok(w) => break w,
            Err(e) => assert!(Instant::now() < deadline, "slot never freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop((second, third));
    let log = serve.log.lock().unwrap().clone();
    assert!(
        log.contains("--max-watchers") && log.contains("limit=2"),
        "{log}"
    );

    for bad in [
        &["--max-watchers", "0"][..],
        &["--max-connections", "many"],
        &["--max-connections", "1000001"],
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--state"])
            .arg(dir.path().join("never.json"))
            .args(bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            err.contains(bad[0]) && err.contains(bad[1]),
            "{bad:?}: {err}"
        );
    }
    assert!(
        !dir.path().join("never.json").exists(),
        "refused before touching the state"
    );
}

/// A soft open-file limit below `--max-connections` (1024 is a common default) would make
/// `accept` fail long before the connection limit answers: `serve` raises it at start.
#[test]
fn serve_raises_the_open_file_limit_to_fit_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut shell = Command::new("sh");
    shell.args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\"", BIN]);
    let serve = Serve::spawn(
        shell,
        &dir.path().join("state.json"),
        &["--max-connections", "1000"],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", serve.child.id())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no open-file limit in {limits}"));
    assert_eq!(soft, 1000 + 64, "{limits}");
    let log = serve.log.lock().unwrap().clone();
    assert!(
        log.contains("raised the open-file limit") && log.contains("from=256"),
        "{log}"
    );
}

/// `policy apply|list|delete`, `pods`, `pod label` and `namespace label` against a service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_commands_apply_list_label_and_refuse_bad_files_whole() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("state.json"), &[]);
    let url = serve.url();
    let client = Client::new(&url, None).unwrap();
    let pod: podnet_proto::policy::PodRecord = serde_json::from_value(serde_json::json!({
        "namespace": "x", "name": "a", "node": "h1", "ips": ["10.244.1.2"],
        "labels": {"pod": "a"}, "container_id": "c1"}))
    .unwrap();
    client.put_pod(&pod).await.unwrap();

    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress, Egress]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: all, namespace: y}\nspec: {}\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: NetworkPolicy\nmetadata: {name: ok, namespace: z}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: bad, namespace: z}\n\
         spec: {ingress: [{ports: [{protocol: ICMP}]}]}\n",
    )
    .unwrap();
    let (good, bad) = (
        good.to_str().unwrap().to_string(),
        bad.to_str().unwrap().to_string(),
    );
    // The service is another process, so blocking this test's thread on the CLI is fine.
    let call = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["--server", url.as_str()]);
        let out = cli(&args);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, out, err) = call(&["policy", "apply", "-f", &bad]);
    assert!(!ok, "{out}");
    assert!(
        err.contains(
            "document 2: z/bad: spec.ingress[0].ports[0].protocol: unsupported protocol \"ICMP\""
        ) && err.contains("nothing applied"),
        "{err}"
    );
    let (ok, out, err) = call(&["policy", "apply", "-f", &good]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "networkpolicy x/deny created\nnetworkpolicy y/all created\n"
    );
    let (ok, out, _) = call(&["policy", "list"]);
    assert!(ok);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["NAMESPACE", "NAME", "POD-SELECTOR", "ISOLATES"],
            vec!["x", "deny", "pod=a", "ingress,egress"],
            vec!["y", "all", "<all>", "ingress"],
        ],
        "{out}"
    );
    let (ok, out, err) = call(&["pod", "label", "x/a", "app=web", "pod-"]);
    assert!(ok && out == "pod x/a changed\n", "{out}{err}");
    let (ok, out, _) = call(&["pods"]);
    assert!(ok);
    assert_eq!(
        out.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["x", "a", "h1", "10.244.1.2", "app=web"],
        "{out}"
    );
    let (ok, out, err) = call(&["namespace", "label", "y", "team=ops"]);
    assert!(ok && out == "namespace y changed\n", "{out}{err}");
    let (ok, _, err) = call(&["pod", "label", "a", "x=y"]);
    assert!(!ok && err.contains("NAMESPACE/NAME"), "{err}");
    let (ok, _, err) = call(&["pod", "label", "x/a", "justakey"]);
    assert!(!ok && err.contains("key=value"), "{err}");
    let (ok, out, _) = call(&["policy", "delete", "y/all"]);
    assert!(ok && out == "networkpolicy y/all deleted\n", "{out}");
    let (ok, _, err) = call(&["policy", "delete", "y/all"]);
    assert!(
        !ok && err.contains("404") && err.contains("no policy y/all"),
        "{err}"
    );
    let state = client.policy(None).await.unwrap();
    assert_eq!(state.policies.keys().collect::<Vec<_>>(), ["x/deny"]);
    assert_eq!(state.namespaces["y"]["team"], "ops");
}

/// `ca issue` makes etcd's certificates from the cluster CA (a member one for the addresses
/// given, usable by both ends of etcd's peer connections; a client one per replica), and
/// `serve --store etcd` refuses TLS flags that do not fit its endpoints before dialling.
#[test]
fn ca_issues_etcd_certificates_and_serve_checks_the_etcd_tls_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let ok = |args: &[&str]| {
        let out = cli(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let refused = |args: &[&str]| {
        let out = cli(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    ok(&["ca", "init", "--dir", d]);
    let server = ok(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--etcd-server",
        "--ip",
        "198.18.0.201",
    ]);
    assert!(server.contains("etcd-server.pem"), "{server}");
    let client = ok(&["ca", "issue", "--dir", d, "--etcd-client", "r1"]);
    assert!(client.contains("etcd-client-r1.pem"), "{client}");
    let pem = std::fs::read(dir.path().join("etcd-server.pem")).unwrap();
    let der = first_cert_der(&pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth, "{eku:?}");
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert!(format!("{san:?}").contains("[198, 18, 0, 201]"), "{san:?}");

    let e = refused(&["ca", "issue", "--dir", d, "--etcd-server"]);
    assert!(e.contains("--ip or --dns"), "{e}");
    let e = refused(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--etcd-client",
        "r2",
        "--ip",
        "198.18.0.9",
    ]);
    assert!(e.contains("--ip and --dns name a server"), "{e}");
    let e = refused(&["ca", "issue", "--dir", d, "--etcd-client", "bad name"]);
    assert!(e.contains("--etcd-client \"bad name\""), "{e}");

    let ca = format!("{d}/ca.pem");
    let serve = |endpoints: &str, tls: &[&str]| {
        let mut args = vec![
            "serve",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "etcd",
            "--etcd-endpoints",
            endpoints,
        ];
        args.extend_from_slice(tls);
        refused(&args)
    };
    let e = serve("https://127.0.0.1:1", &[]);
    assert!(e.contains("https:// endpoints need --etcd-ca"), "{e}");
    let e = serve("http://127.0.0.1:1", &["--etcd-ca", &ca]);
    assert!(e.contains("but these are plain http://"), "{e}");
    let e = serve(
        "http://127.0.0.1:1,https://127.0.0.1:2",
        &["--etcd-ca", &ca],
    );
    assert!(e.contains("mixes http:// and https://"), "{e}");
    let e = serve(
        "https://127.0.0.1:1",
        &["--etcd-ca", &format!("{d}/missing.pem")],
    );
    assert!(e.contains("--etcd-ca") && e.contains("missing.pem"), "{e}");
    let e = serve(
        "https://127.0.0.1:1",
        &["--etcd-ca", &ca, "--etcd-cert", &ca],
    );
    assert!(e.contains("--etcd-key"), "{e}");
}

/// The DER of the first certificate in a PEM file.
fn first_cert_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem)
        .unwrap()
        .to_vec()
}
