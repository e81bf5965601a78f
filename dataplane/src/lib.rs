//! The podnet forwarder, in three layers:
//!
//! - [`core`]: the sans-IO forwarding core. Route table and LPM, the outbound and inbound
//!   decisions, encapsulation, drop reasons and counters, the drop sampler, the routing-mode
//!   choice and `why`. Pure functions over byte buffers and atomics: no clock (time is passed
//!   in), no lock, no system call (`tests/tests/pure_core.rs` checks).
//! - [`datapath`] and [`sys`]: the loop that moves packets between the TUN queues and the
//!   underlay sockets through the core, and the thin OS shells it uses (TUN, sockets, netlink,
//!   sysctls, the agent lock). Unsafe code is allowed only inside `sys/`.
//! - [`agent`]: `podnet-agent run` around them: host state, membership with the control
//!   service, the admin API and its client, the state files.
//!
//! No module imports one that imports it back (`tests/tests/module_graph.rs` checks).
pub mod agent;
pub mod cli;
pub mod cni;
pub mod core;
pub mod datapath;
#[allow(unsafe_code)] // OS shells: the only unsafe in podnet; every block has a SAFETY comment.
pub mod sys;
pub mod wireguard;
