//! The control plane of a testbed: one file-store podnet-control, or replicas over a
//! 3-member etcd cluster, and the PKI of an mTLS testbed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::namespaces::Testbed;
use super::topology::{
    control_port, etcd_args, etcd_endpoints, etcd_ip, etcd_members, replica_ip, underlay_ip,
};
use crate::http;
use crate::wait::wait_for;

impl Testbed {
    /// The control service's URL, or every replica's, comma-separated, as agents get them.
    pub fn control_url(&self) -> String {
        let scheme = if self.mtls { "https" } else { "http" };
        if self.replicas == 0 {
            return format!("{scheme}://{}:{}", underlay_ip(1), control_port());
        }
        (1..=self.replicas)
            .map(|r| format!("{scheme}://{}", self.replica_addr(r)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Replica r's address.
    pub fn replica_addr(&self, r: u8) -> SocketAddr {
        SocketAddr::from((replica_ip(r), control_port()))
    }

    /// Namespace of replica r.
    pub fn replica_ns(&self, r: u8) -> String {
        format!("{}-c{r}", self.prefix)
    }

    /// Namespace of etcd member i.
    pub fn etcd_ns(&self, i: u8) -> String {
        format!("{}-etcd{i}", self.prefix)
    }

    /// Starts the 3-member etcd cluster and waits until it is healthy. It serves TLS on its
    /// client and peer ports and requires client certificates, all from the testbed's CA
    /// (`pki()`: etcd-server.pem for the members, etcd-client-podnet-control.pem for the
    /// replicas, etcd-client-etcdctl.pem for [`Testbed::etcdctl`]).
    pub fn start_etcd_cluster(&mut self) {
        crate::require_tools(&["etcd", "etcdctl"]);
        self.make_etcd_pki();
        for i in 1..=etcd_members() {
            self.add_underlay_node(&format!("etcd{i}"), etcd_ip(i));
        }
        for i in 1..=etcd_members() {
            self.start_etcd(i);
        }
        let healthy = wait_for("etcd cluster healthy", Duration::from_secs(30), || {
            let out = self.etcdctl(&["endpoint", "health"])?;
            if out.success() {
                Ok(())
            } else {
                Err(out.combined())
            }
        });
        if let Err(e) = healthy {
            panic!("{e}; etcd1 log:\n{}", self.log("etcd1"));
        }
    }

    /// The CA (made unless the testbed has one) and etcd's certificates.
    fn make_etcd_pki(&self) {
        let pki = self.pki();
        let dir = pki.to_str().expect("utf-8 path");
        if !pki.join("ca.pem").exists() {
            self.ca(&["init", "--dir", dir]);
        }
        let mut server = vec!["issue", "--dir", dir, "--etcd-server"];
        let ips: Vec<String> = (1..=etcd_members())
            .map(|i| etcd_ip(i).to_string())
            .collect();
        for ip in &ips {
            server.extend(["--ip", ip.as_str()]);
        }
        self.ca(&server);
        for client in ["podnet-control", "etcdctl"] {
            self.ca(&["issue", "--dir", dir, "--etcd-client", client]);
        }
    }

    /// `etcdctl ARGS` against the cluster, with its client certificate, from etcd1's
    /// namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Result<crate::cmd::Output, String> {
        let pki = self.pki();
        let file = |name: &str| pki.join(name).to_str().expect("utf-8 path").to_string();
        let endpoints = etcd_endpoints();
        let (ca, cert, key) = (
            file("ca.pem"),
            file("etcd-client-etcdctl.pem"),
            file("etcd-client-etcdctl-key.pem"),
        );
        let mut argv = vec![
            "etcdctl",
            "--endpoints",
            &endpoints,
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
        ];
        argv.extend_from_slice(args);
        crate::run(Some(&self.etcd_ns(1)), &argv, Duration::from_secs(10))
    }

    /// A replica's flags to reach etcd: the endpoints and its TLS files.
    pub fn etcd_client_args(&self) -> Vec<String> {
        let pki = self.pki();
        let file = |name: &str| pki.join(name).to_str().expect("utf-8 path").to_string();
        vec![
            "--etcd-endpoints".into(),
            etcd_endpoints(),
            "--etcd-ca".into(),
            file("ca.pem"),
            "--etcd-cert".into(),
            file("etcd-client-podnet-control.pem"),
            "--etcd-key".into(),
            file("etcd-client-podnet-control-key.pem"),
        ]
    }

    /// Starts (or restarts, on its data dir) etcd member i as process `etcdI`.
    pub fn start_etcd(&mut self, i: u8) {
        let data = self.path(&format!("etcd{i}.data"));
        let pki = self.pki();
        let argv = etcd_args(
            i,
            data.to_str().expect("utf-8 path"),
            &self.prefix,
            pki.to_str().expect("utf-8 path"),
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let ns = self.etcd_ns(i);
        self.start(&format!("etcd{i}"), &ns, &argv);
    }

    /// The etcd member (1-3) that leads now, from `etcdctl endpoint status`.
    pub fn etcd_leader(&self) -> Result<u8, String> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let status: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {}", out.combined()))?;
        for (i, member) in status.as_array().into_iter().flatten().enumerate() {
            let s = &member["Status"];
            if s["header"]["member_id"] == s["leader"] && !s["leader"].is_null() {
                return Ok(i as u8 + 1);
            }
        }
        Err(format!("no leader in {}", out.stdout))
    }

    /// Starts podnet-control replica r over the etcd cluster as process `controlR` and waits
    /// for its /healthz (`extra` flags added).
    pub fn start_replica(&mut self, r: u8) {
        let ns = self.replica_ns(r);
        let addr = self.replica_addr(r);
        if !self.namespaces.contains(&ns) {
            let SocketAddr::V4(v4) = addr else {
                unreachable!("replica addresses are IPv4")
            };
            self.add_underlay_node(&format!("c{r}"), *v4.ip());
        }
        let bin = crate::podnet_bin("podnet-control");
        let mut argv: Vec<String> = [
            bin.to_str().expect("utf-8 path"),
            "serve",
            "--listen",
            &addr.to_string(),
            "--store",
            "etcd",
            "--etcd-prefix",
            "/podnet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(self.etcd_client_args());
        argv.push("--insecure".into());
        argv.extend(self.control_args.iter().cloned());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let name = format!("control{r}");
        self.start(&name, &ns, &argv);
        let r = wait_for(&format!("{name} /healthz"), Duration::from_secs(20), || {
            if let Some(status) = self.procs.get_mut(&name).and_then(|p| p.try_exit()) {
                return Ok(Err(format!("{name} exited ({status})")));
            }
            match http::get(&ns, addr, "/healthz") {
                Ok(r) if r.status == 200 => Ok(Ok(())),
                Ok(r) => Err(format!("status {}", r.status)),
                Err(e) => Err(e),
            }
        });
        if let Err(e) | Ok(Err(e)) = r {
            panic!("{e}; log:\n{}", self.log(&name));
        }
    }

    /// The cluster CA and certificates of an mTLS testbed.
    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    /// `podnet-control ca ARGS`; panics unless it succeeds.
    pub fn ca(&self, args: &[&str]) -> String {
        let bin = crate::podnet_bin("podnet-control");
        let mut argv = vec![bin.to_str().expect("utf-8 path"), "ca"];
        argv.extend_from_slice(args);
        let out = crate::run(None, &argv, Duration::from_secs(30)).expect("podnet-control ca");
        assert!(
            out.success(),
            "podnet-control ca {args:?}: {}",
            out.combined()
        );
        out.stdout
    }

    pub(super) fn make_pki(&self, hosts: u8) {
        let pki = self.pki();
        let dir = pki.to_str().expect("utf-8 path");
        self.ca(&["init", "--dir", dir]);
        let server_ip = underlay_ip(1).to_string();
        self.ca(&["issue", "--dir", dir, "--server", "--ip", &server_ip]);
        self.ca(&["issue", "--dir", dir, "--operator", "admin"]);
        for n in 1..=hosts {
            self.ca(&["issue", "--dir", dir, "--node", &format!("h{n}")]);
        }
    }

    /// `curl` arguments that reach the service as the operator (`-sS --cacert .. --cert ..
    /// --key ..`), or plain `-sS` without mTLS.
    pub fn operator_curl(&self) -> Vec<String> {
        let mut a = vec!["curl".to_string(), "-sS".to_string()];
        if self.mtls {
            let pki = self.pki();
            for (flag, file) in [
                ("--cacert", "ca.pem"),
                ("--cert", "operator-admin.pem"),
                ("--key", "operator-admin-key.pem"),
            ] {
                a.push(flag.into());
                a.push(pki.join(file).to_str().expect("utf-8 path").into());
            }
        }
        a
    }

    /// A plain-HTTP control API call from host 1 with an optional JSON `body`; panics unless
    /// it answers 200, and returns the answer's JSON.
    pub fn control_call(&self, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
        let r = http::request(
            &self.host(1).ns,
            self.control_addr(),
            method,
            path,
            &[],
            body,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
        r.json().unwrap()
    }

    /// The control service's address (replica 1's on an HA testbed).
    pub fn control_addr(&self) -> SocketAddr {
        if self.replicas > 0 {
            return self.replica_addr(1);
        }
        SocketAddr::from((underlay_ip(1), control_port()))
    }

    /// Starts `podnet-control serve` in host 1 on 198.18.0.1:7800 with its state in the
    /// testbed dir, as process `control`.
    pub fn start_control(&mut self, extra: &[&str]) {
        let bin = crate::podnet_bin("podnet-control");
        let state = self.path("control-state.json");
        let listen = self.control_addr().to_string();
        let mut argv = vec![
            bin.to_str().expect("utf-8 path").to_owned(),
            "serve".into(),
            "--listen".into(),
            listen,
            "--state".into(),
            state.to_str().expect("utf-8 path").to_owned(),
        ];
        if self.mtls {
            let pki = self.pki();
            for (flag, file) in [
                ("--tls-cert", "server.pem"),
                ("--tls-key", "server-key.pem"),
                ("--client-ca", "ca.pem"),
            ] {
                argv.push(flag.into());
                argv.push(pki.join(file).to_str().expect("utf-8 path").into());
            }
        } else {
            argv.push("--insecure".into());
        }
        argv.extend(self.control_args.iter().cloned());
        argv.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let ns = self.host(1).ns.clone();
        self.start("control", &ns, &argv);
        let addr = self.control_addr();
        let r = wait_for("podnet-control /healthz", Duration::from_secs(20), || {
            if let Some(status) = self.procs.get_mut("control").and_then(|p| p.try_exit()) {
                return Ok(Err(format!("podnet-control exited ({status})")));
            }
            if self.mtls {
                let mut curl = self.operator_curl();
                curl.extend(["-f".into(), format!("{}/healthz", self.control_url())]);
                let curl: Vec<&str> = curl.iter().map(String::as_str).collect();
                return match crate::run(Some(&ns), &curl, Duration::from_secs(5)) {
                    Ok(o) if o.success() => Ok(Ok(())),
                    Ok(o) => Err(o.combined()),
                    Err(e) => Err(e),
                };
            }
            match http::get(&ns, addr, "/healthz") {
                Ok(r) if r.status == 200 => Ok(Ok(())),
                Ok(r) => Err(format!("status {}", r.status)),
                Err(e) => Err(e),
            }
        });
        if let Err(e) | Ok(Err(e)) = r {
            panic!("{e}; log:\n{}", self.log("control"));
        }
    }
}
