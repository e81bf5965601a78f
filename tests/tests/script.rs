//! `scripts/testbed`, the README's main command: up, exec, status and down, on the kernel VXLAN
//! baseline and on podnet (control service and static peers); how `scripts/bench-iperf`
//! handles its flags; `scripts/ping-hops` on a real testbed; `scripts/bench-cni` on real pods.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use podnet_tests::{e2e_ready, podnet_bin, wait_for, workers_override};

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// One `scripts/testbed` prefix with its own run dir; `down` on drop, also after a failure.
struct Script {
    prefix: String,
    run_dir: PathBuf,
    /// PATH for the script, when not this process's.
    path: Option<PathBuf>,
}

impl Script {
    fn new(tag: &str) -> Script {
        let prefix = format!("pn-e2e-{tag}-{}", std::process::id());
        Script {
            run_dir: std::env::temp_dir().join(format!("podnet-e2e-{prefix}")),
            prefix,
            path: None,
        }
    }

    /// The script (and all it starts) sees only the commands `scripts/packages` lists for
    /// `features`: a command used but not listed fails it.
    fn with_listed_commands_only(mut self, features: &[&str]) -> Script {
        let dir = self.run_dir.with_extension("path");
        self.path = Some(podnet_tests::packages::listed_only_path(features, &dir));
        self
    }

    fn call(&self, args: &[&str]) -> (Output, String) {
        let bin_dir = podnet_bin("podnet-agent").parent().unwrap().to_owned();
        let mut env = vec![
            ("PODNET_RUN_DIR", &*self.run_dir),
            ("PODNET_BIN_DIR", &*bin_dir),
        ];
        if let Some(path) = &self.path {
            env.push(("PATH", path));
        }
        run_script("testbed", args, &env)
    }

    fn up(&self, args: &[&str]) -> String {
        let mut all = vec!["up", "--prefix", &self.prefix];
        all.extend_from_slice(args);
        // The agents run PODNET_TEST_WORKERS workers, as in every other suite, unless the test
        // picks its own.
        let workers = workers_override().map(|w| w.to_string());
        if let Some(w) = workers.as_deref().filter(|_| !args.contains(&"--workers")) {
            all.extend(["--workers", w]);
        }
        let (out, text) = self.call(&all);
        assert!(out.status.success(), "{text}");
        text
    }

    fn exec(&self, ns: &str, cmd: &[&str]) -> (Output, String) {
        let mut all = vec!["exec", "--prefix", &self.prefix, ns];
        all.extend_from_slice(cmd);
        self.call(&all)
    }

    fn down(&self) {
        let (out, text) = self.call(&["down", "--prefix", &self.prefix]);
        assert!(out.status.success(), "{text}");
    }

