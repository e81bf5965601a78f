//! Upstream's network-policy probe layout, for tests here and in the crates that compile or
//! enforce policies (feature `fixtures`): namespaces x, y, z labelled `ns=<name>`, pods a, b, c
//! in each labelled `pod=<name>` at 10.244.<1..3>.<10..12>, each declaring
//! `serve-<port>-<proto>` for ports 80 and 81, TCP and UDP.

use std::net::IpAddr;

use super::eval::{Cluster, PodView};
use super::model::{NamedPort, NetworkPolicy, Protocol};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

/// The 9 pods with `policies`.
pub fn probe_cluster(policies: Vec<NetworkPolicy>) -> Cluster {
    let mut c = Cluster::default();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        c.namespaces
            .insert(ns.to_string(), [("ns".to_string(), ns.to_string())].into());
        for (j, pod) in PODS.iter().enumerate() {
            let ports = [80, 81]
                .into_iter()
                .flat_map(|port| {
                    [Protocol::Tcp, Protocol::Udp].map(|protocol| NamedPort {
                        name: format!("serve-{port}-{}", protocol.name().to_lowercase()),
                        port,
                        protocol,
                    })
                })
                .collect();
            c.pods.push(PodView {
                namespace: ns.to_string(),
                name: pod.to_string(),
                labels: [("pod".to_string(), pod.to_string())].into(),
                ips: vec![IpAddr::from([10, 244, i as u8 + 1, j as u8 + 10])],
                ports,
            });
        }
    }
    c.policies = policies;
    c
}
