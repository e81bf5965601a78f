//! Wire formats for podnet, free of I/O.
//!
//! Zero-copy views over byte buffers (checked once at construction, then panic-free),
//! encapsulation into caller-owned headroom, ICMP error generation and the Internet checksum.
//! Everything here is a pure function over bytes so it can be tested and fuzzed without root.
#![forbid(unsafe_code)]

pub use error::{Layer, WireError};
pub use ethernet::MacAddr;
pub use ipv4::{Ipv4Packet, Ipv4Repr};
pub use ipv6::{Ipv6Packet, Ipv6Repr};
pub use vxlan::Vni;

pub mod api;
pub mod checksum;
pub mod error;
pub mod ethernet;
pub mod gro;
pub mod gso;
pub mod icmp;
pub mod icmpv6;
pub mod ipip;
pub mod ipv4;
pub mod ipv6;
pub mod policy;
pub mod virtio;
pub mod vxlan;
pub mod wireguard;