    fn ns(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = Command::new(script_path("testbed"))
            .args(["down", "--prefix", &self.prefix])
            .env("PODNET_RUN_DIR", &self.run_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        if let Some(path) = &self.path {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

#[test]
fn testbed_script_brings_kernel_vxlan_up_and_down() {
    if !e2e_ready() {
        return;
    }
    let s = Script::new("sckvx");
    let text = s.up(&[
        "--hosts",
        "2",
        "--pods-per-host",
        "2",
        "--encap",
        "kernel-vxlan",
    ]);
    assert!(text.contains("is up: 2 hosts x 2 pods"), "{text}");
    for ns in ["ul", "h1", "h2", "h1-p1", "h1-p2", "h2-p1", "h2-p2"] {
        assert!(netns_exists(&s.ns(ns)), "{ns} missing: {text}");
    }
    let (ping, text) = s.exec("h2-p2", &["ping", "-c1", "-W2", "10.244.1.2"]);
    assert!(ping.status.success(), "{text}");
    s.down();
    for ns in ["ul", "h1", "h2", "h1-p1", "h2-p2"] {
        assert!(!netns_exists(&s.ns(ns)), "{ns} left behind");
    }
}

#[test]
fn testbed_script_runs_podnet_with_the_control_service() {
    if !e2e_ready() {
        return;
    }
    // Only what scripts/packages lists for the testbed is on its PATH (and its agents'): the
    // list is complete for the README's first command.
    let s = Script::new("scctl").with_listed_commands_only(&["testbed"]);
    let text = s.up(&["--hosts", "3", "--pods-per-host", "1"]);
    assert!(text.contains("encapsulation vxlan"), "{text}");
    let (status, text) = s.call(&["status", "--prefix", &s.prefix]);
    assert!(status.status.success(), "{text}");
    for name in ["control", "agent-h1", "agent-h2", "agent-h3"] {
        assert!(text.contains(&format!("{name}: running")), "{text}");
    }
    // status shows each agent's own report, with its peers.
    assert!(text.contains("198.18.0.3"), "{text}");
    let (ping, text) = s.exec("h3-p1", &["ping", "-c2", "-W2", "10.244.1.2"]);
    assert!(ping.status.success(), "{text}");
    s.down();
    assert!(!netns_exists(&s.ns("h1")));
    assert!(!s.run_dir.join(&s.prefix).exists(), "run dir left behind");
}

#[test]
fn testbed_script_runs_wireguard_through_the_control_service_and_with_static_peers() {
    if !e2e_ready() {
        return;
    }
    for (tag, extra) in [("scwgc", None), ("scwgs", Some("--static"))] {
        let s = Script::new(tag);
        let mut args = vec![
            "--hosts",
            "2",
            "--pods-per-host",
            "1",
            "--encap",
            "wireguard",
        ];
        args.extend(extra);
        let text = s.up(&args);
        assert!(text.contains("encapsulation wireguard"), "{text}");
        let (ping, text) = s.exec("h2-p1", &["ping", "-c2", "-W2", "10.244.1.2"]);
        assert!(ping.status.success(), "{text}");
        // Each agent shows its key, and a completed handshake with the other.
        let (status, text) = s.call(&["status", "--prefix", &s.prefix]);
        assert!(status.status.success(), "{text}");
        assert_eq!(
            text.matches("wireguard:   public key ").count(),
            2,
            "{text}"
        );
        assert!(text.matches("s ago").count() >= 2, "{text}");
        let (link, text) = s.exec("h1", &["ip", "link", "show", "tunl0"]);
        assert!(link.status.success() && text.contains("mtu 1440"), "{text}");
        s.down();
    }
}

#[test]
fn testbed_script_runs_podnet_ipip_with_static_peers() {
    if !e2e_ready() {
        return;
    }
    let s = Script::new("scipip");
    let text = s.up(&[
        "--hosts",
        "2",
        "--pods-per-host",
        "1",
        "--encap",
        "ipip",
        "--static",
        "--workers",
        "2",
    ]);
    assert!(text.contains("encapsulation ipip (static peers)"), "{text}");
    let (ping, text) = s.exec("h1-p1", &["ping", "-c2", "-W2", "10.244.2.2"]);
    assert!(ping.status.success(), "{text}");
    // --workers reaches every agent.
    let (status, text) = s.call(&["status", "--prefix", &s.prefix]);
    assert!(status.status.success(), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.trim_start().starts_with("workers:")
                && l.contains(" 2 data-path threads"))
            .count(),
        2,
        "{text}"
    );
    let (link, text) = s.exec("h1", &["ip", "link", "show", "tunl0"]);
    assert!(link.status.success() && text.contains("mtu 1480"), "{text}");
}

#[test]
fn testbed_script_runs_a_cluster_of_mixed_encapsulations() {
    if !e2e_ready() {
        return;
    }
    let s = Script::new("scmix");
    // A bad list is refused before anything is made.
    let (out, text) = s.call(&["up", "--prefix", &s.prefix, "--encap-per-host", "ipip,gre"]);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("'gre' is not ipip, vxlan or none"), "{text}");
    assert!(!netns_exists(&s.ns("ul")), "{text}");
    let text = s.up(&[
        "--hosts",
        "2",
        "--pods-per-host",
        "1",
        "--encap-per-host",
        "ipip,vxlan",
        "--static",
    ]);
    assert!(text.contains("(per host: ipip,vxlan)"), "{text}");
    for (from, to) in [("h1-p1", "10.244.2.2"), ("h2-p1", "10.244.1.2")] {
        let (ping, text) = s.exec(from, &["ping", "-c2", "-W2", to]);
        assert!(ping.status.success(), "{from} -> {to}: {text}");
    }
    for (host, mtu) in [("h1", "mtu 1480"), ("h2", "mtu 1450")] {
        let (link, text) = s.exec(host, &["ip", "link", "show", "tunl0"]);
        assert!(
            link.status.success() && text.contains(mtu),
            "{host}: {text}"
        );
    }
}

#[test]
fn testbed_script_runs_routing_modes_on_two_subnets() {
    if !e2e_ready() {
        return;
    }
    // podnet --encap none: direct routes on one subnet.
    let s = Script::new("scnone");
    let text = s.up(&["--hosts", "2", "--pods-per-host", "1", "--encap", "none"]);
    assert!(text.contains("encapsulation none"), "{text}");
    let (route, text) = s.exec("h1", &["ip", "route"]);
    assert!(
        route.status.success() && text.contains("via 198.18.0.2 dev eth0 proto 222"),
        "{text}"
    );
    s.down();
    // VXLAN with --cross-subnet on two subnets: host 3 is on 198.18.1.0/24.
    let s = Script::new("scxsub");
    let text = s.up(&[
        "--hosts",
        "3",
        "--pods-per-host",
        "1",
        "--subnets",
        "2",
        "--cross-subnet",
    ]);
    assert!(
        text.contains("(cross-subnet) on 2 underlay subnets"),
        "{text}"
    );
    let (addr, text) = s.exec("h3", &["ip", "-4", "addr", "show", "eth0"]);
    assert!(
        addr.status.success() && text.contains("198.18.1.3/24"),
        "{text}"
    );
    // `up` waited for every pod to reach every pod, which the tunnel alone can carry; the
    // direct route to the same-subnet peer follows its peer within 2 s (routing_modes.rs).
    let direct = wait_for("h1's direct route to h2", Duration::from_secs(5), || {
        let (route, text) = s.exec("h1", &["ip", "route"]);
        match text.matches("proto 222").count() {
            1 if route.status.success() => Ok(text),
            _ => Err(text),
        }
    });
    assert!(direct.is_ok(), "only h2 is on h1's subnet: {direct:?}");
    // A bad combination is refused before anything is made.
    let bad = Script::new("scbad");
    let (out, text) = bad.call(&[
        "up",
        "--prefix",
        &bad.prefix,
        "--encap",
        "plain",
        "--cross-subnet",
    ]);
    assert!(
        !out.status.success() && text.contains("--cross-subnet goes with"),
        "{text}"
    );
    let (out, text) = bad.call(&["up", "--prefix", &bad.prefix, "--workers", "9"]);
    assert!(
        !out.status.success() && text.contains("--workers must be 1..8"),
        "{text}"
    );
    assert!(!netns_exists(&bad.ns("ul")));
}

/// `up --ha`: 3 etcd members and 2 replicas, mTLS (the server certificate names both replica
/// addresses), every agent given both URLs; the pods reach each other, and `down` removes it
/// all.
#[test]
fn testbed_script_runs_the_ha_control_plane() {
    if !e2e_ready() {
        return;
    }
    let s = Script::new("scha");
    let text = s.up(&["--ha", "--hosts", "2", "--pods-per-host", "1"]);
    assert!(
        text.contains("HA control: 2 replicas over 3 etcd members, mTLS"),
        "{text}"
    );
    let (status, text) = s.call(&["status", "--prefix", &s.prefix]);
    assert!(status.status.success(), "{text}");
    for name in [
        "etcd1", "etcd2", "etcd3", "control1", "control2", "agent-h1", "agent-h2",
    ] {
        assert!(text.contains(&format!("{name}: running")), "{text}");
    }
    let (health, text) = s.exec(
        "h1",
        &[
            "curl",
            "-sS",
            "--cacert",
            &format!("{}/{}/pki/ca.pem", s.run_dir.display(), s.prefix),
            "https://198.18.0.212:7800/healthz",
        ],
    );
    assert!(health.status.success() && text.contains("ok"), "{text}");
    for ns in ["etcd1", "etcd2", "etcd3", "c1", "c2"] {
        assert!(netns_exists(&s.ns(ns)), "{ns} missing");
    }
    // etcd takes only clients with a certificate of the cluster CA; the replicas' records are
    // there for one that has it.
    let pki = format!("{}/{}/pki", s.run_dir.display(), s.prefix);
    let etcdctl = |client: bool| {
        let mut argv = vec![
            "etcdctl".to_string(),
            "--endpoints".into(),
            "https://198.18.0.201:2379".into(),
            "--cacert".into(),
            format!("{pki}/ca.pem"),
        ];
        if client {
            argv.extend([
                "--cert".into(),
                format!("{pki}/etcd-client-etcdctl.pem"),
                "--key".into(),
                format!("{pki}/etcd-client-etcdctl-key.pem"),
            ]);
        }
        argv.extend([
            "get".into(),
            "/podnet/nodes/".into(),
            "--prefix".into(),
            "--keys-only".into(),
        ]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        s.exec("etcd1", &argv)
    };
    let (out, text) = etcdctl(true);
    assert!(
        out.status.success() && text.contains("/podnet/nodes/h2"),
        "{text}"
    );
    let (out, text) = etcdctl(false);
    assert!(
        !out.status.success(),
        "etcd served a client without a certificate: {text}"
    );
    // `up` waited for the full mesh; the pods file says where each pod is.
    let pods = std::fs::read_to_string(s.run_dir.join(&s.prefix).join("pods")).unwrap();
    let to = pods
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap();
    let (ping, text) = s.exec("h1-p1", &["ping", "-c2", "-W2", to]);
    assert!(ping.status.success(), "{text}");
    s.down();
    for ns in ["etcd1", "c1", "c2", "h1", "ul"] {
        assert!(!netns_exists(&s.ns(ns)), "{ns} left behind");
    }
}

/// `scripts/bench-control` explains itself and refuses bad flags before touching anything
/// (the benchmark itself is run by hand; see bench/RESULTS.md).
#[test]
fn bench_control_explains_itself_and_refuses_bad_flags() {
    let run = |args: &[&str]| script_ok("bench-control", args, &[]);
    let (ok, help) = run(&["--help"]);
    assert!(ok && help.starts_with("Control-plane benchmark"), "{help}");
    assert!(help.contains("fan-out latency"), "{help}");
    let (ok, text) = run(&["--nodes", "0"]);
    assert!(!ok && text.contains("--nodes must be 1..10000"), "{text}");
    let (ok, text) = run(&["--configs", "file,etcd-5"]);
    assert!(
        !ok && text.contains("unknown configuration 'etcd-5'"),
        "{text}"
    );
    let (ok, text) = run(&["--fast"]);
    assert!(!ok && text.contains("unknown option '--fast'"), "{text}");
}

/// `scripts/bench-policy` explains itself and refuses bad flags before building or touching
/// anything (its ranges are the benchmark binary's; the run itself is in bench/RESULTS.md).
#[test]
fn bench_policy_explains_itself_and_refuses_bad_flags() {
    let run = |args: &[&str]| script_ok("bench-policy", args, &[]);
    let (ok, help) = run(&["--help"]);
    assert!(
        ok && help.starts_with("Network-policy scale benchmark"),
        "{help}"
    );
    assert!(help.contains("enforcement on every node"), "{help}");
    let (ok, text) = run(&["--pods", "many"]);
    assert!(
        !ok && text.contains("--pods needs a number, not 'many'"),
        "{text}"
    );
    let (ok, text) = run(&["--fast"]);
    assert!(!ok && text.contains("unknown option '--fast'"), "{text}");
}

/// `scripts/bench-cni` times ADD and DEL of real pods (here 3, next to a "baseline" that is the
/// same build), reports each verb for each build and the ratio, and leaves no namespace behind;
/// bad flags are refused before anything is made.
#[test]
fn bench_cni_times_add_and_del_and_leaves_nothing() {
    if !e2e_ready() {
        return;
    }
    let bins = podnet_bin("podnet-cni");
    let dir = bins.parent().unwrap();
    let before = bench_cni_namespaces();
    let args = ["--calls", "3", "--rounds", "1", "--baseline-bin"];
    let mut argv: Vec<&str> = args.to_vec();
    argv.push(dir.to_str().unwrap());
    let (out, text) = run_script("bench-cni", &argv, &[("PODNET_BIN_DIR", dir)]);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for build in ["current", "baseline"] {
        for verb in ["ADD", "DEL"] {
            let row = stdout
                .lines()
                .find(|l| l.starts_with(build) && l.split_whitespace().nth(1) == Some(verb))
                .unwrap_or_else(|| panic!("no {build} {verb} row:\n{stdout}"));
            let cols: Vec<&str> = row.split_whitespace().collect();
            let median: f64 = cols[3].parse().unwrap_or_else(|_| panic!("{row}"));
            assert!(median > 0.0, "{row}");
            assert_eq!(cols[6], "3", "three calls of {verb}: {row}");
        }
    }
    assert!(
        stdout.contains("median ADD current/baseline: ") && stdout.contains("median DEL"),
        "{stdout}"
    );
    assert_eq!(bench_cni_namespaces(), before, "namespaces left behind");

    let run = |args: &[&str]| script_ok("bench-cni", args, &[]);
    let (ok, help) = run(&["--help"]);
    assert!(ok && help.starts_with("CNI plugin benchmark"), "{help}");
    let (ok, text) = run(&["--calls", "0"]);
    assert!(!ok && text.contains("--calls must be 1..250"), "{text}");
    let (ok, text) = run(&["--baseline-bin", "/nonexistent"]);
    assert!(
        !ok && text.contains("/nonexistent/podnet-cni is missing"),
        "{text}"
    );
}

/// The namespaces `scripts/bench-cni` makes (`pn-bcni-PID-...`) that exist now.
fn bench_cni_namespaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("pn-bcni-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn script_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

/// Runs `scripts/NAME` with `args` and `env`: its output, and stdout + stderr as text.
fn run_script(name: &str, args: &[&str], env: &[(&str, &Path)]) -> (Output, String) {
    let out = Command::new(script_path(name))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = podnet_tests::cmd::printed(&out);
    (out, text)
}

/// [`run_script`] for tests that only ask whether it succeeded.
fn script_ok(name: &str, args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let (out, text) = run_script(name, args, env);
    (out.status.success(), text)
}

/// `scripts/bench-iperf` explains itself in full and refuses bad flags before touching
/// anything (the benchmark itself is run by hand; see bench/RESULTS.md).
#[test]
fn bench_iperf_explains_itself_and_refuses_bad_flags() {
    let run = |args: &[&str]| script_ok("bench-iperf", args, &[]);
    let (ok, help) = run(&["--help"]);
    assert!(ok, "{help}");
    // The whole header: from the first line to the last, and no code after it.
    assert!(help.starts_with("Side-by-side iperf3 benchmark"), "{help}");
    assert!(help.contains("the repetitions are interleaved"), "{help}");
    assert!(
        help.trim_end().ends_with("`cargo build --release`."),
        "{help}"
    );
    let (ok, text) = run(&["--reps", "0"]);
    assert!(!ok && text.contains("--reps must be 1..20"), "{text}");
    let (ok, text) = run(&["--fast"]);
    assert!(!ok && text.contains("unknown option '--fast'"), "{text}");
    let (ok, text) = run(&["--workers", "1,0"]);
    assert!(
        !ok && text.contains("--workers takes counts from 1 to 8, not '0'"),
        "{text}"
    );
    let (ok, text) = run(&["--modes", "kernel-vxlan,vxlan-w9"]);
    assert!(!ok && text.contains("unknown mode 'vxlan-w9'"), "{text}");
    let (ok, text) = run(&["--baseline-bin", "/nonexistent"]);
    assert!(
        !ok && text.contains("/nonexistent/podnet-agent is missing"),
        "{text}"
    );
    let bin_dir = podnet_bin("podnet-agent");
    let bin_dir = bin_dir.parent().unwrap().to_str().unwrap();
    let (ok, text) = run(&["--modes", "kernel-vxlan", "--baseline-bin", bin_dir]);
    assert!(
        !ok && text.contains("--baseline-bin needs a podnet mode"),
        "{text}"
    );
}

/// The analysis of `scripts/bench-iperf` (`scripts/lib/bench_iperf.py report`) on measurements
/// made up here: medians, ratios to the kernel's VXLAN, and this build / the baseline build per
/// round and of the medians.
#[test]
fn bench_iperf_report_gives_ratios_to_the_kernel_and_to_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.tsv");
    let mut lines = String::new();
    for (mode, runs) in [
        ("kernel-vxlan", [10.0, 12.0]),
        ("vxlan", [6.0, 6.0]),
        ("vxlan-baseline", [5.0, 4.0]),
    ] {
        for (rep, v) in runs.iter().enumerate() {
            lines += &format!("{mode}\ttcp1\t{}\t{v}\n", rep + 1);
        }
    }
    for (rep, v) in [2.0, 2.0].iter().enumerate() {
        lines += &format!("vxlan\tcpu1\t{}\t{v}\n", rep + 1);
        lines += &format!("vxlan-baseline\tcpu1\t{}\t4\n", rep + 1);
    }
    std::fs::write(&raw, lines).unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new("python3")
        .arg(script_path("lib/bench_iperf.py"))
        .args([
            "report",
            raw.to_str().unwrap(),
            json.to_str().unwrap(),
            "2",
            "4",
        ])
        .arg("kernel-vxlan,vxlan,vxlan-baseline")
        .output()
        .unwrap();
    let text = podnet_tests::cmd::printed(&out);
    assert!(out.status.success(), "{text}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let tcp1 = &doc["results"]["vxlan"]["tcp1"];
    assert_eq!(tcp1["median"], 6.0);
    assert_eq!(tcp1["ratio_to_kernel_vxlan"], 6.0 / 11.0);
    assert_eq!(tcp1["ratio_to_baseline"]["median"], 6.0 / 4.5);
    assert_eq!(
        tcp1["ratio_to_baseline"]["per_round"],
        serde_json::json!([1.2, 1.5])
    );
    let cpu1 = &doc["results"]["vxlan"]["cpu1"]["ratio_to_baseline"]["median"];
    assert_eq!(cpu1, 0.5);
    assert!(
        text.contains("vxlan: TCP 1 st 1.33x [1.20 1.50]; CPU s/GB 1 st 0.50x [0.50 0.50]"),
        "{text}"
    );
}

/// The processes whose environment holds `mark` (`NAME=VALUE`): their PIDs and names.
fn marked_processes(mark: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == mark.as_bytes()) {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push((pid, comm.trim().to_owned()));
        }
    }
    found
}

/// `scripts/bench-iperf` stops every process it started: a short wireguard-go run starts two
/// wireguard-go daemons and an iperf3 server (seen while it runs, by an environment mark they
/// inherit), and none of them is left once it has printed its table.
#[test]
fn bench_iperf_leaves_no_process_it_started() {
    if !e2e_ready() {
        return;
    }
    podnet_tests::require_tools(&["wireguard-go", "wg", "iperf3"]);
    let out_dir = tempfile::tempdir().unwrap();
    let mark = format!("PODNET_TEST_MARK=bench-{}", std::process::id());
    let (name, value) = mark.split_once('=').unwrap();
    let mut child = Command::new(script_path("bench-iperf"))
        .args([
            "--modes",
            "wireguard-go",
            "--quick",
            "--time",
            "2",
            "--no-chart",
            "--out",
        ])
        .arg(out_dir.path())
        .env(name, value)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("bench-iperf still running after 300 s");
        }
        for (pid, comm) in marked_processes(&mark) {
            if comm == "wireguard-go" || comm == "iperf3" {
                seen.insert((pid, comm));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().unwrap();
    let text = podnet_tests::cmd::printed(&out);
    assert!(status.success(), "{text}");
    assert!(text.contains("wireguard-go"), "{text}");
    let daemons = seen.iter().filter(|(_, c)| c == "wireguard-go").count();
    assert!(daemons >= 2, "saw {seen:?} while it ran: {text}");
    assert!(
        seen.iter().any(|(_, c)| c == "iperf3"),
        "saw {seen:?}: {text}"
    );
    let left = marked_processes(&mark);
    assert!(
        left.is_empty(),
        "left running after the run: {left:?}; {text}"
    );
}

/// `scripts/ping-hops` splits real round trips into hops from four captures, idle and under an
/// iperf3 stream, refuses what it cannot measure, and leaves no namespace behind.
#[test]
fn ping_hops_splits_round_trips_and_cleans_up() {
    if !e2e_ready() {
        return;
    }
    podnet_tests::require_tools(&["tcpdump", "tshark", "iperf3"]);
    let bin_dir = podnet_bin("podnet-agent").parent().unwrap().to_owned();
    let run_dir = std::env::temp_dir().join(format!("podnet-e2e-hops-{}", std::process::id()));
    let env = [("PODNET_BIN_DIR", &*bin_dir), ("PODNET_RUN_DIR", &*run_dir)];
    let run = |args: &[&str]| script_ok("ping-hops", args, &env);
    let (ok, text) = run(&["--encap", "kernel-vxlan"]);
    assert!(
        !ok && text.contains("--encap must be vxlan or ipip"),
        "{text}"
    );
    let (ok, text) = run(&["--count", "0"]);
    assert!(!ok && text.contains("--count must be 1..100000"), "{text}");

    // IP-in-IP idle, and VXLAN under a stream: both underlay capture filters (which keep only
    // tunnelled ICMP) and the load.
    let (ok, text) = run(&["--encap", "ipip", "--count", "20", "--interval", "0.02"]);
    assert!(ok, "{text}");
    assert_hops_reported(&text, 20, 20);
    let loaded: Vec<&str> = "--encap vxlan --count 20 --interval 0.02 --load"
        .split(' ')
        .collect();
    let (ok, text) = run(&loaded);
    let _ = std::fs::remove_dir_all(&run_dir);
    assert!(ok, "{text}");
    // A saturating stream may cost a ping in a full queue, as on any network; every one that
    // was answered must still be found at every hop.
    assert_hops_reported(&text, 20, 15);
    let rate: f64 = text
        .split("load: one iperf3 stream, median ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no load line in {text}"));
    assert!(rate > 0.0, "{text}");
}

/// `ping-hops` output: of `count` pings at least `least` answered, and every answered one seen
/// at every capture; each hop's median <= p99 <= max and none negative; and the testbed it made
/// gone.
fn assert_hops_reported(text: &str, count: usize, least: usize) {
    let (seen, answered) = text
        .lines()
        .find_map(|l| {
            let rest = l.strip_suffix(" answered)")?;
            let (head, answered) = rest.split_once(" pings seen at every hop (")?;
            let (seen, of) = head.split_once(" of ")?;
            (of.parse::<usize>().ok()? == count).then_some(())?;
            Some((seen.parse::<usize>().ok()?, answered.parse::<usize>().ok()?))
        })
        .unwrap_or_else(|| panic!("no `N of {count} pings seen at every hop` line: {text}"));
    assert!(answered >= least && seen == answered, "{text}");
    for hop in [
        "h1 agent: tunl0 read -> underlay",
        "h2 agent: socket -> tunl0 write",
        "h2 kernel: request -> reply",
        "underlay -> h1 agent -> tunl0 write",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(hop))
            .unwrap_or_else(|| panic!("{text}"));
        // median, p99, max: milliseconds, none negative (one clock for every capture).
        let ms: Vec<f64> = line[hop.len()..]
            .split_whitespace()
            .take(3)
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{line}")))
            .collect();
        assert!(ms.len() == 3 && ms.iter().all(|&v| v >= 0.0), "{line}");
        assert!(ms[0] <= ms[1] && ms[1] <= ms[2], "{line}");
    }
    let prefix = text
        .split_whitespace()
        .find(|w| w.starts_with("pnh"))
        .unwrap_or_else(|| panic!("no testbed name in {text}"));
    assert!(
        !netns_exists(&format!("{prefix}-h1")),
        "{prefix} left behind"
    );
}

#[test]
fn containerd_containers_attach_through_the_podnet_cni_plugin() {
    if !e2e_ready() {
        return;
    }
    podnet_tests::require_tools(&["containerd", "ctr", "runc", "busybox", "nsenter", "unshare"]);
    assert!(
        Path::new("/usr/lib/cni/loopback").exists(),
        "ctr --cni needs the reference plugins: apt-get install containernetworking-plugins"
    );
    let s = Script::new("scctr");
    s.up(&[
        "--hosts",
        "3",
        "--pods-per-host",
        "1",
        "--runtime",
        "containerd",
    ]);
    let listed = std::fs::read_to_string(s.run_dir.join(&s.prefix).join("containers"))
        .expect("RUN/containers");
    // "hN ID IP" per container.
    let addr = |host: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(&format!("{host} ")))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_else(|| panic!("no container on {host}: {listed}"))
            .to_string()
    };
    let (c1, c2) = (addr("h1"), addr("h2"));
    let ctr = |host: &str, args: &[&str]| {
        let mut all = vec!["ctr", "--prefix", &s.prefix, host];
        all.extend_from_slice(args);
        s.call(&all)
    };
    let pods = std::fs::read_to_string(s.run_dir.join(&s.prefix).join("pods")).unwrap();
    let pod3 = pods
        .lines()
        .find(|l| l.starts_with(&s.ns("h3-p1")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no pod on h3: {pods}"))
        .to_string();
    for (host, id, peer) in [
        ("h1", "ctr-h1", c2.as_str()),
        ("h2", "ctr-h2", c1.as_str()),
        ("h1", "ctr-h1", pod3.as_str()),
        ("h2", "ctr-h2", pod3.as_str()),
    ] {
        let exec_id = format!("ping-{}", peer.replace('.', "-"));
        let (out, text) = ctr(
            host,
            &[
                "task",
                "exec",
                "--exec-id",
                &exec_id,
                id,
                "/bin/ping",
                "-c",
                "2",
                "-W",
                "5",
                peer,
            ],
        );
        assert!(out.status.success(), "{id} -> {peer}: {text}");
        assert!(text.contains("2 packets received"), "{text}");
    }
    // iperf3 between the two containers (the host's /usr is theirs, read-only).
    let (out, text) = ctr(
        "h2",
        &[
            "task",
            "exec",
            "--exec-id",
            "iperf-s",
            "ctr-h2",
            "/usr/bin/iperf3",
            "-s",
            "-1",
            "-D",
        ],
    );
    assert!(out.status.success(), "{text}");
    // The daemonized server may take a moment to listen: a bounded number of tries.
    let mut last = String::new();
    let ok = (0..20).any(|i| {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let exec_id = format!("iperf-c{i}");
        let (out, text) = ctr(
            "h1",
            &[
                "task",
                "exec",
                "--exec-id",
                &exec_id,
                "ctr-h1",
                "/usr/bin/iperf3",
                "-c",
                &c2,
                "-t",
                "2",
            ],
        );
        last = text;
        out.status.success() && last.contains("receiver")
    });
    assert!(ok, "iperf3 ctr-h1 -> ctr-h2: {last}");
    s.down();
    assert!(!netns_exists(&s.ns("h1")));
}
