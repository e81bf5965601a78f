//! The podnet forwarder.
//!
//! A sans-IO core (LPM table, peer table, outbound/inbound decisions, drop reasons and
//! counters) and thin OS shells under `sys/` (TUN, underlay sockets, netlink host setup).
//! Unsafe code is allowed only inside `sys/`.
pub mod drops;
pub mod lpm;
pub mod table;
pub mod forward;
