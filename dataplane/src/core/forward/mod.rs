//! Forwarding decisions: pod packet -> tunnel packet (outbound), tunnel packet -> pod packet
//! (inbound), as pure functions over caller-owned buffers.
//!
//! The [`Forwarder`] never touches a socket, a device or the clock; the OS shells hand it bytes and
//! act on the result ([`Outbound::Send`]: put these bytes on the underlay to that peer,
//! [`Outbound::Reply`] / [`Inbound::Deliver`]: write these bytes into `tunl0`, `Drop`: count and
//! forget). Results borrow the caller's buffers; nothing is allocated per packet. Every drop is
//! counted in [`Counters`](crate::core::drops::Counters) and per-peer traffic in the table's
//! [`PeerCounters`](crate::core::drops::PeerCounters).
//!
//! TTL: the kernel already decremented the TTL when it routed the packet into `tunl0` (and the
//! receiving kernel decrements it again when it routes from its `tunl0` to the pod), so the
//! tunnel is one hop like any link and the forwarder leaves the inner TTL alone. A packet the
//! kernel would expire never reaches `tunl0`: the kernel sends the ICMP time-exceeded itself.
//!
//! Fragments: userspace never fragments. `tunl0` has the overlay MTU, so the kernel fragments
//! (or answers DF packets with fragmentation-needed) before we see them; an oversized packet
//! here means the MTU changed under the kernel's feet, and we answer DF packets with ICMP
//! fragmentation-needed carrying the overlay MTU and drop the others as `too_big`.
//! Inner fragments are forwarded like any packet (their header carries the addresses).

mod config;
#[cfg(test)]
mod fixtures;
mod forwarder;
mod inbound;
mod outbound;

pub use config::{NodeConfig, SendPaths};
pub use forwarder::{Forwarder, ICMP_BURST, ICMP_RATE};
pub use inbound::{Inbound, RxTally};
pub use outbound::{route, Outbound, Route, SuperOutbound, TooBig, HEADROOM, SCRATCH_LEN};
