//! The podnet forwarder.
//!
//! A sans-IO core (LPM table, peer table, outbound/inbound decisions, drop reasons and
//! counters) and thin OS shells under `sys/` (TUN, underlay sockets, netlink host setup).
//! Unsafe code is allowed only inside `sys/`.
pub mod admin;
pub mod admin_client;
pub mod agent;
pub mod batch;
pub mod bucket;
pub mod cli;
pub mod datapath;
pub mod drops;
pub mod dropwatch;
pub mod files;
pub mod forward;
pub mod host;
pub mod lpm;
pub mod membership;
pub mod reason;
pub mod routing;
pub mod state;
#[allow(unsafe_code)] // OS shells: the only unsafe in podnet; every block has a SAFETY comment.
pub mod sys;
pub mod table;
pub mod why;
