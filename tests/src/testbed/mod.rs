//! A multi-host testbed in network namespaces, torn down by `Drop`.
//!
//! Layout (DESIGN.md "Testbed"): netns `<prefix>-ul` holds bridge `br0`; host n lives in
//! `<prefix>-hn` with `eth0` 198.18.0.n/24 on `br0`, a `cni0` bridge holding the gateway of its
//! pod CIDR, and pods `<prefix>-hn-pm` on `cni0`. Static pod CIDRs are 10.244.n.0/24; with the
//! control service the CIDR comes from the agent's `subnet.env`.

mod builder;
mod cni;
mod control;
mod hosts;
mod namespaces;
mod procs;
mod topology;
mod traffic;

pub use builder::TestbedBuilder;
pub use namespaces::Testbed;
/// The encapsulation a podnet host receives: the control API's type, by the names `--encap`
/// takes.
pub use podnet_proto::api::Encap;
pub use topology::{
    admin_api, control_port, etcd_endpoints, etcd_ip, etcd_members, expected_workers, replica_ip,
    static_cidr, underlay_filter, underlay_ip, underlay_ip_on, vtep_mac, workers_override, Host,
    HostMode, Peers, Pod,
};
