//! Pods made through the podnet CNI plugin, called as a runtime calls it.

use std::time::Duration;

use super::namespaces::Testbed;

impl Testbed {
    /// The network config a runtime hands `podnet-cni` on host n (`conf` replaces it).
    pub fn cni_config(&self, n: u8) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "podnet",
            "type": "podnet",
            "subnetFile": self.path(&format!("h{n}/subnet.env")),
            "dataDir": self.path(&format!("h{n}-cni")),
        })
    }

    /// Runs `podnet-cni` in host n's namespace as a runtime would: `verb`, the pod's namespace
    /// `pod_ns` (by name, under /run/netns), `ifname`, and `conf` (default [`Self::cni_config`])
    /// on stdin.
    pub fn cni_call(
        &self,
        n: u8,
        verb: &str,
        pod_ns: &str,
        ifname: &str,
        conf: Option<&serde_json::Value>,
    ) -> crate::Output {
        let conf = conf.cloned().unwrap_or_else(|| self.cni_config(n));
        let bin = crate::podnet_bin("podnet-cni");
        self.cni_exec(n, &bin, verb, pod_ns, ifname, &conf, "")
    }

    /// [`Self::cni_call`] with the default config and `CNI_ARGS` set to `cni_args` (the pod's
    /// identity: `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;PODNET_LABELS=..`).
    pub fn cni_call_as(&self, n: u8, verb: &str, pod_ns: &str, cni_args: &str) -> crate::Output {
        let bin = crate::podnet_bin("podnet-cni");
        self.cni_exec(n, &bin, verb, pod_ns, "eth0", &self.cni_config(n), cni_args)
    }

    /// ADD of the pod in `pod_ns` on host n with `CNI_ARGS` `cni_args` (the default config);
    /// panics unless it succeeds, and returns the address the result gives the pod.
    pub fn cni_add(&self, n: u8, pod_ns: &str, cni_args: &str) -> std::net::Ipv4Addr {
        let out = self.cni_call_as(n, "ADD", pod_ns, cni_args);
        assert!(
            out.success(),
            "podnet-cni ADD for {pod_ns}: {}",
            out.combined()
        );
        let result: serde_json::Value = serde_json::from_str(&out.stdout).expect("ADD result JSON");
        result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.parse::<ipnet::Ipv4Net>().ok())
            .unwrap_or_else(|| panic!("no address in {result}"))
            .addr()
    }

    /// Runs CNI plugin `plugin` (podnet's or a reference plugin) in host n's namespace as a
    /// runtime would, `conf` on stdin and `CNI_ARGS` set to `cni_args`.
    #[allow(clippy::too_many_arguments)] // the CNI_* variables a runtime sets, one each
    pub fn cni_exec(
        &self,
        n: u8,
        plugin: &std::path::Path,
        verb: &str,
        pod_ns: &str,
        ifname: &str,
        conf: &serde_json::Value,
        cni_args: &str,
    ) -> crate::Output {
        let netns = format!("/run/netns/{pod_ns}");
        crate::cmd::run_with_stdin(
            Some(&self.host(n).ns),
            &[
                "env",
                &format!("CNI_COMMAND={verb}"),
                &format!("CNI_CONTAINERID={pod_ns}"),
                &format!("CNI_NETNS={netns}"),
                &format!("CNI_IFNAME={ifname}"),
                "CNI_PATH=/usr/lib/cni",
                &format!("CNI_ARGS={cni_args}"),
                plugin.to_str().expect("utf-8 path"),
            ],
            conf.to_string().as_bytes(),
            Duration::from_secs(30),
        )
        .expect("podnet-cni")
    }
}
